"""Padding-free PM training: the linear layers see only a batch's real tokens.

A PM batch holds chosen and rejected rows of different lengths, padded to the longest (and to
``pad_to_multiple_of``). On hh-rlhf at 128 tokens a quarter of those positions are padding, and
every matrix product of every layer computes them, forward and backward. Here the rows' real tokens
are packed into one sequence, ``[1, N]`` with per-row position ids, so embeddings, projections,
MLPs and norms run on ``N`` tokens; only attention is computed per row, each row padded to its
own length rounded up to :data:`ATTENTION_WIDTH` around the SDPA calls (one per width), where
padding costs little. The last hidden states are padded back before the model's own head, so
pooling (BERT's first token, a decoder's last non-pad token) stays the model's code.

The head reads one position per row, so the last layer computes the rest for nothing: past its
keys and values (which every position's query attends to), it runs its query projection,
attention output and MLP only for the positions a sequence-classification head can pool (each
row's first and last token, and its rightmost non-pad token), ``pooled_only``. That is 68-88% of
the last layer's work: about a tenth of a 6-layer MiniLM's, half of a 2-layer model's. The last
hidden states are then exact at those positions only, which is all a reward needs.

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
import copy
import functools
import inspect
import types
import weakref
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
#: Attention pads each row to its length rounded up to this, not to the batch's width: a few
#: groups of rows per batch, each one SDPA call.
ATTENTION_WIDTH = 32
#: Per family whose heads pool one position: the last layer's attention module (called with the
#: packed rows, ``cai_packed``, first in the layer) and its per-token parts past its keys and
#: values. BERT-style encoders, then Llama/Qwen-style decoders. A part left out costs speed only;
#: one that is not per-token fails :func:`packing_matches`.
_POOLED_ONLY = (("attention", ("attention.self.query", "attention.output", "feed_forward_chunk")),
                ("self_attn", ("self_attn.q_proj", "self_attn.o_proj", "mlp")))


@dataclass
class PackedRows:
    """Where each real token of a right-padded ``[rows, width]`` batch sits in the packed ``[1, N]`` one."""

    rows: int
    width: int
    keep: torch.Tensor  # [rows, width] bool: the real tokens
    flat: torch.Tensor  # [N]: row * width + position of each real token
    position_ids: torch.Tensor  # [1, N]: each token's position in its own row
    pooled: torch.Tensor | None = None  # [M], sorted: the only positions the last layer computes (None: all)

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

    def poolable(self, input_ids: torch.Tensor, rows: int, pad_token_id: int | None) -> torch.Tensor:
        """Packed positions of what a sequence-classification head can read in the first ``rows``
        rows: the first token (BERT's pooler), the last one, and the rightmost token that is not
        ``pad_token_id`` (transformers' decoder rule, where a row may end in pad-id tokens)."""
        lengths, starts = self._lengths_and_starts
        nonempty = lengths[:rows] > 0
        lengths, starts = lengths[:rows][nonempty], starts[:rows][nonempty]
        picked = [starts, starts + lengths - 1]
        if pad_token_id is not None:
            real = input_ids[:rows][nonempty]
            width = torch.arange(real.shape[1], device=real.device)
            rightmost = (width * (real != pad_token_id)).argmax(-1)
            picked.append((starts + rightmost)[rightmost < lengths])
        return torch.unique(torch.cat(picked))

    @functools.cached_property
    def _lengths_and_starts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's length and the packed position of its first token."""
        lengths = self.keep.sum(1)
        return lengths, torch.cumsum(lengths, 0) - lengths

    @functools.cached_property
    def _attention_layout(self) -> tuple[list[_AttentionGroup], torch.Tensor, torch.Tensor]:
        lengths, starts = self._lengths_and_starts
        widths = ((lengths + ATTENTION_WIDTH - 1) // ATTENTION_WIDTH * ATTENTION_WIDTH).clamp(max=self.width)
        slot_of = torch.empty(int(lengths.sum()), dtype=torch.long, device=self.keep.device)
        groups, sources, offset = [], [], 0
        for width in sorted(set(widths[lengths > 0].tolist())):
            members = ((widths == width) & (lengths > 0)).nonzero().squeeze(1)
            keep = self.keep[members, :width]
            start = starts[members][:, None]
            source = torch.where(keep, start + torch.arange(width, device=keep.device), start)
            slot_of[source[keep]] = offset + torch.arange(keep.numel(), device=keep.device).view_as(keep)[keep]
            groups.append(_AttentionGroup(keep))
            sources.append(source.flatten())
            offset += keep.numel()
        return groups, torch.cat(sources), slot_of

    @property
    def attention_groups(self) -> list[_AttentionGroup]:
        """The rows by width for attention: each row padded to its length rounded up to
        :data:`ATTENTION_WIDTH`, not to the batch's width (hh-rlhf at 128 tokens: 0.71 of the
        attention work of padding every row to 128)."""
        return self._attention_layout[0]

    def to_slots(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, heads, d]`` -> every group's padded rows end to end, ``[S, heads, d]``; a padding
        slot holds its row's first token (masked as a key, dropped as a query)."""
        _, source, slot_of = self._attention_layout
        return _Gather.apply(tokens, source, slot_of)

    def from_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``[S, heads, d]`` -> ``[N, heads, d]``: each token's own slot."""
        return slots.index_select(0, self._attention_layout[2])

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[rows, width, ...]`` with zeros at padding (differentiable)."""
        out = _Scatter.apply(packed, self.flat, self.rows * self.width)
        return out.view(self.rows, self.width, *packed.shape[1:])


@dataclass
class _AttentionGroup:
    """Rows of one attention width."""

    keep: torch.Tensor  # [rows, width] bool

    def of(self, slots: torch.Tensor) -> torch.Tensor:
        """This group's share of the slots, ``[rows * width, heads, d]`` -> ``[rows, heads, width, d]`` (a view)."""
        return slots.view(*self.keep.shape, *slots.shape[1:]).transpose(1, 2)


class _Gather(torch.autograd.Function):
    """``tokens[source]`` whose backward gathers too: each token's gradient is its own slot's
    (``slot_of``); the padding slots that also read a token pass it exactly zero (no query attends
    to a padded key, and padded queries' outputs are dropped), so they are left out rather than
    summed in, which saves the zeros and the scatter-add of an ordinary gather's backward."""

    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, source: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot_of)
        return tokens.index_select(0, source)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (slot_of,) = ctx.saved_tensors
        return grad.index_select(0, slot_of), None, None


class _Scatter(torch.autograd.Function):
    """Rows of ``packed`` scattered into zeros at ``flat``; the backward keeps only the index.

    ``index_copy``'s own backward keeps its whole source alive until the backward pass, and a
    gather from the tokens plus a zero row allocates a copy of a new size per batch, which glibc's
    heap does not reuse (peak memory grew step by step).
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

    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"padding-free attention does not implement {name}")
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    groups = rows.attention_groups
    sizes = [group.keep.numel() for group in groups]
    # squeeze, not [0], and split, not slices: their backward passes allocate no zeros
    q_slots, k_slots, v_slots = (rows.to_slots(x.squeeze(0).transpose(0, 1)).split(sizes) for x in (query, key, value))
    outs = []
    for group, q, k, v in zip(groups, q_slots, k_slots, v_slots, strict=True):
        q, k, v = group.of(q), group.of(k), group.of(v)  # [rows, heads, width, d]
        # padded keys are never attended to, padded queries are dropped below; in causal rows, padded
        # right, no real query reaches a padded key, so the causal kernel needs no mask (and skips
        # the blocks above the diagonal)
        mask = None if causal else group.keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             is_causal=bool(causal), enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out.transpose(1, 2).flatten(0, 1))  # [rows * width, heads, d]
    return rows.from_slots(outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0), None  # [1, N, heads, d]


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
    """Within the block, the model takes packed forwards: it is on :data:`ATTENTION`, and its last
    layer computes only the pooled positions of a packed forward that names them (a no-op where it
    already is; unpacked forwards are unchanged). A trainer keeps this for the whole of training,
    because gradient checkpointing recomputes each layer in the backward pass, after the forward's
    :func:`padding_free` block has closed; the last layer's hooks see the packed rows again then."""
    _register()
    inner = _transformers_model(model)
    config = inner.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        with _pooled_only_installed(inner):
            yield
    finally:
        config._attn_implementation = previous


def _last_layer(model: Any) -> torch.nn.Module | None:
    """The model's last transformer layer (transformers' layers are ``GradientCheckpointingLayer``s)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
              and all(isinstance(layer, GradientCheckpointingLayer) for layer in m)]
    return stacks[-1][-1] if stacks else None


#: The layers :func:`_pooled_only_installed` has patched now (not an attribute: a deepcopy taken
#: meanwhile gets its own methods back, and may be installed on its own).
_POOLED_ONLY_LAYERS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


class _Uncopied:
    """A hook or method the pooled-only layer installs, which a deepcopy of the model (an EMA or
    reference copy taken mid-training) does not take along: the copy gets its own method back (or a
    no-op hook) instead of a closure that would run the original's weights in the copy's forward."""

    def __init__(self, call: Any, wrapped: Any = None, owner: Any = None, attr: str = "", own: Any = None) -> None:
        self._call, self._owner, self._attr, self._own = call, owner, attr, own
        if wrapped is not None:  # wrapped's signature: transformers' chunking counts its parameters
            functools.update_wrapper(self, wrapped, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if self._owner is None:
            return lambda *args, **kwargs: None
        if self._own is not None:
            return copy.deepcopy(self._own, memo)
        owner = copy.deepcopy(self._owner, memo)  # the copy (in memo already when copied with its module)
        return getattr(type(owner), self._attr).__get__(owner)


@contextlib.contextmanager
def _pooled_only_installed(model: Any) -> Iterator[None]:
    """The last layer's per-token parts (:data:`_POOLED_ONLY`) compute, in a packed forward whose
    rows name ``pooled`` positions, those positions only (zeros elsewhere).

    The layer's attention module is called first and with the rows, and its pre-hook says what
    the parts after it select. transformers checkpoints a layer's ``forward`` (the layer's own
    hooks stay outside), so this hook runs again, with the same rows, when the backward pass
    recomputes the layer; and it runs on every forward, so an unpacked one resets it.
    """
    layer = _last_layer(model)
    family = next(((attention, parts) for attention, parts in _POOLED_ONLY
                   if isinstance(getattr(layer, attention, None), torch.nn.Module)), None)
    if family is None or layer in _POOLED_ONLY_LAYERS:
        yield
        return
    attention, parts = family
    selected: list[tuple[torch.Tensor, int] | None] = [None]  # the pooled positions, of a packed length

    def select(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows = kwargs.get("cai_packed")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        selected[0] = ((rows.pooled, hidden.shape[1]) if rows is not None and rows.pooled is not None
                       and isinstance(hidden, torch.Tensor) else None)

    def only_pooled(run: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            n = args[0].shape[1] if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1 else None
            if selected[0] is None or n != selected[0][1]:
                # unpacked, or called on a slice of the positions (``chunk_size_feed_forward``
                # chunks the MLP): the pooled indices name positions of the whole packed row
                return run(*args, **kwargs)
            pooled = selected[0][0]

            def pick(a: Any) -> Any:  # [1, n, ...] -> [1, pooled, ...]; other arguments as they are
                return a.index_select(1, pooled) if isinstance(a, torch.Tensor) and a.shape[:2] == (1, n) else a

            out = run(*map(pick, args), **{k: pick(v) for k, v in kwargs.items()})
            if not isinstance(out, torch.Tensor) or out.shape[:2] != (1, len(pooled)):
                raise TypeError(f"{type(layer).__name__}'s pooled-only part returned {type(out).__name__}, "
                                "not one tensor per position")
            return _Scatter.apply(out[0], pooled, n)[None]
        return forward

    patched = []
    handle = getattr(layer, attention).register_forward_pre_hook(_Uncopied(select), with_kwargs=True)
    _POOLED_ONLY_LAYERS.add(layer)
    try:  # everything patched so far is put back, even if patching a later part fails
        for path in parts:
            owner_path, _, name = path.rpartition(".")
            try:
                owner = layer.get_submodule(owner_path)
            except AttributeError:
                continue
            part = getattr(owner, name, None)
            obj, attr = (part, "forward") if isinstance(part, torch.nn.Module) else (owner, name)
            run = getattr(obj, attr, None)
            if part is None or not callable(run):
                continue
            own = obj.__dict__.get(attr)
            patched.append((obj, attr, own))
            setattr(obj, attr, _Uncopied(only_pooled(run), run, obj, attr, own))
        yield
    finally:
        handle.remove()
        for obj, attr, own in reversed(patched):
            if own is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)
        _POOLED_ONLY_LAYERS.discard(layer)


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
def padding_free(model: Any, pooled_only: bool = True) -> Iterator[None]:
    """Within the block, ``model(input_ids, attention_mask)`` on right-padded rows computes its base
    model over the packed real tokens (plus a little filler, :func:`packed_length`) and returns
    what the padded call returns (up to rounding). ``pooled_only``: the last layer computes only
    the positions a sequence-classification head pools; the last hidden states are exact there."""
    inner = _transformers_model(model)
    pad_token_id = getattr(inner.config.get_text_config(), "pad_token_id", None)
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
        if pooled_only:
            rows.pooled = rows.poolable(input_ids, real, pad_token_id)
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


def packing_matches(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pooled_only: bool = True, half: bool = False) -> tuple[bool, str]:
    """Whether the packed forward (``pooled_only`` or not, :func:`padding_free`) gives the padded
    forward's outputs on these rows, in eval mode (no dropout); and, where not, why. An architecture
    that ignores packed position ids, attends without the attention interface or pools in its own
    way (a mean over positions) fails here, not in training. ``half``: the forward runs in 16 bits
    where this cannot see it (accelerate's autocast inside the model's forward, under ``--bf16``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
            with padding_free(model, pooled_only):
                packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
    except Exception as exc:  # any failure of the packed path means: train padded
        return False, f"the packed forward failed ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    if packed.shape != padded.shape:
        return False, f"the packed forward gave shape {tuple(packed.shape)}, not {tuple(padded.shape)}"
    half = half or padded.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(input_ids.device.type)
    tolerance = HALF_TOLERANCE if half else TOLERANCE
    padded, packed = padded.float(), packed.float()
    worst = float((packed - padded).abs().max())
    if not torch.allclose(packed, padded, atol=tolerance, rtol=tolerance):
        return False, f"the packed forward's rewards differ from the padded ones by up to {worst:.3g}"
    return True, f"packed and padded rewards agree to {worst:.1g}"
