"""KV reuse across generations: a prompt that extends one the model has read prefills only its new
tokens, and nothing it generates changes because of it."""

from __future__ import annotations

import pytest
import torch

from constitutional_ai.backends import kv_reuse
from constitutional_ai.backends.kv_reuse import KVStore
from constitutional_ai.backends.transformers_backend import TransformersBackend
from constitutional_ai.config import CritiqueConfig, GenerationParams, ModelConfig, PromptSourceConfig
from constitutional_ai.constitution.model import Constitution
from constitutional_ai.critique.engine import CritiqueRevisionEngine
from constitutional_ai.data.prompts import load_prompts
from constitutional_ai.models import cpu_linear


def _backend(model_dir, budget: int = 32768, batch_size: int = 3) -> TransformersBackend:
    return TransformersBackend(ModelConfig(model_name_or_path=str(model_dir), batch_size=batch_size,
                                           generation_cache_tokens=budget))


def _critique(backend: TransformersBackend, few_shot: int, temperature: float) -> list[dict]:
    items, _ = load_prompts(PromptSourceConfig(path="embedded:red_team", limit=5))
    config = CritiqueConfig(n_rounds=2, few_shot=few_shot, batch_size=5,
                            generation=GenerationParams(max_new_tokens=12, temperature=temperature))
    return CritiqueRevisionEngine(backend, Constitution.default(), config, seed=3).run(items)


def _trace(records: list[dict]) -> list:
    return [(r["initial_response"], [(x["critique"], x["revision"]) for x in r["rounds"]]) for r in records]


@pytest.mark.parametrize(("which", "few_shot", "temperature"),
                         [("tiny_model_dir", 2, 0.0), ("tiny_model_dir", 0, 0.9), ("tiny_chat_model_dir", 1, 0.0)])
def test_critique_revision_writes_the_same_records_with_and_without_reuse(which, few_shot, temperature, request):
    model_dir = request.getfixturevalue(which)
    plain = _backend(model_dir, budget=0)
    assert plain.kv_store is None
    reusing = _backend(model_dir)
    expected = _trace(_critique(plain, few_shot, temperature))
    got = _trace(_critique(reusing, few_shot, temperature))
    assert got == expected
    store = reusing.kv_store
    # every revision extends its critique's prompt and completion; with few-shot examples the
    # block is computed once and every later critique and revision starts on it
    assert store.reused > store.computed if few_shot else store.reused > 0
    assert 0 < store.tokens <= store.budget


def test_a_prompt_extending_a_generation_prefills_only_its_new_tokens(tiny_model_dir, monkeypatch):
    backend = _backend(tiny_model_dir)
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    first = "Human: Tell me about the weather in a long and careful way, please, with details.\n\nAssistant:"
    text = backend.generate([first], params)[0].text
    follow = first + text + "\n\nHuman: And tomorrow?\n\nAssistant:"
    fed: list[int] = []
    original = backend.model.forward

    def forward(*args, **kwargs):
        fed.append(int(kwargs["input_ids"].shape[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", forward)
    got = backend.generate([follow], params)[0]
    n_first, n_follow = (len(backend._encode(p)) for p in (first, follow))
    # the prefill reads the follow-up's own tokens (at least MIN_OWN), not the prompt and completion before them
    assert fed[0] <= max(n_follow - n_first, kv_reuse.MIN_OWN) < n_follow
    monkeypatch.setattr(backend.model, "forward", original)
    assert got == _backend(tiny_model_dir, budget=0).generate([follow], params)[0]


def test_changed_weights_empty_the_store(tiny_model_dir):
    backend = _backend(tiny_model_dir)
    params = GenerationParams(max_new_tokens=6, temperature=0.0)
    prompt = "Human: Say something about gardens and the plants that grow in them.\n\nAssistant:"
    backend.generate([prompt], params)
    assert len(backend.kv_store) == 1
    with torch.no_grad():
        backend.model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # as an optimiser step would
    reused = backend.kv_store.reused
    again = backend.generate([prompt + " And more"], params)[0]
    assert backend.kv_store.reused == reused  # nothing served from the old weights' KV
    fresh = _backend(tiny_model_dir, budget=0)
    fresh.model.load_state_dict(backend.model.state_dict())
    assert again == fresh.generate([prompt + " And more"], params)[0]


def test_a_model_handed_in_gets_no_store(tiny_model_dir):
    owned = _backend(tiny_model_dir)
    handed = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)), model=owned.model,
                                 tokenizer=owned.tokenizer)
    assert owned.kv_store is not None and handed.kv_store is None


def test_a_hash_collision_costs_reuse_never_correctness(monkeypatch):
    layer = [(torch.zeros(1, 1, 40, 2), torch.zeros(1, 1, 40, 2))]
    store = KVStore(1000)
    store.put(list(range(40)), None, 0, layer)
    assert store.match([*list(range(40)), 7])[1] == 40
    assert store.match(list(range(30)) + [99] * 10)[1] == 30  # extended token by token past the last block
    monkeypatch.setattr(kv_reuse, "hash", lambda _: 0, raising=False)  # every block collides
    collide = KVStore(1000)
    collide.put(list(range(40)), None, 0, layer)
    assert collide.match([5] * 40) == (None, 0)


def test_the_store_keeps_a_shared_start_once_and_within_its_budget():
    def kv(n):
        return [(torch.randn(1, 1, n, 2), torch.randn(1, 1, n, 2))]

    store = KVStore(200)
    block = store.put(list(range(64)), None, 0, kv(64))
    rows = [store.put(list(range(64)) + [100 + r] * 20, block, 64, kv(20)) for r in range(3)]
    assert store.tokens == 64 + 3 * 20  # the block is held once, not once per row
    pieces = rows[1].pieces(70)
    assert [(a, b) for _, a, b in pieces] == [(0, 64), (0, 6)] and pieces[0][0] is block.own
    for r in range(10):
        store.put([1000 + r] * 30, None, 0, kv(30))
        assert store.tokens <= 200
    assert store.match(list(range(64)) + [100] * 20) == (None, 0)  # evicted, least recently used first


def test_small_batch_linear_equals_linear_and_leaves_training_alone():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 1024)
    reference = torch.nn.Linear(64, 1024)
    reference.load_state_dict(layer.state_dict())
    assert cpu_linear.install(layer) == 1 and cpu_linear.install(layer) == 0
    for shape in ((3, 64), (2, 5, 64), (200, 64)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert torch.allclose(layer(x), reference(x), atol=1e-5)
    sliced = torch.randn(8, 40, 64)[:, -33:]  # the last positions an LM head keeps: not contiguous
    with torch.no_grad():
        assert torch.allclose(layer(sliced), reference(sliced), atol=1e-5)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()  # with autograd on it is plain linear, gradients and all
    assert layer.weight.grad is not None and x.grad is not None


def test_a_shared_start_is_evicted_after_the_rows_on_it_and_stays_findable():
    def kv(n):
        return [(torch.randn(1, 1, n, 2), torch.randn(1, 1, n, 2))]

    store = KVStore(64 + 3 * 20)
    block = store.put(list(range(64)), None, 0, kv(64))
    rows = [store.put([*range(64), *[100 + r] * 20], block, 64, kv(20)) for r in range(3)]
    store.match(list(range(70)))  # the block is used again: the rows on it are now older than it
    store.put([*range(64), *[200] * 20], block, 64, kv(20))  # over budget: a row goes, not the block
    assert store.tokens <= store.budget
    assert store.match([*range(64), 5])[1] == 64  # the block's own keys still find it
    assert sum(store.match([*range(64), *[100 + r] * 20])[1] == 84 for r in range(3)) == 2
    assert rows[0].parent is block


def test_an_entry_whose_start_was_evicted_holds_and_counts_all_its_tokens():
    def kv(n, fill):
        return [(torch.full((1, 1, n, 2), fill), torch.full((1, 1, n, 2), fill))]

    store = KVStore(100)
    block = store.put(list(range(40)), None, 0, kv(40, 1.0))
    store.put([500] * 70, None, 0, kv(70, 2.0))  # evicts the block, which has no rows on it yet
    assert store.match(list(range(40)))[0] is None
    row = store.put([*range(40), *[7] * 20], block, 40, kv(20, 3.0))
    assert row is not None and row.parent is None and row.base == 0 and store.tokens <= 100
    keys = row.own[0][0][0, 0, :, 0]
    assert keys[:40].eq(1.0).all() and keys[40:].eq(3.0).all()


def test_sliding_window_models_get_no_store(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from constitutional_ai.backends.kv_reuse import full_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert full_attention(model)
    model.config.sliding_window = 8
    assert not full_attention(model)
