"""Write a small Llama checkpoint with a byte-level BPE tokenizer as GGUF, for llama.cpp.

Tests and ``benchmarks/bench_backends.py`` serve the tiny models of :mod:`constitutional_ai.models.tiny`
with llama.cpp's server to exercise the OpenAI-compatible backend against a real engine, offline.
That needs a GGUF file made on the spot, and llama.cpp's own ``convert_hf_to_gguf.py`` is not
installable from a package registry. This covers exactly that shape (Llama blocks, GPT-2-style
byte-level BPE, float32); for real models use llama.cpp's converter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (halves) to GGML's (interleaved pairs), as llama.cpp's converter does."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _merges(tokenizer_json: dict[str, Any]) -> list[str]:
    merges = tokenizer_json["model"].get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def export_llama_gguf(model_dir: str | Path, out_path: str | Path) -> Path:
    """Convert ``model_dir`` (``LlamaForCausalLM`` + fast byte-level BPE tokenizer) to one GGUF file."""
    import gguf
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir, out_path = Path(model_dir), Path(out_path)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    tok_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok_json["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(tok_json.get("pre_tokenizer")):
        raise ValueError(f"{model_dir}: only byte-level BPE tokenizers are supported here")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tok_json))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    def put(name: str, tensor: Any) -> None:
        writer.add_tensor(name, np.ascontiguousarray(tensor.detach().float().numpy()))

    inner = model.model
    put("token_embd.weight", inner.embed_tokens.weight)
    put("output_norm.weight", inner.norm.weight)
    put("output.weight", model.lm_head.weight)
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        put(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          np.ascontiguousarray(_permute(attn.q_proj.weight.detach().numpy(), cfg.num_attention_heads)))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          np.ascontiguousarray(_permute(attn.k_proj.weight.detach().numpy(), n_kv)))
        put(f"blk.{i}.attn_v.weight", attn.v_proj.weight)
        put(f"blk.{i}.attn_output.weight", attn.o_proj.weight)
        put(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        put(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        put(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        put(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
