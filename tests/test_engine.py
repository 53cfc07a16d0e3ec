from collections import Counter

import pytest

from conftest import ScriptedBackend
from constitutional_ai.backends.transformers_backend import TransformersBackend
from constitutional_ai.common.text import clean_completion
from constitutional_ai.config import CritiqueConfig, GenerationParams, ModelConfig
from constitutional_ai.constitution import Constitution
from constitutional_ai.critique import CritiqueRevisionEngine
from constitutional_ai.data.prompts import PromptItem, conversation_key


def _items(n):
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"question number {i}?"}]
        out.append(PromptItem(key=conversation_key(messages), messages=messages, index=i))
    return out


def _engine(backend, seed=0, **kw):
    return CritiqueRevisionEngine(backend, Constitution.default(), CritiqueConfig(**kw), seed=seed)


def test_batch_advances_step_by_step_with_one_generate_call_per_step():
    backend = ScriptedBackend()
    records = _engine(backend, n_rounds=3).run(_items(5))
    # 1 initial + 3 x (critique + revision), each call carrying the whole batch
    assert len(backend.calls) == 7
    assert all(len(call) == 5 for call in backend.calls)
    kinds = ["critique" if c[0].rstrip().endswith("Critique:") else "revision" for c in backend.calls[1:]]
    assert kinds == ["critique", "revision"] * 3
    assert len(records) == 5 and all(len(r["rounds"]) == 3 for r in records)


def test_revision_is_conditioned_on_the_critique_and_the_latest_response():
    answers = iter(range(1000))
    backend = ScriptedBackend(answer=lambda p, n: f" text-{next(answers)}")
    record = _engine(backend, n_rounds=2).run(_items(1))[0]
    first, second = record["rounds"]
    revision_prompt_round1 = backend.calls[2][0]
    assert first["critique"] in revision_prompt_round1 and first["critique_request"] in revision_prompt_round1
    assert first["revision_request"] in revision_prompt_round1
    # round 2 critiques the round-1 revision, not the initial response
    critique_prompt_round2 = backend.calls[3][0]
    assert first["revision"] in critique_prompt_round2
    assert record["initial_response"] not in critique_prompt_round2
    assert record["final_response"] == second["revision"]


def test_principles_are_sampled_per_round_reproducibly_and_with_replacement():
    backend = ScriptedBackend()
    engine = _engine(backend, n_rounds=4)
    items = _items(200)
    draws = [tuple(p.id for p in engine.principles_for(it.key)) for it in items]
    assert draws == [tuple(p.id for p in engine.principles_for(it.key)) for it in items]
    assert draws != [tuple(p.id for p in _engine(backend, seed=1, n_rounds=4).principles_for(it.key)) for it in items]
    counts = Counter(pid for d in draws for pid in d)
    assert len(counts) == 16  # every principle gets used
    assert any(len(set(d)) < 4 for d in draws)  # with replacement: repeats within a prompt happen
    # the record carries exactly the sampled principles
    records = engine.run(items[:3])
    assert [tuple(r["principle_id"] for r in rec["rounds"]) for rec in records] == draws[:3]


def test_skip_critique_ablation_asks_for_revisions_only():
    backend = ScriptedBackend()
    records = _engine(backend, n_rounds=2, skip_critique=True).run(_items(3))
    assert len(backend.calls) == 3
    for call in backend.calls[1:]:
        assert all("CritiqueRequest" not in p and p.rstrip().endswith("Revision:") for p in call)
    assert all(r["critique"] is None for rec in records for r in rec["rounds"])


def test_few_shot_prefix_is_prepended_in_raw_and_chat_styles():
    c = Constitution.default()
    example = c.critique_examples[0]
    raw = ScriptedBackend(style="raw")
    _engine(raw, n_rounds=1, few_shot=1).run(_items(1))
    assert raw.calls[1][0].startswith("\n\nHuman: " + example.messages[0].content)
    assert example.critique in raw.calls[1][0]
    chat = ScriptedBackend(style="chat")
    _engine(chat, n_rounds=1, few_shot=2).run(_items(1))
    critique_prompt = chat.calls[1][0]
    assert critique_prompt[0]["content"] == example.messages[0].content
    assert critique_prompt[-1]["role"] == "user"
    assert sum(1 for m in critique_prompt if m["content"] == example.revision) == 1


def test_raw_style_adds_turn_stop_sequences_and_chat_does_not():
    raw, chat = ScriptedBackend(style="raw"), ScriptedBackend(style="chat")
    _engine(raw, n_rounds=1).run(_items(1))
    _engine(chat, n_rounds=1).run(_items(1))
    assert "\n\nHuman:" in raw.params[0].stop
    assert chat.params[0].stop == []


@pytest.mark.parametrize(("text", "expected"), [
    (" Revision: Here is a safer answer.", "Here is a safer answer."),
    ("Here is a safer answer.\n\nHuman: and now?", "Here is a safer answer."),
    (" A fine reply.\nCritiqueRequest: more", "A fine reply."),
    ("critique:  The reply is rude.\n\nRevisionRequest: x", "The reply is rude."),
    ("  plain  ", "plain"),
])
def test_clean_completion(text, expected):
    assert clean_completion(text) == expected


def test_records_carry_the_full_trace():
    backend = ScriptedBackend(answer=lambda p, n: " Revision: cleaned text\n\nHuman: echo")
    record = _engine(backend, seed=3, n_rounds=2).run(_items(1))[0]
    assert set(record) >= {"key", "prompt", "initial_response", "rounds", "final_response", "model_id",
                           "constitution_hash", "seed", "timings", "tokens"}
    assert record["constitution_hash"] == Constitution.default().hash
    assert record["seed"] == 3
    assert record["rounds"][0]["revision"] == "cleaned text"
    assert {"initial", "critique_1", "revision_1", "critique_2", "revision_2", "total"} <= set(record["timings"])
    assert record["tokens"] == {"prompt": 5, "completion": 15}


def test_empty_revision_keeps_the_previous_response():
    backend = ScriptedBackend(answer=lambda p, n: "" if n == 3 else f" out {n}")
    record = _engine(backend, n_rounds=2).run(_items(1))[0]
    assert record["rounds"][0]["revision"] == ""
    assert "out 1" in backend.calls[3][0]  # round 2 critiques the initial response again


def test_batched_and_one_at_a_time_runs_give_the_same_records_under_greedy(tiny_model_dir):
    def run(batch_size):
        backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), batch_size=batch_size))
        engine = CritiqueRevisionEngine(backend, Constitution.default(), CritiqueConfig(
            n_rounds=2, generation=GenerationParams(max_new_tokens=12, temperature=0.0)), seed=0)
        items = _items(6)
        if batch_size == 1:
            return [engine.run([it])[0] for it in items]
        return engine.run(items)

    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("timings",)} for r in recs]  # noqa: E731
    batched, single = strip(run(6)), strip(run(1))
    assert batched == single
    assert len({r["final_response"] for r in batched}) > 1


def test_a_system_prompt_stays_first_ahead_of_the_few_shot_examples():
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello?"}]
    item = PromptItem(key=conversation_key(messages), messages=messages, index=0)
    chat, raw = ScriptedBackend(style="chat"), ScriptedBackend(style="raw")
    _engine(chat, n_rounds=1, few_shot=1).run([item])
    _engine(raw, n_rounds=1, few_shot=1).run([item])
    for (prompt,) in chat.calls[1:]:
        assert [m["role"] for m in prompt].count("system") == 1 and prompt[0]["role"] == "system"
    for (prompt,) in raw.calls[1:]:
        assert prompt.startswith("You are terse.\n\nHuman: ")
