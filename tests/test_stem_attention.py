"""Shared-stem attention: the log-sum-exp merge of stem and own attention equals attention over both."""

import pytest
import torch

from constitutional_ai.backends import prefix_scorer, stem_attention
from constitutional_ai.backends.transformers_backend import TransformersBackend
from constitutional_ai.config import ModelConfig


class _Module:
    def __init__(self, layer_idx: int, groups: int):
        self.layer_idx, self.num_key_value_groups, self.is_causal = layer_idx, groups, True


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_merged_attention_equals_attention_over_stem_and_own_keys(kv_heads):
    torch.manual_seed(0)
    heads, dim, q_len = 4, 16, 7
    stem_lengths = [11, 5]  # two stems of different lengths, no padding
    rows_on = [torch.tensor([0, 2, 3]), torch.tensor([1])]
    stems = [[(torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim)) for _layer in range(2)]
             for n in stem_lengths]
    rows = 4
    query = torch.randn(rows, heads, q_len, dim)
    key, value = torch.randn(rows, kv_heads, q_len, dim), torch.randn(rows, kv_heads, q_len, dim)
    # each row: left padding of a different width, causal among its own real tokens, padding sees itself
    pad = [0, 2, 3, 1]
    allowed = torch.zeros(rows, q_len, q_len, dtype=torch.bool)
    for r, p in enumerate(pad):
        allowed[r, p:, p:] = torch.ones(q_len - p, q_len - p, dtype=torch.bool).tril()
        allowed[r, range(p), range(p)] = True
    own_mask = torch.zeros(rows, 1, q_len, q_len).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    module = _Module(layer_idx=1, groups=heads // kv_heads)

    with stem_attention.sharing_stems(stem_attention.SharedStems(stems, rows_on)):
        merged, _ = stem_attention.attention(module, query, key, value, own_mask, scaling=0.3)
    assert merged.shape == (rows, q_len, heads, dim)

    for stem, members in zip(stems, rows_on, strict=True):
        k_stem, v_stem = stem[1]
        for r in members.tolist():
            k = torch.cat([k_stem[0], key[r]], 1).repeat_interleave(heads // kv_heads, 0)
            v = torch.cat([v_stem[0], value[r]], 1).repeat_interleave(heads // kv_heads, 0)
            mask = torch.cat([torch.ones(q_len, k_stem.shape[2], dtype=torch.bool), allowed[r]], 1)
            expected = torch.nn.functional.scaled_dot_product_attention(query[r], k, v, attn_mask=mask, scale=0.3)
            torch.testing.assert_close(merged[r].transpose(0, 1), expected, atol=1e-5, rtol=1e-5)


def test_outside_a_sharing_block_it_is_plain_sdpa():
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    out, _ = stem_attention.attention(_Module(0, 1), query, key, value, None, scaling=None)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_backend_installs_it_on_cpu_and_generation_is_unchanged(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from constitutional_ai.config import GenerationParams

    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    assert backend.shared_stem_attention and backend.model.config._attn_implementation == stem_attention.NAME
    plain = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)),
                                model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert not plain.shared_stem_attention  # a model handed in (a policy being trained) is left as it is
    assert plain.model.config._attn_implementation == "sdpa"
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    prompts = ["The river", "A long question about bread and how to bake it at home"]
    assert [g.text for g in backend.generate(prompts, params)] == [g.text for g in plain.generate(prompts, params)]


def test_an_attention_argument_it_does_not_implement_falls_back_to_copying_stems(tiny_model_dir, monkeypatch):
    backend = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    block = "A few-shot block that both questions share, word for word, before their own text. " * 6
    prompts, choices = [block + "First?", block + "The second question?"], [[" (A)", " (B)"]] * 2
    expected = [s for row in backend.score_choices(prompts, choices) for s in row]
    backend.clear_prefix_cache()
    assert len(backend.tokenizer(block)["input_ids"]) >= prefix_scorer.MIN_SHARED_STEM
    # pretend the model passes an argument (Llama always passes position_ids) the merge cannot honour
    monkeypatch.setattr(stem_attention, "_UNSUPPORTED", ("position_ids",))
    assert [s for row in backend.score_choices(prompts, choices) for s in row] == pytest.approx(expected, abs=1e-5)
    assert not backend.shared_stem_attention  # switched off for the calls after
    assert [s for row in backend.score_choices(prompts, choices) for s in row] == pytest.approx(expected, abs=1e-5)
