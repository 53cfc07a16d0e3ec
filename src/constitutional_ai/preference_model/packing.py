"""Padding-free PM training: the linear layers see only a batch's real tokens.

A PM batch holds chosen and rejected rows of different lengths, padded to the longest (and to
``pad_to_multiple_of``). On hh-rlhf at 128 tokens a quarter of those positions are padding, and
every matrix product of every layer computes them, forward and backward. Here the rows' real tokens
are packed into one sequence, ``[1, N]`` with per-row position ids, so embeddings, projections,
MLPs and norms run on ``N`` tokens; only attention is computed per row, padded back to
``[rows, width]`` around the SDPA call, where padding costs little (a few percent of a layer's
FLOPs at 128 tokens). The last hidden states are padded back before the model's own head, so
pooling (BERT's first token, a decoder's last non-pad token) stays the model's code.

This is transformers' padding-free convention (packed ``input_ids`` plus ``position_ids``, as with
``DataCollatorWithFlattening``) with an attention function that keeps the per-row cost on every
device: transformers' own SDPA path would attend over a block-diagonal ``N x N`` mask, twice a
layer's work at 32 rows of 128. Not every architecture honours packed position ids or the
attention interface, so a trainer checks, once, that the packed forward gives the padded
forward's rewards (:func:`packing_matches`) before it trains this way.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: The attention implementation name this module registers with transformers.
ATTENTION = "cai_packed_sdpa"
#: The packed forward must reproduce the padded forward's rewards to this (absolute and relative)
#: in fp32, and to :data:`HALF_TOLERANCE` in 16-bit weights or autocast, where two kernels'
#: roundings differ by a few bf16 steps. A structural mismatch (rows attending to each other,
#: positions running on across rows) moves rewards by far more.
TOLERANCE = 1e-4
HALF_TOLERANCE = 5e-2
#: Attention arguments the per-row path does not implement: a model passing one (sliding-window
#: or soft-capped layers) fails :func:`packing_matches` on every batch and trains padded.
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


@dataclass
class PackedRows:
    """Where each real token of a right-padded ``[rows, width]`` batch sits in the packed ``[1, N]`` one."""

    rows: int
    width: int
    keep: torch.Tensor  # [rows, width] bool: the real tokens
    flat: torch.Tensor  # [N]: row * width + position of each real token
    position_ids: torch.Tensor  # [1, N]: each token's position in its own row

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> PackedRows:
        keep = attention_mask.bool()
        rows, width = keep.shape
        lengths = keep.sum(1)
        positions = torch.arange(width, device=keep.device).expand(rows, width)
        if not torch.equal(keep, positions < lengths[:, None]):
            raise ValueError("padding-free training needs right-padded rows (real tokens first in every row)")
        flat = (torch.arange(rows, device=keep.device)[:, None] * width + positions)[keep]
        return cls(rows, width, keep, flat, positions[keep][None])

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[rows, width, ...]`` with zeros at padding (differentiable)."""
        out = _Scatter.apply(packed, self.flat, self.rows * self.width)
        return out.view(self.rows, self.width, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """``[rows, width, ...]`` -> ``[N, ...]``."""
        return padded.reshape(self.rows * self.width, *padded.shape[2:]).index_select(0, self.flat)


class _Scatter(torch.autograd.Function):
    """Rows of ``packed`` scattered into zeros at ``flat``; the backward keeps only the index.

    ``index_copy``'s own backward keeps its whole source alive (every layer's packed q, k and v
    until the backward pass), and a gather from the tokens plus a zero row allocates a copy of a
    new size per batch, which glibc's heap does not reuse (peak memory grew step by step).
    """

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, flat: torch.Tensor, slots: int) -> torch.Tensor:
        ctx.save_for_backward(flat)
        return packed.new_zeros(slots, *packed.shape[1:]).index_copy_(0, flat, packed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (flat,) = ctx.saved_tensors
        return grad.index_select(0, flat), None, None


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature. With ``cai_packed`` (a :class:`PackedRows`) in the
    kwargs, ``query``/``key``/``value`` are ``[1, heads, N, d]`` and attention runs per row; without
    it, this is transformers' SDPA attention, so a model left on this implementation stays correct."""
    rows: PackedRows | None = kwargs.pop("cai_packed", None)
    if rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    def per_row(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, d] -> [rows, h, width, d]
        return rows.pad(x[0].transpose(0, 1)).transpose(1, 2)

    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"padding-free attention does not implement {name}")
    q, k, v = per_row(query), per_row(key), per_row(value)
    mask = rows.keep[:, None, None, :]  # padded keys are never attended to; padded queries are dropped below
    if getattr(module, "is_causal", False) if is_causal is None else is_causal:
        mask = mask & torch.ones(rows.width, rows.width, dtype=torch.bool, device=mask.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return rows.unpad(out.transpose(1, 2))[None], None  # [1, N, heads, d], as transformers expects


#: True while a packed forward runs: its rows carry their own masks, so none is built for it.
_PACKING: contextvars.ContextVar[bool] = contextvars.ContextVar("cai_packing", default=False)


def _mask(*args: Any, **kwargs: Any) -> Any:
    """The mask function for :data:`ATTENTION`: none in a packed forward (transformers would build
    an ``N x N`` block-diagonal one from the packed position ids), SDPA's otherwise, so a padded
    forward on a model left on this implementation keeps its padding mask."""
    if _PACKING.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@functools.cache
def _register() -> None:
    """Once per process: the attention and mask functions under :data:`ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, _mask)


@contextlib.contextmanager
def packed_attention_installed(model: Any) -> Iterator[None]:
    """The model on :data:`ATTENTION` within the block (a no-op when it already is). A trainer keeps
    it installed for the whole of training, because gradient checkpointing recomputes each layer
    in the backward pass, after the forward's :func:`padding_free` block has closed."""
    _register()
    config = _transformers_model(model).config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def _transformers_model(model: Any) -> Any:
    """The transformers model inside accelerate's (DDP, DeepSpeed, compiled) and PEFT wrappers."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packed_length(tokens: int) -> int:
    """The packed length ``tokens`` real tokens are rounded up to: a multiple of 64 (at most 63
    tokens of filler), and above 2,048 tokens a multiple of 1/64 to 1/32 of the length (at most 3%).

    Every batch packing to its own length gives every activation its own size, and glibc's heap
    does not reuse freed blocks of other sizes: training MiniLM on 25 batches of random lengths
    peaked at 2,858 MB packed exactly, 2,501 MB rounded to 32 tokens, 2,337 MB to 64 and 2,307 MB
    padded, and took 44.7 / 43.4 / 42.2 / 52.6 s.
    """
    multiple = max(64, 1 << max(0, tokens.bit_length() - 6))
    return -(-tokens // multiple) * multiple


def _round_up(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of filler appended so that the packed length is :func:`packed_length`."""
    tokens = int(attention_mask.sum())
    extra = packed_length(tokens) - tokens
    width = attention_mask.shape[1]
    if not extra or not width:
        return input_ids, attention_mask
    lengths = [width] * (extra // width) + ([extra % width] if extra % width else [])
    mask = (torch.arange(width, device=attention_mask.device)[None]
            < torch.tensor(lengths, device=attention_mask.device)[:, None]).to(attention_mask.dtype)
    filler = torch.full_like(mask, int(input_ids[0, 0]), dtype=input_ids.dtype)
    return torch.cat([input_ids, filler]), torch.cat([attention_mask, mask])


@contextlib.contextmanager
def padding_free(model: Any) -> Iterator[None]:
    """Within the block, ``model(input_ids, attention_mask)`` on right-padded rows computes its base
    model over the packed real tokens (plus a little filler, :func:`packed_length`) and returns
    what the padded call returns (up to rounding)."""
    inner = _transformers_model(model)
    base = getattr(inner, inner.base_model_prefix)
    original = base.forward
    accepts = inspect.signature(original).parameters

    def forward(self: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        if input_ids is None or attention_mask is None:
            raise ValueError("padding-free training needs input_ids and attention_mask")
        for name in ("position_ids", "token_type_ids", "inputs_embeds"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"padding-free training does not take {name}")
        real = attention_mask.shape[0]
        input_ids, attention_mask = _round_up(input_ids, attention_mask)
        rows = PackedRows.of(attention_mask)
        if "token_type_ids" in accepts:  # BERT's default slices a fixed-length buffer: too short for N tokens
            kwargs["token_type_ids"] = torch.zeros_like(rows.position_ids)
        token = _PACKING.set(True)
        try:
            out = original(input_ids=input_ids[rows.keep][None], position_ids=rows.position_ids, cai_packed=rows,
                           **kwargs)
        finally:
            _PACKING.reset(token)
        hidden = rows.pad(out.last_hidden_state[0])[:real]
        out.last_hidden_state = hidden
        if getattr(self, "pooler", None) is not None and getattr(out, "pooler_output", None) is not None:
            out.pooler_output = self.pooler(hidden)  # it pooled the packed sequence's first token only
        return out

    own = base.__dict__.get("forward")  # an instance-level forward (an accelerate hook) is put back
    base.forward = types.MethodType(forward, base)
    try:
        with packed_attention_installed(model):
            yield
    finally:
        if own is None:
            del base.forward
        else:
            base.forward = own


def packing_matches(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[bool, str]:
    """Whether the packed forward gives the padded forward's outputs on these rows, in eval mode
    (no dropout); and, where not, why. An architecture that ignores packed position ids, attends
    without the attention interface or pools in its base model's own way fails here, not in training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
            with padding_free(model):
                packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
    except Exception as exc:  # any failure of the packed path means: train padded
        return False, f"the packed forward failed ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    if packed.shape != padded.shape:
        return False, f"the packed forward gave shape {tuple(packed.shape)}, not {tuple(padded.shape)}"
    half = padded.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(input_ids.device.type)
    tolerance = HALF_TOLERANCE if half else TOLERANCE
    padded, packed = padded.float(), packed.float()
    worst = float((packed - padded).abs().max())
    if not torch.allclose(packed, padded, atol=tolerance, rtol=tolerance):
        return False, f"the packed forward's rewards differ from the padded ones by up to {worst:.3g}"
    return True, f"packed and padded rewards agree to {worst:.1g}"
