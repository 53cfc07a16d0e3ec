"""Reusing the KV of earlier generations: a prompt that starts with text the model has already read
prefills only its new tokens.

SL-CAI's prompts grow: the revision prompt is the critique prompt plus the critique the model has
just written plus a request, and every critique and revision of a run starts with the same
few-shot block. Sent as fresh prompts (as LangChain's ``ConstitutionalChain`` sends them), each
step re-reads all of that. Here every generation's prompt and completion are kept, per row and
without padding, as per-layer keys and values (a causal model's KV for a token prefix is the prefix
of its KV), and a new prompt is matched on its longest stored start, the way vLLM's automatic
prefix caching and SGLang's radix cache match theirs:

* the match is found through hashes of 16-token blocks (a dictionary walk, not a scan over every
  stored row), then extended token by token and checked token by token, so a hash collision can
  cost reuse but never attach the wrong KV;
* an entry stores only the tokens its own row added after the entry it was built on (its
  ``parent``): a few-shot block shared by a whole batch is held once, not once per row;
* the store is emptied whenever the model's weights change (their in-place version counters move,
  as an optimiser step or ``load_state_dict`` moves them), so a policy being trained can never be
  served KV from its older self;
* it holds at most ``budget`` tokens, least recently used out first.

Reused KV equals recomputed KV up to floating-point summation order (the same tolerance batching
with different padding already has); ``tests/test_kv_reuse.py`` checks the tokens generated with
and without reuse agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

#: Tokens per hashed block. vLLM's default block size; a match is extended past the last whole
#: block token by token, so the block size only sets how many dictionary lookups a match costs.
BLOCK = 16
#: Reuse is worth its gather only from this many matched tokens on.
MIN_REUSE = 16
#: A prompt keeps at least this many tokens of its own after a stored start: transformers' stop
#: strings are matched over the last tokens of the whole sequence, so those must be the prompt's
#: real ones, not the masked holes of the reuse layout.
MIN_OWN = 16
#: A start shared by several prompts of one call is computed once, ahead of them, when it is at
#: least this long and longer than what the store already holds for it.
MIN_SHARED = 64

#: One layer's (K, V), each ``[1, kv_heads, tokens, head_dim]``.
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class Entry:
    """A stored token sequence: its first ``base`` tokens' KV lives in ``parent``, the rest in ``own``."""

    ids: tuple[int, ...]
    base: int
    parent: Entry | None
    own: list[LayerKV]
    keys: list[int] = field(default_factory=list)
    children: int = 0  # stored entries built on this one: it stays stored while they are

    def pieces(self, n: int) -> list[tuple[list[LayerKV], int, int]]:
        """``(per-layer KV, start, stop)`` slices that together hold this sequence's first ``n`` tokens."""
        if n <= self.base and self.parent is not None:
            return self.parent.pieces(n)
        head = self.parent.pieces(self.base) if self.parent is not None and self.base else []
        return [*head, (self.own, 0, n - self.base)]


def block_keys(ids: Sequence[int]) -> list[int]:
    """Chained hashes of ``ids``'s whole 16-token blocks: key ``k`` stands for ``ids[:16 * (k + 1)]``."""
    keys, h = [], 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        h = hash((h, tuple(ids[start:start + BLOCK])))
        keys.append(h)
    return keys


def full_attention(model: Any) -> bool:
    """Whether every layer attends to every earlier token: a sliding-window cache keeps only the last
    tokens, so its columns are not a sequence's positions and cannot be stored or laid out here."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "sliding_window", None) or getattr(config, "sub_configs", None):
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())


def plain_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when each holds one K/V column per position (dynamic or static), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ not in ("DynamicLayer", "StaticLayer") for layer in layers):
        return None
    return list(layers)


def weights_version(model: Any) -> tuple[int, int]:
    """Numbers that change when any parameter is changed in place (its version counter: optimiser
    steps, ``load_state_dict``) or given new storage (``param.data = ...``)."""
    params = list(model.parameters())
    return sum(p._version for p in params), hash(tuple(p.data_ptr() for p in params))


class KVStore:
    """Per-row KV of recent prompts and completions, matched on their longest shared start."""

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recent first
        self._index: dict[int, Entry] = {}  # block key -> the newest entry holding that prefix
        self._tokens = 0
        self._version: tuple[int, int] | None = None
        #: Tokens served from the store and tokens prefilled, over this store's life (for benchmarks).
        self.reused = self.computed = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens held (each entry's own tokens; shared parents count once)."""
        return self._tokens

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self._tokens = 0

    def check_weights(self, model: Any) -> None:
        """Empty the store when the model's weights are not those its entries were computed with."""
        version = weights_version(model)
        if version != self._version:
            self.clear()
            self._version = version

    def match(self, ids: Sequence[int], limit: int | None = None) -> tuple[Entry | None, int]:
        """The stored entry sharing the longest start with ``ids`` and that length (at most ``limit``),
        or ``(None, 0)`` below :data:`MIN_REUSE` tokens."""
        found, blocks = None, 0
        h = 0
        for start in range(0, len(ids) - BLOCK + 1, BLOCK):
            h = hash((h, tuple(ids[start:start + BLOCK])))
            entry = self._index.get(h)
            if entry is None:
                break
            found, blocks = entry, blocks + 1
        if found is None:
            return None, 0
        n = blocks * BLOCK
        if list(found.ids[:n]) != list(ids[:n]):  # a hash collision: no reuse rather than wrong KV
            return None, 0
        while n < len(found.ids) and n < len(ids) and found.ids[n] == ids[n]:
            n += 1
        n = min(n, limit if limit is not None else n)
        if n < MIN_REUSE:
            return None, 0
        entry: Entry | None = found
        while entry is not None and id(entry) in self._entries:  # used: it and what it is built on
            self._entries.move_to_end(id(entry))
            entry = entry.parent
        return found, n

    def put(self, ids: Sequence[int], parent: Entry | None, base: int, own: list[LayerKV]) -> Entry | None:
        """Store ``ids`` whose first ``base`` tokens are ``parent``'s and the rest's KV is ``own``."""
        size = len(ids) - base
        if size <= 0 or size > self.budget or len(ids) < MIN_REUSE:
            return None
        if parent is not None and id(parent) not in self._entries:
            # its parent was evicted meanwhile: hold the whole sequence itself, so what is held is counted
            own = [(torch.cat([*(kv[layer][0][:, :, a:b] for kv, a, b in parent.pieces(base)), k], 2),
                    torch.cat([*(kv[layer][1][:, :, a:b] for kv, a, b in parent.pieces(base)), v], 2))
                   for layer, (k, v) in enumerate(own)]
            parent, base, size = None, 0, len(ids)
            if size > self.budget:
                return None
        entry = Entry(tuple(ids), base if parent is not None else 0, parent, own)
        entry.keys = block_keys(entry.ids)
        for key in entry.keys:
            self._index[key] = entry
        self._entries[id(entry)] = entry
        if parent is not None and id(parent) in self._entries:
            parent.children += 1
        self._tokens += size
        while self._tokens > self.budget and self._entries:
            self._evict()
        return entry if id(entry) in self._entries else None

    def _evict(self) -> None:
        """Drop the least recently used entry that no stored entry is built on (a tree always has a
        leaf), so a shared start is held, and counted, as long as any row on it is."""
        victim = next(e for e in self._entries.values() if e.children == 0)
        del self._entries[id(victim)]
        self._tokens -= len(victim.ids) - victim.base
        parent = victim.parent if victim.parent is not None and id(victim.parent) in self._entries else None
        if parent is not None:
            parent.children -= 1
        for key in victim.keys:
            if self._index.get(key) is victim:
                # a block inside the parent's part is the parent's too: it stays findable
                if parent is not None and key in parent.keys[:victim.base // BLOCK]:
                    self._index[key] = parent
                else:
                    del self._index[key]


def shared_starts(encoded: Sequence[Sequence[int]], store: KVStore) -> list[list[int]]:
    """Starts of at least :data:`MIN_SHARED` tokens shared by several of ``encoded`` and longer than
    what ``store`` holds for them, longest group first: the few-shot block every critique of a
    batch begins with, worth one forward pass ahead of the batch instead of one per row."""
    from constitutional_ai.backends.prefix_scorer import common_length

    order = sorted(range(len(encoded)), key=lambda i: encoded[i])
    starts: list[list[int]] = []
    current: list[int] | None = None
    for a, b in pairwise(order):
        shared = common_length(encoded[a], encoded[b])
        shared = min(shared, len(encoded[a]) - 1, len(encoded[b]) - 1)
        if shared < MIN_SHARED:
            current = None
            continue
        if current is not None and common_length(current, encoded[b]) >= MIN_SHARED:
            current = current[:common_length(current, encoded[b])]
            starts[-1] = current
            continue
        current = list(encoded[a][:shared])
        starts.append(current)
    return [s for s in starts if store.match(s)[1] + MIN_SHARED <= len(s)]
