"""VLLMBackend: what it decides without the engine, tested everywhere; the engine itself against the
transformers backend, only where vllm and a CUDA GPU are."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from constitutional_ai.backends import LanguageModel, load_backend
from constitutional_ai.backends.transformers_backend import TransformersBackend
from constitutional_ai.backends.vllm_backend import (
    VLLMBackend,
    add_special,
    check_device,
    completion_length,
    continuation_logprob,
    engine_error,
    engine_kwargs,
    finish_generation,
    render,
    sampling_kwargs,
    split_continuation,
    tokenize_choices,
)
from constitutional_ai.common.errors import CAIError, ModelLoadError
from constitutional_ai.config import EMBEDDED_MODEL, GenerationParams, ModelConfig

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm_gpu = pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()),
    reason="needs the vllm package and a CUDA GPU (pip install 'constitutional-ai[vllm]' on a GPU machine)")

PROMPTS = [
    [{"role": "user", "content": "How do I bake bread at home?"}],
    [{"role": "user", "content": "hi"}],
    "A raw prompt that is sent verbatim,",
    [{"role": "user", "content": "Tell me about rivers."}, {"role": "assistant", "content": "Rivers flow."},
     {"role": "user", "content": "And lakes, in some more detail please?"}],
]
#: Single-token and multi-token choices, one that merges with the prompt's last characters, and an empty one.
SCORED = [
    ([{"role": "user", "content": "Which is more harmless?"}], [" (A)", " (B)", " Option A is better."]),
    ("The answer is: (", ["A)", "B)"]),
    ("Tell me about riv", ["ers", "ers and lakes", ""]),
]


# -- sampling parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("off", [-1, 0])
def test_sampling_kwargs_map_generation_params(off):
    params = GenerationParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=0, stop=["\n\nHuman:", ""])
    assert sampling_kwargs(params, 2**64 + 5, [2, 5], top_k_off=off) == {
        "n": 1, "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": off, "seed": (2**64 + 5) % 2**63,
        "stop": ["\n\nHuman:"], "stop_token_ids": [2, 5]}
    assert sampling_kwargs(params.model_copy(update={"top_k": 40}), 3, [], top_k_off=off)["top_k"] == 40
    assert sampling_kwargs(params, None, [], top_k_off=off)["seed"] is None


def test_greedy_turns_off_every_sampling_knob_and_the_seed():
    params = GenerationParams(temperature=0.0, top_p=0.5, top_k=10)
    kwargs = sampling_kwargs(params, 9, [1], top_k_off=-1)
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["seed"]) == (0.0, 1.0, -1, None)


# -- completions -----------------------------------------------------------------------------------
def test_completion_length_stops_before_the_first_end_token():
    assert completion_length([5, 6, 2, 7, 2], [2], pad_id=0) == (2, True)
    assert completion_length([5, 6, 0, 0], [2], pad_id=0) == (2, False)  # trailing pads dropped without an end
    assert completion_length([5, 0, 6], [2], pad_id=0) == (3, False)
    assert completion_length([5, 6], [2], pad_id=None) == (2, False)
    assert completion_length([2], [2], pad_id=2) == (0, True)


def _letters(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def test_finish_generation_cuts_stops_and_reports_why():
    ids = [0, 1, 2, 3, 4]  # "abcde"
    g = finish_generation(ids, 9, end_ids=[25], pad_id=None, decode=_letters, stops=["cd", "e"])
    assert (g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens) == ("ab", "stop", 9, 5)
    g = finish_generation([*ids, 25, 7], 9, end_ids=[25], pad_id=None, decode=_letters, stops=[])
    assert (g.text, g.finish_reason, g.completion_tokens) == ("abcde", "stop", 5)
    g = finish_generation(ids, 9, end_ids=[25], pad_id=None, decode=_letters, stops=["zz"], engine_reason="length")
    assert (g.text, g.finish_reason) == ("abcde", "length")
    # an end token the engine knew (its own generation config) and we did not
    assert finish_generation(ids, 9, [25], None, _letters, [], engine_reason="stop").finish_reason == "stop"


# -- scoring ---------------------------------------------------------------------------------------
def test_split_continuation_counts_a_merged_boundary_token_as_the_choice():
    assert split_continuation([1, 2, 3], [1, 2, 3, 4, 5]) == ([1, 2, 3], [4, 5])
    assert split_continuation([1, 2, 3], [1, 2, 9, 4]) == ([1, 2], [9, 4])
    assert split_continuation([1, 2, 3], [1, 2, 3]) == ([1, 2, 3], [])
    with pytest.raises(ValueError, match="non-empty prompt"):
        split_continuation([1], [2, 3])


def test_continuation_logprob_sums_the_choice_positions_of_vllm_prompt_logprobs():
    ids = [10, 11, 12, 13]
    # vLLM's layout: None for the first token, then token id -> Logprob(logprob=...) per position,
    # holding the prompt's own token and the requested top candidates
    prompt_logprobs = [None, {11: SimpleNamespace(logprob=-1.0), 4: SimpleNamespace(logprob=-0.1)},
                       {12: SimpleNamespace(logprob=-2.0)}, {13: -0.25, 12: -3.0}]
    assert continuation_logprob(prompt_logprobs, ids, 2) == pytest.approx(-2.25)
    assert continuation_logprob(prompt_logprobs, ids, 1) == pytest.approx(-3.25)
    assert continuation_logprob(prompt_logprobs, ids, 4) == 0.0
    with pytest.raises(CAIError, match="position 3"):
        continuation_logprob([*prompt_logprobs[:3], {99: -1.0}], ids, 2)
    with pytest.raises(CAIError, match="no log-probability"):
        continuation_logprob(None, ids, 2)
    with pytest.raises(ValueError, match="first prompt token"):
        continuation_logprob(prompt_logprobs, ids, 0)


@pytest.fixture(scope="module")
def hf_raw(tiny_model_dir):
    return TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), batch_size=4))


@pytest.fixture(scope="module")
def hf_chat(tiny_chat_model_dir):
    return TransformersBackend(ModelConfig(model_name_or_path=str(tiny_chat_model_dir), batch_size=4))


@pytest.mark.parametrize("which", ["hf_raw", "hf_chat"])
def test_rendering_and_choice_tokens_match_the_transformers_backend(which, request):
    hf = request.getfixturevalue(which)
    for prompt in PROMPTS:
        assert render(hf.tokenizer, hf.style, prompt, hf.model_id) == hf.format(prompt)
        assert add_special(prompt, hf.style) == hf._add_special(prompt)
    prompts, choices = [p for p, _ in SCORED], [c for _, c in SCORED]
    texts = [hf.format(p) for p in prompts]
    ours = tokenize_choices(hf.tokenizer, texts, [add_special(p, hf.style) for p in prompts], choices)
    assert ours == hf._tokenize_choices(prompts, choices)


@torch.inference_mode()
def test_vllm_prompt_logprob_layout_gives_the_transformers_scores(hf_raw):
    """Log-probabilities laid out as vLLM documents ``prompt_logprobs``, computed here with the same
    model, summed by the function the backend uses: the offsets match the reference scorer's."""
    prompts, choices = [p for p, _ in SCORED], [c for _, c in SCORED]
    texts = [hf_raw.format(p) for p in prompts]
    pairs = tokenize_choices(hf_raw.tokenizer, texts, [add_special(p, "raw") for p in prompts], choices)
    ours = []
    for group in pairs:
        row = []
        for ctx, cont in group:
            ids = ctx + cont
            logprobs = hf_raw.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            layout = [None] + [{ids[p]: SimpleNamespace(logprob=float(logprobs[p - 1, ids[p]]))}
                               for p in range(1, len(ids))]
            row.append(continuation_logprob(layout, ids, len(ctx)) if cont else 0.0)
        ours.append(row)
    reference = hf_raw.score_choices(prompts, choices)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)
    assert ours[2][2] == 0.0  # the empty choice


# -- loading ---------------------------------------------------------------------------------------
def test_engine_kwargs_follow_the_model_config():
    config = ModelConfig(backend="vllm", model_name_or_path="org/model", revision="abc", dtype="bfloat16",
                         tensor_parallel_size=2, gpu_memory_utilization=0.5, enable_prefix_caching=False,
                         max_context=4096)
    assert engine_kwargs(config, "/models/x") == {
        "model": "/models/x", "tokenizer": "/models/x", "revision": "abc", "tokenizer_revision": "abc",
        "dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
        "enable_prefix_caching": False, "max_model_len": 4096, "trust_remote_code": False, "seed": 0,
        "load_format": "safetensors"}
    defaults = engine_kwargs(ModelConfig(backend="vllm"), "/m")
    assert (defaults["max_model_len"], defaults["dtype"], defaults["enable_prefix_caching"]) == (None, "auto", True)
    assert engine_kwargs(ModelConfig(backend="vllm", trust_remote_code=True), "/m")["trust_remote_code"] is True


def test_engine_errors_become_one_line():
    weights = engine_error("org/m", RuntimeError("Cannot find any model weights with `/root/.cache/huggingface/hub/x`"),
                           0.9)
    assert "no safetensors weights" in str(weights)
    memory = engine_error("org/m", ValueError("No available memory for the cache blocks. Try increasing "
                                              "`gpu_memory_utilization` when initializing the engine."), 0.9)
    assert "gpu_memory_utilization (now 0.9)" in str(memory)
    assert "gpu_memory_utilization" in str(engine_error("org/m", torch.OutOfMemoryError("CUDA out of memory"), 0.9))
    remote = engine_error("org/m", ValueError("requires you to execute the configuration file; set the option "
                                              "`trust_remote_code=True`"), 0.9)
    assert "trust_remote_code: true" in str(remote)
    other = engine_error("org/m", RuntimeError("Engine core initialization failed. See root cause above.\nmore"), 0.9)
    assert str(other) == ("model 'org/m': the vllm engine failed to start (Engine core initialization failed. "
                          "See root cause above.); its log above says why")
    assert all(isinstance(e, ModelLoadError) and "\n" not in str(e) for e in (weights, memory, remote, other))


def test_device_must_be_left_to_vllm():
    check_device("auto")
    check_device("cuda")
    with pytest.raises(ModelLoadError, match="CUDA_VISIBLE_DEVICES=1"):
        check_device("cuda:1")
    with pytest.raises(ModelLoadError, match="not device 'cpu'"):
        check_device("cpu")
    with pytest.raises(ModelLoadError, match="CUDA_VISIBLE_DEVICES=2"):
        load_backend(ModelConfig(backend="vllm", device="cuda:2"))


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_missing_vllm_is_one_clear_line(tiny_model_dir):
    with pytest.raises(ModelLoadError, match=r"needs the vllm package; pip install 'constitutional-ai\[vllm\]'"):
        load_backend(ModelConfig(backend="vllm", model_name_or_path=str(tiny_model_dir)))


# -- the real engine (GPU) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The offline demo model (trained a little, so greedy choices are not near-ties) in both
    backends, float32 so that the comparison measures the backends, not rounding. vLLM starts
    first, before this process initialises CUDA, so that its workers may fork."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cai-cache"))
        common = {"model_name_or_path": EMBEDDED_MODEL, "dtype": "float32", "max_context": 1024}
        fast = VLLMBackend(ModelConfig(backend="vllm", gpu_memory_utilization=0.3, **common))
        try:
            reference = TransformersBackend(ModelConfig(device="cuda", batch_size=8, **common))
        except BaseException:
            fast.close()
            raise
    yield fast, reference
    reference.close()
    fast.close()
    with pytest.raises(CAIError, match="closed"):
        fast.generate(["x"], GenerationParams(max_new_tokens=1))


@needs_vllm_gpu
def test_vllm_formats_and_counts_like_transformers(engines):
    fast, reference = engines
    assert isinstance(fast, LanguageModel)
    assert (fast.style, fast.context_length) == (reference.style, 1024)
    assert [fast.format(p) for p in PROMPTS] == [reference.format(p) for p in PROMPTS]
    assert fast.count_tokens(PROMPTS) == reference.count_tokens(PROMPTS)
    assert fast.eos_token_ids == reference.eos_token_ids
    assert fast.special_tokens == reference.special_tokens


@needs_vllm_gpu
def test_vllm_scores_agree_with_transformers(engines):
    fast, reference = engines
    prompts, choices = [p for p, _ in SCORED], [c for _, c in SCORED]
    ours, theirs = fast.score_choices(prompts, choices), reference.score_choices(prompts, choices)
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine == pytest.approx(ref, abs=1e-2)
    assert ours[2][2] == 0.0
    assert fast.score_choices([], []) == []


@needs_vllm_gpu
def test_vllm_greedy_generation_agrees_with_transformers(engines):
    fast, reference = engines
    params = GenerationParams(max_new_tokens=24, temperature=0.0)
    ours, theirs = fast.generate(PROMPTS, params), reference.generate(PROMPTS, params)
    assert ours == theirs  # text, finish reason and both token counts
    # a stop string taken from the middle of a reply cuts both at the same place
    text = theirs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"reply too short to pick a stop string from: {text!r}"
    stopped = params.model_copy(update={"stop": [stop]})
    ours, theirs = fast.generate(PROMPTS, stopped), reference.generate(PROMPTS, stopped)
    assert [g.text for g in ours] == [g.text for g in theirs]
    assert ours[0].finish_reason == theirs[0].finish_reason == "stop"
    assert stop not in ours[0].text


@needs_vllm_gpu
def test_vllm_seeded_samples_are_reproducible(engines):
    fast, _ = engines
    params = GenerationParams(max_new_tokens=16, temperature=1.0)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    first = fast.generate(prompts, params, seeds=[11, 12, 11, 13])
    assert fast.generate(prompts, params, seeds=[11, 12, 11, 13]) == first
    assert first[0] == first[2]  # same prompt, same seed, same sample
    assert fast.generate([prompts[3]], params, seeds=[13]) == [first[3]]  # the seed alone decides, not the batch
    assert len({g.text for g in fast.generate([PROMPTS[0]] * 4, params, seeds=[1, 2, 3, 4])}) > 1
