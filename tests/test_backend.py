import functools
import re

import pytest
import torch

from constitutional_ai.backends import LanguageModel, load_backend, prefix_scorer, stem_attention
from constitutional_ai.backends.prefix_scorer import _assign_stems, _Question, common_length
from constitutional_ai.backends.sampling import SeededSampler
from constitutional_ai.backends.transformers_backend import TransformersBackend
from constitutional_ai.common.errors import ModelLoadError
from constitutional_ai.config import GenerationParams, ModelConfig
from constitutional_ai.models.loading import config_context_length, end_token_ids, loading, resolve_dtype

PROMPTS = [
    [{"role": "user", "content": "How do I bake bread at home?"}],
    [{"role": "user", "content": "hi"}],
    "A raw prompt that is sent verbatim,",
    [{"role": "user", "content": "Tell me about rivers."}, {"role": "assistant", "content": "Rivers flow."},
     {"role": "user", "content": "And lakes, in some more detail please?"}],
]


@pytest.fixture(scope="module")
def raw_backend(tiny_model_dir):
    return TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), batch_size=4))


@pytest.fixture(scope="module")
def chat_backend(tiny_chat_model_dir):
    return TransformersBackend(ModelConfig(model_name_or_path=str(tiny_chat_model_dir), batch_size=4))


def test_backend_satisfies_protocol_and_picks_cpu_float32(raw_backend):
    assert isinstance(raw_backend, LanguageModel)
    assert raw_backend.device.type == "cpu"
    assert next(raw_backend.model.parameters()).dtype == torch.float32
    assert raw_backend.context_length == 2048


def test_dtype_and_context_are_overridable(tiny_model_dir):
    b = load_backend(ModelConfig(model_name_or_path=str(tiny_model_dir), dtype="bfloat16", max_context=256))
    assert next(b.model.parameters()).dtype == torch.bfloat16
    assert b.context_length == 256
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_formats_raw_without_template_and_chat_with_template(raw_backend, chat_backend):
    conv = PROMPTS[3]
    assert raw_backend.style == "raw"
    assert raw_backend.format(conv) == ("\n\nHuman: Tell me about rivers.\n\nAssistant: Rivers flow."
                                        "\n\nHuman: And lakes, in some more detail please?\n\nAssistant:")
    assert chat_backend.style == "chat"
    text = chat_backend.format(conv)
    assert text.startswith("<|im_start|>user\nTell me about rivers.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert raw_backend.format("verbatim") == chat_backend.format("verbatim") == "verbatim"


def test_forced_chat_format_without_template_fails_clearly(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no chat template"):
        TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), chat_format="chat_template"))


@pytest.mark.parametrize("which", ["raw_backend", "chat_backend"])
def test_batched_greedy_equals_one_at_a_time(which, request):
    backend = request.getfixturevalue(which)
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    batched = backend.generate(PROMPTS, params)
    single = [backend.generate([p], params)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in single]
    assert len({g.text for g in batched}) > 1  # outputs depend on the prompt, not a constant


def test_max_new_tokens_is_respected_and_length_is_reported(raw_backend):
    out = raw_backend.generate(PROMPTS, GenerationParams(max_new_tokens=5, temperature=1.0), seeds=[1, 2, 3, 4])
    assert all(g.completion_tokens <= 5 for g in out)
    # a random model rarely ends on its own: a 5-token budget runs out, and that is reported
    assert [g.finish_reason for g in out if g.completion_tokens == 5] == ["length"] * sum(
        g.completion_tokens == 5 for g in out)
    assert any(g.finish_reason == "length" for g in out)


def test_stop_sequences_cut_the_output(raw_backend):
    params = GenerationParams(max_new_tokens=40, temperature=0.0)
    free = raw_backend.generate(PROMPTS, params)
    # pick a stop string the model really produces: a few characters from the middle of each output
    tested = 0
    for prompt, g in zip(PROMPTS, free, strict=True):
        match = re.search(r"[A-Za-z]{3}", g.text[4:])
        if match is None:
            continue
        stop, tested = match.group(0), tested + 1
        cut = raw_backend.generate([prompt], params.model_copy(update={"stop": [stop]}))[0]
        assert stop not in cut.text
        assert g.text.startswith(cut.text)
        assert cut.finish_reason == "stop"
        assert cut.completion_tokens < g.completion_tokens  # generation stopped early, not just trimmed
    assert tested >= 2


def test_sampling_depends_on_each_prompts_seed_not_on_the_batch(raw_backend, chat_backend):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50)
    for backend in (raw_backend, chat_backend):
        seeds = [11, 12, 13, 14]
        batched = [g.text for g in backend.generate(PROMPTS, params, seeds=seeds)]
        single = [backend.generate([p], params, seeds=[s])[0].text for p, s in zip(PROMPTS, seeds, strict=True)]
        assert batched == single
        reordered = backend.generate(PROMPTS[::-1], params, seeds=seeds[::-1])
        assert [g.text for g in reordered][::-1] == batched
        other = [g.text for g in backend.generate(PROMPTS, params, seeds=[21, 22, 23, 24])]
        assert other != batched


def test_seeded_sampler_draws_from_the_warped_distribution():
    # Gumbel-max over log-probabilities must reproduce the softmax frequencies
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = SeededSampler(GenerationParams(temperature=1.0), seeds=[0])
    draws = torch.tensor([int(sampler(None, logits.clone()).argmax()) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)
    top1 = SeededSampler(GenerationParams(temperature=1.0, top_k=1), seeds=[0])
    assert {int(top1(None, logits.clone()).argmax()) for _ in range(50)} == {0}


def _reference_logprob(backend, prompt, choice):
    """Log-probability of ``choice`` after ``prompt``, computed independently of the backend's
    batching and splitting: tokenize the whole text, score every token after the prompt's."""
    text = backend.format(prompt)
    add_special = isinstance(prompt, str) or backend.style == "raw"
    prompt_ids = backend.tokenizer(text, add_special_tokens=add_special)["input_ids"]
    full = backend.tokenizer(text + choice, add_special_tokens=add_special)["input_ids"]
    start = next((k for k, (a, b) in enumerate(zip(prompt_ids, full, strict=False)) if a != b), len(prompt_ids))
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    return sum(float(logp[k - 1, full[k]]) for k in range(start, len(full)))


def _assert_reference_scores(backend, prompts, choices, scores):
    """Every score equals :func:`_reference_logprob` of its choice after its prompt."""
    for p, cs, row in zip(prompts, choices, scores, strict=True):
        for c, s in zip(cs, row, strict=True):
            assert s == pytest.approx(_reference_logprob(backend, p, c), abs=1e-4)


def _spy_on_shared_stems(monkeypatch):
    """The ``SharedStems`` of every shared-stem block entered from now on (the list fills as they are)."""
    entered = []
    sharing = stem_attention.sharing_stems
    monkeypatch.setattr(stem_attention, "sharing_stems", lambda stems: entered.append(stems) or sharing(stems))
    return entered


@pytest.mark.parametrize("fused", ["shared-stems", "fused-suffixes", "suffix-pass"])
@pytest.mark.parametrize("which", ["raw_backend", "chat_backend"])
def test_score_choices_matches_unbatched_reference(which, fused, request, monkeypatch):
    backend = request.getfixturevalue(which)
    assert backend.fuse_suffixes and backend.shared_stem_attention  # sdpa on CPU
    monkeypatch.setattr(backend.scorer, "fuse_suffixes", fused != "suffix-pass")
    monkeypatch.setattr(backend.scorer, "shared_stem_attention", fused == "shared-stems")
    monkeypatch.setattr(prefix_scorer, "MIN_SHARED_STEM", 0)  # these prompts' stems are short
    # "hel" + "lo" merges across the boundary in a BPE vocabulary trained on English text
    prompts = [PROMPTS[0], "The answer is:", PROMPTS[3], "Say hel"]
    choices = [[" (A)", " (B)"], [" yes", " no", " perhaps not"], [" (A)", " (B)"], ["lo", "p me"]]
    scores = backend.score_choices(prompts, choices)
    for p, cs, row in zip(prompts, choices, scores, strict=True):
        assert len(row) == len(cs)
        for c, s in zip(cs, row, strict=True):
            assert s < 0
            assert s == pytest.approx(_reference_logprob(backend, p, c), abs=1e-4)


def test_the_lm_head_runs_once_per_call_after_the_passes(raw_backend, monkeypatch):
    base, head = raw_backend.scorer._deferred_head()
    assert base is raw_backend.model.model and head is raw_backend.model.lm_head
    rows = []
    handle = head.register_forward_hook(lambda module, args, out: rows.append(tuple(args[0].shape)))
    monkeypatch.setattr(raw_backend.scorer, "max_batch_tokens", 64)  # several passes
    prompts = ["seven " * 20 + f"question {k}" for k in range(6)]
    try:
        scores = raw_backend.score_choices(prompts, [[" (A)", " (B)"]] * 6)
    finally:
        handle.remove()
        raw_backend.clear_prefix_cache()
    assert len(rows) == 1 and len(rows[0]) == 2  # one call, over the read positions only
    _assert_reference_scores(raw_backend, prompts, [[" (A)", " (B)"]] * len(prompts), scores)


def test_the_deferred_head_runs_in_slabs_and_reads_hold_only_their_columns(raw_backend, monkeypatch):
    rows = []
    handle = raw_backend.model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    held = []
    resolve = raw_backend.scorer._resolve

    def spy(pending, scores):
        held.extend(r.out for c in pending.values() for t in c for r in t)
        resolve(pending, scores)

    monkeypatch.setattr(prefix_scorer, "HEAD_ROWS", 5)
    monkeypatch.setattr(raw_backend.scorer, "_resolve", spy)
    monkeypatch.setattr(raw_backend.scorer, "max_batch_tokens", 64)
    block = "A block that every question starts with, word for word. " * 2
    prompts = [block + f"question {k}: " + "and then some more words of its own " * 3 for k in range(7)]
    choices = [[" (A)", " (B)"]] * 7
    try:
        scores = raw_backend.score_choices(prompts, choices)
    finally:
        handle.remove()
        raw_backend.clear_prefix_cache()
    assert len(rows) > 1 and max(rows) <= 5  # several head calls, none over HEAD_ROWS positions
    # each read keeps a copy of its pass's kept columns (the letters' predictions: 4 here), not a
    # view of the whole pass's states (its remainders run to about 30 tokens)
    hidden = raw_backend.model.config.hidden_size
    assert held and all(t.untyped_storage().nbytes() <= raw_backend.scorer.batch_size * 4 * hidden * 4 for t in held)
    _assert_reference_scores(raw_backend, prompts, choices, scores)


def test_a_grouped_query_model_scores_exactly_on_shared_stems(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    config.num_key_value_heads = max(1, config.num_attention_heads // 2)
    gqa = type(model)(config)  # the same shape with half as many key-value heads, random weights
    gqa.save_pretrained(tmp_path / "gqa")
    raw = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    raw.tokenizer.save_pretrained(tmp_path / "gqa")
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tmp_path / "gqa"), batch_size=4))
    assert backend.shared_stem_attention and backend.model.config.num_key_value_heads < config.num_attention_heads
    monkeypatch.setattr(prefix_scorer, "MIN_SHARED_STEM", 0)
    entered = _spy_on_shared_stems(monkeypatch)
    block = "A few-shot block that every question starts with, word for word. " * 4
    prompts = [block + f"Question {k}: which is better{'?' * k}" for k in range(4)]
    choices = [[" (A)", " (B)"]] * 4
    scores = backend.score_choices(prompts, choices)
    assert entered  # the stem was attended to in place
    _assert_reference_scores(backend, prompts, choices, scores)


def test_a_model_that_changes_its_logits_after_the_head_keeps_its_own_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.final_logit_softcapping = 2.0  # as Gemma 2 does after its head
    forward = type(model).forward

    @functools.wraps(forward)
    def capped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        cap = self.config.final_logit_softcapping
        out.logits = torch.tanh(out.logits / cap) * cap
        return out

    model.forward = capped.__get__(model)
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), batch_size=4), model=model)
    assert backend.scorer._deferred_head() is False
    prompts = [PROMPTS[0], "The answer is:"]
    choices = [[" (A)", " (B)"], [" yes", " perhaps not"]]
    _assert_reference_scores(backend, prompts, choices, backend.score_choices(prompts, choices))


def _forward_shapes(backend, fn):
    calls = []
    backend.scorer._deferred_head()  # its one-off probe is not one of the passes counted
    # the passes run the base model (the LM head, deferred, runs once after them)
    base = getattr(backend.model, backend.model.base_model_prefix)
    handle = base.register_forward_hook(lambda module, args, kwargs, out: calls.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        result = fn()
    finally:
        handle.remove()
    return calls, result


@pytest.mark.parametrize("fused", [True, False], ids=["fused-suffixes", "suffix-pass"])
def test_score_choices_reads_the_shared_prompt_once_per_batch(raw_backend, fused, monkeypatch):
    monkeypatch.setattr(raw_backend.scorer, "fuse_suffixes", fused)
    prompts = ["one " * 30, "two " * 40]
    calls, _ = _forward_shapes(raw_backend, lambda: raw_backend.score_choices(
        prompts, [[" (A)", " (B)", " (C)"], [" (A)", " (B)", " (C)"]]))
    # the 2 prompts (not 6 rows), then each prompt's last tokens with its choices' own short suffixes
    # in the same row, or (without 4D masks) the 6 suffixes as a third pass of their own
    assert [c[0] for c in calls] == ([2, 2] if fused else [2, 2, 6])
    assert calls[0][1] > 30 and calls[1][1] <= (3 + 3 * 3 if fused else 3)



def test_a_counted_prompt_is_not_tokenized_again_for_scoring(raw_backend, monkeypatch):
    prompts = [PROMPTS[0], PROMPTS[3]]
    choices = [[" (A)", " (B)"]] * 2
    expected = raw_backend.score_choices(prompts, choices)
    encoded = []
    batch_ids = raw_backend._batch_ids
    monkeypatch.setattr(raw_backend, "_batch_ids", lambda strings, flags: encoded.extend(strings) or
                        batch_ids(strings, flags))
    texts = [raw_backend.format(p) for p in prompts]
    lengths = raw_backend.count_tokens(prompts[:1])
    assert lengths == [len(raw_backend.tokenizer(texts[0])["input_ids"])]
    encoded.clear()
    again = raw_backend.score_choices(prompts, choices)
    assert [x for row in again for x in row] == pytest.approx([x for row in expected for x in row], abs=1e-5)
    # the counted prompt's own text is not encoded again; the uncounted one is, and each choice's full text
    assert texts[0] not in encoded and texts[1] in encoded
    assert sorted(encoded) == sorted([texts[1], *(t + c for t, cs in zip(texts, choices, strict=True) for c in cs)])


def test_score_choices_feeds_no_choice_its_last_token(raw_backend):
    # A choice's last token only predicts what follows the choice: one-token choices add no suffix
    # columns to the second pass, and a two-token choice adds one; the scores stay exact.
    prompt = "one " * 30
    tokenizer = raw_backend.tokenizer
    base = len(tokenizer(prompt)["input_ids"])
    width = {w: len(tokenizer(prompt + w)["input_ids"]) - base for w in (" the", " a", " and", " of", " to", " is")}
    single = [w for w, n in width.items() if n == 1][:2]
    assert len(single) == 2, width
    calls, scores = _forward_shapes(raw_backend, lambda: raw_backend.score_choices([prompt], [single]))
    # pass 2 is the remainder (the prompt's last token, kept out of the stem) and nothing after it
    assert [c[0] for c in calls] == [1, 1] and calls[1][1] == 1
    _assert_reference_scores(raw_backend, [prompt], [single], scores)
    double = single[0] + single[1]
    assert len(tokenizer(prompt + double)["input_ids"]) - base == 2
    calls, scores = _forward_shapes(raw_backend, lambda: raw_backend.score_choices([prompt], [[double, single[1]]]))
    assert calls[1][1] == 2  # the remainder and the two-token choice's first token
    _assert_reference_scores(raw_backend, [prompt], [[double, single[1]]], scores)

@pytest.mark.parametrize("shared", [True, False], ids=["shared-stems", "stem-copied-per-row"])
def test_score_choices_computes_a_stem_shared_by_questions_once(raw_backend, shared, monkeypatch):
    monkeypatch.setattr(raw_backend.scorer, "shared_stem_attention", shared)
    raw_backend.clear_prefix_cache()
    entered = _spy_on_shared_stems(monkeypatch)
    block = "A long few-shot block that every question repeats before its own text. " * 6
    prompts = [block + f"Question {k}: which of the two options is better{'?' * k}" for k in range(4)]
    choices = [[" (A)", " (B)"]] * 4
    calls, scores = _forward_shapes(raw_backend, lambda: raw_backend.score_choices(prompts, choices))
    block_tokens = len(raw_backend.tokenizer(block)["input_ids"])
    assert calls[0][0] == 1 and calls[0][1] >= block_tokens - 1  # the block, once
    assert calls[1][0] == 4 and calls[1][1] < block_tokens / 2  # each question's own text
    assert block_tokens >= prefix_scorer.MIN_SHARED_STEM
    assert [len(r) for s in entered for r in s.rows] == ([4] if shared else [])  # all four on the one stem, in place
    _assert_reference_scores(raw_backend, prompts, choices, scores)


def test_score_choices_falls_back_to_one_row_per_choice(raw_backend, monkeypatch):
    prompts, choices = ["The answer is:"], [[" (A)", " (B)"]]
    shared = raw_backend.score_choices(prompts, choices)

    def no_cache(*a, **k):
        raise NotImplementedError

    monkeypatch.setattr(raw_backend.scorer, "_score_tree", no_cache)
    assert raw_backend.score_choices(prompts, choices)[0] == pytest.approx(shared[0], abs=1e-4)


def test_missing_local_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        TransformersBackend(ModelConfig(model_name_or_path=str(tmp_path / "nope")))
    assert "no such directory" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub_id_is_a_one_line_error():
    # HF_HUB_OFFLINE=1 is set for the test session, so this must fail at once without retries
    with pytest.raises(ModelLoadError) as err:
        TransformersBackend(ModelConfig(model_name_or_path="some-org/not-cached-model"))
    message = str(err.value)
    assert "hf download some-org/not-cached-model" in message and "\n" not in message


def test_end_tokens_as_every_loader_counts_them():
    vocab = {"<|im_end|>": 9, "<|eot_id|>": 11, "a": 3}
    assert end_token_ids([2, 7], 2, vocab, chat=False) == [2, 7]
    assert end_token_ids(7, None, vocab, chat=True) == [7, 9, 11]
    assert end_token_ids(None, None, {}, chat=True) == []


def test_loading_reports_a_failed_read_in_one_line_and_finds_the_context_length():
    from types import SimpleNamespace

    with pytest.raises(ModelLoadError, match="no safetensors weights") as err, loading("org/model"):
        raise OSError("model.safetensors: no file named model.safetensors\nmore")
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeError, match="not a loading error"), loading("org/model"):
        raise RuntimeError("not a loading error")
    assert config_context_length(SimpleNamespace(max_position_embeddings=None, n_positions=0, seq_length=512)) == 512
    assert config_context_length(SimpleNamespace()) is None


def test_close_frees_the_model_and_the_stored_stems(tiny_model_dir):
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    block = "A few-shot block that both questions start with, word for word. " * 3
    backend.score_choices([block + "one?", block + "two?"], [[" yes", " no"]] * 2)
    assert backend.scorer._stems
    assert backend.scorer._head  # the deferred head holds the base model and the head
    import weakref

    base = weakref.ref(backend.scorer._head[0])
    backend.close()
    assert backend.model is None and backend.scorer.model is None and not backend.scorer._stems
    assert backend.scorer._head is None
    import gc

    gc.collect()
    assert base() is None  # nothing of the scorer keeps the weights alive


def test_sampling_params_are_explicit_not_taken_from_the_models_generation_config(tiny_model_dir, tmp_path):
    import shutil

    from transformers import GenerationConfig

    # a model that ships greedy-forcing defaults in its generation_config.json
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    GenerationConfig(do_sample=True, top_k=1, min_p=0.999, no_repeat_ngram_size=1,
                     eos_token_id=2).save_pretrained(model_dir)
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(model_dir)))
    assert backend.model_generation_defaults.min_p == 0.999
    params = GenerationParams(max_new_tokens=8, temperature=1.0)
    outputs = {backend.generate([PROMPTS[0]], params, seeds=[s])[0].text for s in range(6)}
    assert len(outputs) > 1  # top_k=1 or min_p=0.999 would make every seed give the same text


def test_scoring_micro_batches_respect_rows_and_token_budget(tiny_model_dir):
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), batch_size=3,
                                              max_batch_tokens=100))
    length = {0: 40, 1: 30, 2: 30, 3: 10, 4: 10, 5: 10, 6: 10, 7: 200}
    questions = {g: _Question([], [], [], limit=0, length=n, stem=5 if g < 3 else 0, group=0 if g < 3 else g)
                 for g, n in length.items()}
    groups = [[0, 1, 2], *([g] for g in range(3, 8))]
    chunks = backend.scorer._token_budget_chunks(groups, questions)
    assert sorted(g for c in chunks for g in c) == sorted(length)
    for chunk in chunks:
        assert len(chunk) <= 3
        stems = sum({questions[g].group: questions[g].stem for g in chunk}.values())
        assert len(chunk) == 1 or len(chunk) * max(length[g] - questions[g].stem for g in chunk) + stems <= 100
    assert chunks[0] == [7]  # longer than the budget alone: still scored, on its own
    assert chunks[1] == [0, 1]  # a stem group stays together while it fits: 2 x 35 + 5 <= 100 < 3 x 35 + 5


def test_a_cpu_scoring_pass_keeps_its_mlp_activations_under_the_heap_limit(tiny_model_dir):
    from transformers import GPT2Config, LlamaConfig

    qwen = LlamaConfig(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
    assert prefix_scorer.cpu_batch_tokens(qwen, 4) == 862  # 862 x 4864 fp32 values: just under 16 MiB
    assert prefix_scorer.cpu_batch_tokens(qwen, 2) == 1724
    assert prefix_scorer.cpu_batch_tokens(GPT2Config(n_embd=768), 4) == 1365  # n_inner unset: 4 x 768 wide
    narrow = LlamaConfig(hidden_size=256, intermediate_size=1024)
    assert prefix_scorer.cpu_batch_tokens(narrow, 4) == prefix_scorer.CPU_MAX_BATCH_TOKENS
    unset = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    assert unset.scorer.default_batch_tokens == prefix_scorer.cpu_batch_tokens(unset.model.config, 4)
    length = {g: 300 for g in range(12)}
    questions = {g: _Question([], [], [], limit=0, length=n, group=g) for g, n in length.items()}
    unset.scorer.default_batch_tokens = 900
    chunks = unset.scorer._token_budget_chunks([[g] for g in length], questions)
    assert [len(c) for c in chunks] == [3, 3, 3, 3]  # 3 x 300 <= 900 < 4 x 300
    unset.scorer.max_batch_tokens = 1200  # a configured cap wins
    assert [len(c) for c in unset.scorer._token_budget_chunks([[g] for g in length], questions)] == [4, 4, 4]


def test_scoring_chunks_by_own_length_across_groups_once_their_stems_are_stored(tiny_model_dir):
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), batch_size=4,
                                              max_batch_tokens=100))
    # two few-shot blocks (stems of 60 tokens, already in the store) and one question of its own
    own = {0: 30, 1: 12, 2: 25, 3: 11, 4: 24, 5: 10, 6: 20}
    group = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2}
    stems = {0: 60, 1: 60, 2: 5}
    questions = {g: _Question([], [], [], limit=0, length=own[g] + stems[group[g]], stem=stems[group[g]],
                              group=group[g], peers=3 if group[g] < 2 else 1) for g in own}
    groups = [[0, 1, 2], [3, 4, 5], [6]]
    chunks = backend.scorer._token_budget_chunks(groups, questions, stems_stored=True)
    assert sorted(g for c in chunks for g in c) == sorted(own)
    # longest own text first, groups mixed; a stored stem costs nothing: 3 x 30 <= 100 < 4 x 30
    assert chunks == [[0, 2, 4], [1, 3, 5, 6]]  # the last joins: 4 x 20 + its own stem of 5 <= 100
    grouped = backend.scorer._token_budget_chunks(groups, questions)
    assert all(len({group[g] for g in c}) == 1 for c in grouped)  # stems not stored: one group per chunk


def test_prefix_cache_reuses_a_stem_in_later_calls_with_the_same_scores(tiny_model_dir):
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), batch_size=8))
    block = "A few-shot block that every question of this run starts with, word for word. " * 5
    prompts = [block + f"Question {k}: which option is better?" for k in range(3)]
    choices = [[" (A)", " (B)"]] * 3
    first_calls, first = _forward_shapes(backend, lambda: backend.score_choices(prompts, choices))
    assert len(backend.scorer._stems) == 1
    later = [block + f"Question {k}: which option is better?" for k in range(3, 6)]
    calls, scores = _forward_shapes(backend, lambda: backend.score_choices(later, choices))
    assert len(first_calls) == 2 and len(calls) == 1  # the block's pass is gone: read from the cache
    _assert_reference_scores(backend, later, choices, scores)
    _, again = _forward_shapes(backend, lambda: backend.score_choices(prompts, choices))
    assert [s for row in again for s in row] == pytest.approx([s for row in first for s in row], abs=1e-5)


def test_prefix_cache_stays_within_its_token_budget(tiny_model_dir):
    budget = 100
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), prefix_cache_tokens=budget))
    for word in ("alpha", "beta", "gamma"):
        block = f"{word} " * 18
        assert budget / 2 < len(backend.tokenizer(block)["input_ids"]) < budget  # two never fit together
        backend.score_choices([block + "one?", block + "two?"], [[" yes", " no"]] * 2)
        assert 0 < sum(len(k) for k in backend.scorer._stems) <= budget
    assert len(backend.scorer._stems) == 1  # the latest block only; the older ones were evicted
    off = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), prefix_cache_tokens=0))
    off.score_choices([block + "one?", block + "two?"], [[" yes", " no"]] * 2)
    assert not off.scorer._stems


def test_shared_stems_are_stored_before_chunking_and_found_again(tiny_model_dir, monkeypatch):
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    blocks = [f"Few-shot block {name}, the same words before every question that uses it. " * 3
              for name in ("one", "two")]
    prompts = [block + f"Question {k}?" for block in blocks for k in range(3)]
    groups = backend._tokenize_choices(prompts, [[" (A)", " (B)"]] * len(prompts))
    questions = [_Question.split(g) for g in groups]
    firsts = [questions[members[0]] for members in _assign_stems(questions)]
    assert len(firsts) == 2 and backend.scorer._store_shared_stems(firsts)
    assert len(backend.scorer._stems) == 2
    # all stored already: nothing computed, on any device (an accelerator has no token budget)
    monkeypatch.setattr(backend.scorer, "device", torch.device("meta"))
    monkeypatch.setattr(backend.scorer, "_forward", None)
    assert backend.scorer._store_shared_stems(firsts)
    small = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), prefix_cache_tokens=40))
    assert not small.scorer._store_shared_stems(firsts)  # the two blocks do not fit the store: chunk by group


def test_common_length_is_the_shared_start_of_two_token_lists():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 12))]
        b = a[:rng.randint(0, len(a))] + [rng.randint(0, 2) for _ in range(rng.randint(0, 4))]
        expected = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_length(a, b) == common_length(tuple(a), b) == common_length(b, a) == expected
