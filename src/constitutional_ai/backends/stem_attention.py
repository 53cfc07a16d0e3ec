"""Shared-stem ("cascade") attention: many questions attend to one few-shot block's KV without copies.

Scoring labels puts a long shared stem (few-shot examples, instructions) before every question. Run
as a batch, each row needs that stem's keys and values, so the usual way copies the stem's KV into
every row and attends over ``[stem | own]`` keys through one big masked kernel call. Attention
splits exactly over disjoint key sets (Hydragen, Juravsky et al. 2024; FlashInfer's cascade
attention): softmax attention over ``[stem | own]`` is the log-sum-exp weighted merge of attention
over the stem and attention over the row's own keys. So the stem part runs once per stem for the
queries of all rows that share it (one unmasked call, the stem's KV read once), the own part is a
small masked call per row, and the stem's KV is never copied or concatenated.

Installed as a transformers attention function (``AttentionInterface``) that is plain ``sdpa``
unless a :func:`sharing_stems` block is active, so generation and training are untouched. It needs
the log-sum-exp of each part, which PyTorch's CPU flash-attention kernel returns; on other devices
the backend keeps the copying path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

#: The attention implementation name registered with transformers.
NAME = "cai_sdpa_stems"


@dataclass
class SharedStems:
    """The stems of one scoring pass: per stem, its per-layer (K, V) of shape ``[1, kv_heads, n, d]``
    (no padding), and which rows of the batch sit on it."""

    kv: list[list[tuple[torch.Tensor, torch.Tensor]]]
    rows: list[torch.Tensor]


#: Attention arguments some models pass that the merge does not implement.
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")

_ACTIVE: ContextVar[SharedStems | None] = ContextVar("cai_shared_stems", default=None)


def available(model: Any) -> bool:
    """Whether ``model`` can use shared-stem attention: sdpa over every key (no sliding windows,
    soft-capping or attention sinks), on a CPU, whose flash kernel returns the log-sum-exp."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if getattr(config, "sub_configs", None):  # multimodal wrappers: leave their towers alone
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    device = next(model.parameters()).device
    return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def install(model: Any) -> bool:
    """Switch ``model`` to shared-stem attention (plain sdpa outside :func:`sharing_stems`); False
    where :func:`available` says no or the model refuses the switch."""
    if not available(model):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return model.config._attn_implementation == NAME


@contextmanager
def sharing_stems(stems: SharedStems) -> Iterator[None]:
    """Forward passes inside attend to ``stems`` before their own keys (the cache must start empty)."""
    token = _ACTIVE.set(stems)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: sdpa, or shared-stem attention inside :func:`sharing_stems`.

    ``query`` is ``[rows, heads, q, d]``; ``key``/``value`` are the rows' own keys (the stems are not
    in the cache); ``attention_mask`` is the additive ``[rows, 1, q, own]`` mask over the own keys,
    which must leave every query at least one key (the backend lets padding see itself).
    """
    stems = _ACTIVE.get()
    if stems is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:  # the backend then scores without shared stems
        raise NotImplementedError(f"shared-stem attention does not implement {unsupported}")
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    groups = getattr(module, "num_key_value_groups", 1)
    _, heads, q_len, dim = query.shape
    own_out, own_lse = flash(query, repeat_kv(key, groups), repeat_kv(value, groups),
                             attn_mask=attention_mask, scale=scaling)
    out = torch.empty_like(own_out)
    for kv, members in zip(stems.kv, stems.rows, strict=True):
        k, v = kv[module.layer_idx]
        n = members.numel()
        # all queries of the rows on this stem as one sequence per key-value head: the `groups` query
        # heads that share a key-value head (grouped-query attention) follow each other, so the
        # stem's keys and values are read as they are stored, never repeated per query head (no
        # mask: every query sees the whole stem): [1, kv_heads, groups * n * q, d]
        q = query.index_select(0, members).transpose(0, 1).reshape(1, k.shape[1], groups * n * q_len, dim)
        stem_out, stem_lse = flash(q, k, v, scale=scaling)
        stem_out = stem_out.reshape(heads, n, q_len, dim).transpose(0, 1)
        stem_lse = stem_lse.reshape(heads, n, q_len).transpose(0, 1)
        mine_lse = own_lse.index_select(0, members)
        total = torch.logaddexp(stem_lse, mine_lse)
        merged = stem_out * (stem_lse - total).exp().unsqueeze(-1) \
            + own_out.index_select(0, members) * (mine_lse - total).exp().unsqueeze(-1)
        out.index_copy_(0, members, merged.to(out.dtype))
    return out.transpose(1, 2).contiguous(), None
