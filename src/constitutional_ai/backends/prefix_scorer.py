"""Scoring choices over a prefix tree: every part that prompts or choices share is computed once.

Labelling asks the same few-shot block, instructions and conversation many times, with two or
three one-token choices each. Scoring every (prompt, choice) as its own row would recompute all of
that per choice; here a batch is split into a tree of shared stems, each question's own remainder
and each choice's short suffix, run as cached forward passes, with a store of recent stems' KV so
that later batches reuse them too. The scorer owns its forward passes, padding and stem store;
a backend hands it token ids.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import constitutional_ai.backends.stem_attention as stem_attention
from constitutional_ai.models.cpu_heap import HEAP_BLOCK_BYTES
from constitutional_ai.models.head_split import base_and_head

#: (context ids, continuation ids) of one choice after its prompt.
Pair = tuple[list[int], list[int]]
#: One stem's per-layer (K, V), without padding.
StemKV = list[tuple[torch.Tensor, torch.Tensor]]

#: Questions are grouped under a shared stem only when they share at least this many tokens.
MIN_STEM = 8
#: Shared-stem attention pays for its extra kernel calls only on long stems: with the 15-token
#: stems of questions without few-shot examples it was 9% slower than copying the stem per row.
MIN_SHARED_STEM = 64
#: A deferred LM head runs over about this many read positions at a time (their logits: 64 MB at a
#: 32k vocabulary in fp32), so that one read of its weight serves many passes and a large call
#: keeps bounded memory.
HEAD_ROWS = 512
#: On a CPU a pass computes at most this many tokens...
CPU_MAX_BATCH_TOKENS = 4096
#: ...and few enough that its widest activation (tokens x the MLP's width) stays a heap block
#: (:mod:`~constitutional_ai.models.cpu_heap`): at Qwen2.5-0.5B's shape (4,864 wide, fp32) 4,096
#: tokens a pass took about 800,000 minor faults per 128 labels and 10.5 s against 9.3 s at 862
#: tokens, which fault almost never.
CPU_PASS_ACTIVATION_BYTES = HEAP_BLOCK_BYTES


def cpu_batch_tokens(config: Any, itemsize: int) -> int:
    """The default tokens per scoring pass on a CPU for a model of this config and element size:
    :data:`CPU_MAX_BATCH_TOKENS`, or fewer where the MLP is wide (see
    :data:`CPU_PASS_ACTIVATION_BYTES`). A single row longer than that still runs, on its own."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or 0
    width = next((w for w in (getattr(text, name, None) for name in ("intermediate_size", "n_inner", "ffn_dim"))
                  if isinstance(w, int) and w > 0), 4 * hidden)
    if width <= 0:
        return CPU_MAX_BATCH_TOKENS
    return max(MIN_SHARED_STEM, min(CPU_MAX_BATCH_TOKENS, CPU_PASS_ACTIVATION_BYTES // (width * itemsize)))


@dataclass
class _Question:
    """One prompt of a ``score_choices`` call, split for the prefix-tree passes."""

    pairs: list[Pair]  # (context ids, continuation ids), one per choice
    prefix: list[int]  # what every choice's full sequence shares
    suffixes: list[list[int]]  # each choice's own tokens after the prefix (at least one)
    limit: int  # the longest stem it allows: pass 2 must hold every choice's first prediction
    length: int  # its longest full sequence
    stem: int = 0  # tokens computed once for its whole stem group
    group: int = 0
    peers: int = 1  # questions in its stem group

    @classmethod
    def split(cls, pairs: list[Pair]) -> _Question:
        fulls = [ctx + cont for ctx, cont in pairs]
        most = min(len(f) for f in fulls) - 1  # every choice keeps at least one token of its own
        shared = min([most, *(common_length(fulls[0], f) for f in fulls[1:])])
        return cls(pairs, fulls[0][:shared], [f[shared:] for f in fulls],
                   limit=min(shared, *(len(ctx) for ctx, _ in pairs)) - 1, length=max(len(f) for f in fulls))


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share. A binary search over slice comparisons, which
    run in C: a token-by-token Python loop over thousand-token few-shot prompts was a tenth of
    the labelling time."""
    if type(a) is not type(b):
        a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _assign_stems(questions: list[_Question]) -> list[list[int]]:
    """Group questions by shared prompt start (indices into ``questions``) and set their stems.

    In token order, neighbours share the most. A question joins the group before it when they share
    at least :data:`MIN_STEM` tokens and joining keeps at least half of the group's stem (so two
    orders of one question keep their long shared conversation instead of shrinking to the
    instructions every question shares); a few-shot block reused across questions makes one group.
    """
    order = sorted(range(len(questions)), key=lambda i: questions[i].prefix)
    groups: list[list[int]] = []
    stems: list[int] = []
    for i in order:
        if groups:
            shared = common_length(questions[groups[-1][0]].prefix, questions[i].prefix)
            if shared >= MIN_STEM and (len(groups[-1]) == 1 or 2 * shared >= stems[-1]):
                groups[-1].append(i)
                stems[-1] = shared  # sorted: sharing with the first is sharing with all
                continue
        groups.append([i])
        stems.append(len(questions[i].prefix))
    for gid, (members, stem) in enumerate(zip(groups, stems, strict=True)):
        stem = min(stem, *(questions[m].limit for m in members))
        for m in members:
            questions[m].group, questions[m].stem, questions[m].peers = gid, stem, len(members)
    return groups


def _logprob_sum(logits: torch.Tensor, first: int, targets: list[int]) -> float:
    """Sum of log p(targets[t] | position first + t); log_softmax only over those positions."""
    if not targets:
        return 0.0
    rows = logits[first:first + len(targets)].float().log_softmax(-1)
    return float(rows.gather(1, torch.tensor(targets, device=rows.device)[:, None]).sum())


@dataclass
class _Read:
    """One term of a choice's score: the summed log p(targets[t] | column first + t) of one row of a
    pass's output, read once every pass of the call has run."""

    out: torch.Tensor  # [columns, vocab] logits, or [columns, hidden] states when the head is deferred
    first: int
    targets: list[int]


class PrefixTreeScorer:
    """Log-probabilities of choices after prompts, from one causal LM, over a prefix tree.

    ``batch_size`` caps the prompts per pass and ``max_batch_tokens`` the tokens a pass computes
    (unset: :func:`cpu_batch_tokens` on a CPU, no cap elsewhere); ``prefix_cache_tokens`` sizes the store of recent
    shared stems (0: off). ``install_stem_attention`` lets the scorer switch the model's attention
    to shared-stem attention where it can; a model that is being trained should be left alone.
    """

    def __init__(self, model: Any, pad_token_id: int, device: torch.device, *, batch_size: int,
                 max_batch_tokens: int | None, prefix_cache_tokens: int, install_stem_attention: bool):
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = device
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        #: The cap a pass keeps to when ``max_batch_tokens`` is unset (None: none).
        self.default_batch_tokens = cpu_batch_tokens(
            model.config, getattr(getattr(model, "dtype", None), "itemsize", 4)) if device.type == "cpu" else None
        self.prefix_cache_tokens = prefix_cache_tokens
        #: What this model's forward accepts (logits_to_keep, cache vs past_key_values), read once.
        self._forward_args = frozenset(inspect.signature(model.forward).parameters)
        #: Whether the attention kernel takes a custom 4D mask, so choices can share one row in scoring.
        self.fuse_suffixes = getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")
        #: Whether scoring attends to shared stems in place (no per-row KV copies): CPU sdpa models.
        self.shared_stem_attention = self.fuse_suffixes and install_stem_attention and stem_attention.install(model)
        #: False once a model's cache turned out not to be plain per-token K/V (nothing stored per stem).
        self._split_stems = True
        #: KV of recent shared stems (few-shot blocks), least recently used first: token ids -> per layer (K, V).
        self._stems: OrderedDict[tuple[int, ...], StemKV] = OrderedDict()
        #: (base model, LM head) where the model's logits are exactly its head over its base model's
        #: last hidden states (checked once, :meth:`_deferred_head`); False where they are not.
        self._head: tuple[Any, Any] | bool | None = None

    @torch.inference_mode()
    def score(self, groups: Sequence[list[Pair]]) -> list[list[float]]:
        """Per prompt, per choice: the summed log-probability of the continuation after its context."""
        scores: list[list[float]] = [[0.0] * len(g) for g in groups]
        self._deferred_head()  # its probe runs here, before any pass sets up shared stems
        live = [g for g in range(len(groups)) if groups[g]]
        questions = {g: _Question.split(groups[g]) for g in live}
        stem_groups = _assign_stems([questions[g] for g in live])
        stored = self._store_shared_stems([questions[live[members[0]]] for members in stem_groups])
        pending: dict[int, list[list[_Read]]] = {}
        for chunk in self._token_budget_chunks([[live[i] for i in members] for members in stem_groups], questions,
                                               stored):
            try:
                reads = self._score_tree([questions[g] for g in chunk])
            except (TypeError, ValueError, AttributeError, NotImplementedError):
                # a model whose cache cannot be reused: one full row per choice instead
                for g, row in zip(chunk, self._score_rows([groups[g] for g in chunk]), strict=True):
                    scores[g] = row
                continue
            pending.update(zip(chunk, reads, strict=True))
            # logits (batch x kept columns x vocab) are summed per chunk, not kept; hidden states
            # until :data:`HEAD_ROWS` read positions are waiting for the head
            if not self._head or sum(len(r.targets) for c in pending.values() for t in c for r in t) >= HEAD_ROWS:
                self._resolve(pending, scores)
        self._resolve(pending, scores)
        return scores

    def _resolve(self, pending: dict[int, list[list[_Read]]], scores: list[list[float]]) -> None:
        """Sum the pending reads into ``scores`` and forget them. With the head deferred, the LM head
        runs here, once, over every read position of the call (up to :data:`HEAD_ROWS`): run per
        pass, a head over a dozen rows reads its whole weight (117 MB at a 32k vocabulary and
        hidden 896) each time, 0.8 s of a 9 s labelling run of 54 passes on 2 CPU cores."""
        reads = [r for choices in pending.values() for terms in choices for r in terms if r.targets]
        picked: list[float] = []
        start = 0
        while start < len(reads):  # slabs of at most HEAD_ROWS positions (a longer read on its own)
            end, size = start + 1, len(reads[start].targets)
            while end < len(reads) and size + len(reads[end].targets) <= HEAD_ROWS:
                size += len(reads[end].targets)
                end += 1
            slab = reads[start:end]
            rows = torch.cat([r.out[r.first:r.first + len(r.targets)] for r in slab])
            if self._head:
                rows = self._head[1](rows)  # type: ignore[index]
            targets = torch.tensor([t for r in slab for t in r.targets], device=rows.device)
            rows = rows.float()
            picked += (rows.gather(1, targets[:, None]).squeeze(1) - rows.logsumexp(-1)).tolist()
            start = end
        it = iter(picked)
        for g, choices in pending.items():
            scores[g] = [sum(next(it) for r in terms for _ in r.targets) for terms in choices]
        pending.clear()

    def _deferred_head(self) -> tuple[Any, Any] | bool:
        """(base model, LM head) when this model's logits are exactly its head applied to its base
        model's last hidden states, else False: a model that scales, soft-caps or otherwise changes
        its logits after the head (Gemma 2, Cohere, Granite) keeps its own forward. Checked once, on
        a short probe, to equality: the same head over the same states in the same shape."""
        if self._head is None:
            self._head = base_and_head(self.model) or False
        return self._head

    def _store_shared_stems(self, firsts: list[_Question]) -> bool:
        """Compute the stems shared by several questions into the prefix store before any chunk needs
        them; True when every shared stem is stored, so chunks need not follow stem groups.

        With the stems in the store, a chunk only attaches them, so rows can be chunked by length
        across groups (less padding) instead of by group.
        """
        budget = self.prefix_cache_tokens
        shared = [q.prefix[:q.stem] for q in firsts if q.peers > 1]
        if not shared or not (budget and self._split_stems) or sum(len(s) for s in shared) > budget:
            return False
        missing = [stem for stem in shared if self._cached_prefix(stem) is None]
        tokens = self.max_batch_tokens or self.default_batch_tokens
        step = max(1, tokens // max(len(s) for s in shared) if tokens else len(missing))
        try:
            for start in range(0, len(missing), step):
                part = missing[start:start + step]
                self._stem_kvs(part, [True] * len(part))
        except NotImplementedError:  # a cache that cannot be stored per stem
            return False
        # All stored: they fit the budget together and are the most recently used, so none was evicted.
        return True

    def _token_budget_chunks(self, stem_groups: list[list[int]], questions: dict[int, _Question],
                             stems_stored: bool = False) -> list[list[int]]:
        """Micro-batches of at most ``batch_size`` prompts and ``max_batch_tokens`` computed tokens.

        A chunk's cost is its stems, each computed once, plus its rows times the longest
        remainder. On a CPU a pass over fewer, shorter rows stays in cache: scoring 284-token
        questions ran 40% faster at 16 rows than at 32 on the 2-core CI machine. Longest first and
        stem groups kept together, so each micro-batch carries little padding and shares its stems;
        when the shared stems are already stored (``stems_stored``) they cost nothing to attach, and
        rows are ordered by their own length across groups.
        """
        budget = self.max_batch_tokens or self.default_batch_tokens
        if stems_stored:
            shared = [g for members in stem_groups if len(members) > 1 for g in members]
            single = [g for members in stem_groups if len(members) == 1 for g in members]
            ordered = [sorted(shared, key=lambda g: -(questions[g].length - questions[g].stem))] + [[g] for g in single]
        else:
            ordered = sorted(stem_groups, key=lambda members: -max(questions[g].length for g in members))
        chunks: list[list[int]] = []
        width = stems = 0
        seen: set[int] = set()
        for members in ordered:
            for g in sorted(members, key=lambda g: -(questions[g].length - questions[g].stem)):
                q = questions[g]
                new_width = max(width, q.length - q.stem)
                new_stems = stems + (0 if q.group in seen or (stems_stored and q.peers > 1) else q.stem)
                current = chunks[-1] if chunks else None
                if current is not None and len(current) < self.batch_size and (
                        budget is None or (len(current) + 1) * new_width + new_stems <= budget):
                    current.append(g)
                    width, stems = new_width, new_stems
                else:
                    chunks.append([g])
                    width = q.length - q.stem
                    stems, seen = (0 if stems_stored and q.peers > 1 else q.stem), set()
                seen.add(q.group)
        return chunks

    def _padded(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return ids.to(self.device), mask.to(self.device)

    def _score_rows(self, groups: list[list[Pair]]) -> list[list[float]]:
        """The plain way: every (prompt, choice) as its own row of one forward pass."""
        flat = [pair for group in groups for pair in group]
        ids, mask = self._padded([ctx + cont for ctx, cont in flat], left=False)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        flat_scores = [_logprob_sum(logits[r], len(ctx) - 1, cont) for r, (ctx, cont) in enumerate(flat)]
        out, k = [], 0
        for group in groups:
            out.append(flat_scores[k:k + len(group)])
            k += len(group)
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int,
                 cache: Any = None) -> tuple[torch.Tensor, Any]:
        """One cached forward pass with outputs for the last ``keep`` positions only: logits, or
        the last hidden states where the head is deferred (:meth:`_deferred_head`)."""
        split = self._deferred_head()
        extra: dict[str, Any] = {"logits_to_keep": keep} if "logits_to_keep" in self._forward_args and not split \
            else {}
        if cache is not None:
            extra["cache" if "cache" in self._forward_args else "past_key_values"] = cache
        model = split[0] if split else self.model  # type: ignore[index]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        # transformers 5.x renamed past_key_values to cache; accept either
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_select_indices"):
            raise NotImplementedError("the model returns no reusable cache")
        # the kept columns of the hidden states are copied out: a pending read must not hold the
        # whole pass's states (rows x length x hidden) until the deferred head runs
        return (out[0][:, -keep:].clone() if split else out.logits[:, -keep:]), cache

    def _score_tree(self, questions: list[_Question]) -> list[list[list[_Read]]]:
        """Cached forward passes over a prefix tree, each shared part computed once.

        1. the stems: what a group of questions shares (a few-shot block and instructions; a
           conversation and principle asked in both option orders), one row per group;
        2. each question's own remainder (its options, ``The answer is:`` and any tokens its
           choices share, like `` (``), on its stem's KV cache, followed in the same row by every
           choice's own short suffix, each masked from the others (a 4D attention mask), so the
           question's cache is never copied per choice. Attention kernels that take no 4D mask
           (flash attention) run the suffixes as a third pass on a per-choice copy instead.
        Rows are left-padded so that they end in the same column: only the last few positions
        need logits (the letters' predictions), not batch x length x vocab. Returns, per question
        and choice, the reads its score sums (:meth:`_resolve`).
        """
        if min(q.stem for q in questions) < 1:
            raise ValueError("a prompt too short to share")
        group_ids = list(dict.fromkeys(q.group for q in questions))
        firsts = [next(q for q in questions if q.group == gid) for gid in group_ids]
        stems, keep_stems = [q.prefix[:q.stem] for q in firsts], [q.peers > 1 for q in firsts]
        share = (self.shared_stem_attention and self.fuse_suffixes  # the stems' KV stays out of the rows
                 and sum(q.stem for q in questions) >= MIN_SHARED_STEM * len(questions))
        if share:
            kvs, lengths = self._stem_kvs(stems, keep_stems)
        else:
            cache, s_mask, lengths = self._stem_cache(stems, keep_stems)
        for q in questions:  # a stem read from the store may be shorter: the rest is the question's own
            q.stem = lengths[group_ids.index(q.group)]
        m_ids, m_mask = self._padded([q.prefix[q.stem:] for q in questions], left=True)
        stem_rows = torch.tensor([group_ids.index(q.group) for q in questions], device=m_ids.device)
        shared: stem_attention.SharedStems | None = None
        if share:
            shared = stem_attention.SharedStems(kvs, [(stem_rows == j).nonzero().flatten()
                                                      for j in range(len(group_ids))])
            cache = self._empty_cache()
            s_mask = m_mask[:, :0]
            positions = torch.tensor(lengths, device=m_ids.device)[stem_rows, None] \
                + (m_mask.cumsum(-1) - 1).clamp(min=0)
        else:
            cache.batch_select_indices(stem_rows)
            s_mask = s_mask[stem_rows]
            positions = (torch.cat([s_mask, m_mask], 1).cumsum(-1) - 1).clamp(min=0)[:, -m_ids.shape[1]:]
        mask = torch.cat([s_mask, m_mask], dim=1)
        own = [len(q.prefix) - len(ctx) + 1 for q in questions for ctx, _ in q.pairs]
        keep = min(m_ids.shape[1], max(1, *own))
        # where each choice's suffix logits are: (tensor row, first column)
        spots: list[list[tuple[torch.Tensor, int]]] = []
        if self.fuse_suffixes:
            try:
                with stem_attention.sharing_stems(shared) if shared is not None else contextlib.nullcontext():
                    logits, starts = self._remainders_and_suffixes(questions, m_ids, m_mask, mask, positions, keep,
                                                                   cache)
            except NotImplementedError:
                if shared is not None:  # an attention variant the merge lacks: copy stems from now on
                    self.shared_stem_attention = False
                raise
            prefix_logits = logits[:, :keep]
            spots = [[(logits[i], keep + start) for start in starts[i]] for i in range(len(questions))]
        else:
            prefix_logits, cache = self._forward(m_ids, mask, positions, keep, cache)
            rows = [i for i, q in enumerate(questions) for _ in q.suffixes]
            index = torch.tensor(rows, device=s_mask.device)
            cache.batch_select_indices(index)
            x_ids, x_mask = self._padded([s for q in questions for s in q.suffixes], left=False)
            x_positions = mask.sum(-1)[index][:, None] + torch.arange(x_ids.shape[1], device=x_ids.device)[None, :]
            suffix_logits, _ = self._forward(x_ids, torch.cat([mask[index], x_mask], dim=1), x_positions,
                                             x_ids.shape[1], cache)
            flat = iter(range(len(rows)))
            spots = [[(suffix_logits[next(flat)], 0) for _ in q.suffixes] for q in questions]
        results: list[list[list[_Read]]] = []
        for i, q in enumerate(questions):
            shared = len(q.prefix)
            row_reads = []
            for (ctx, _), suffix, (logits, start) in zip(q.pairs, q.suffixes, spots[i], strict=True):
                # Only the choice's own tokens (from len(ctx) on) count. Those inside the shared
                # prefix and the first suffix token are read from the remainder's logits, the rest
                # from the suffix's. Where a choice merged with the prompt's last token, its context
                # ends inside the suffix, and the suffix tokens before it are skipped.
                skip = max(len(ctx) - shared, 0)
                base = keep - shared  # kept logits column of prefix position t is t + base
                reads = [_Read(prefix_logits[i], len(ctx) - 1 + base, q.prefix[len(ctx):shared])]
                if skip == 0:
                    reads.append(_Read(prefix_logits[i], shared - 1 + base, suffix[:1]))
                reads.append(_Read(logits, start + max(skip, 1) - 1, suffix[max(skip, 1):]))
                row_reads.append(reads)
            results.append(row_reads)
        return results

    def clear_prefix_cache(self) -> None:
        """Forget the stored stems: a benchmark's cold start, or a model whose weights have changed."""
        self._stems.clear()

    def _cached_prefix(self, stem: list[int]) -> tuple[StemKV, int] | None:
        """The stored KV sharing the longest start with ``stem``, cut to that shared length (a causal
        model's KV for a prefix is the prefix of its KV), when it covers at least half the stem."""
        best, found = 0, None
        for key, kv in self._stems.items():
            shared = common_length(stem, key)
            if shared > best:
                best, found = shared, (key, kv)
        if found is None or best < MIN_STEM or 2 * best < len(stem):
            return None
        self._stems.move_to_end(found[0])
        return [(k[:, :, :best], v[:, :, :best]) for k, v in found[1]], best

    def _stem_kvs(self, stems: list[list[int]], keep: list[bool]) -> tuple[list[StemKV], list[int]]:
        """Each stem's per-layer (K, V) without padding, and how many of its tokens they hold (a stem
        read from the store may be cut shorter; the rest of it is computed with each question's own
        text).

        Stems seen recently (few-shot blocks shared by many questions, batch after batch) come from
        an LRU store of at most ``prefix_cache_tokens`` tokens, matched on their longest shared
        start as in SGLang's radix cache and vLLM's automatic prefix caching; the rest are computed
        in one pass, and those shared by several questions (``keep``) are stored. Models whose
        cache layers are not plain per-token K/V (sliding windows) raise ``NotImplementedError``.
        """
        budget = self.prefix_cache_tokens
        known = [self._cached_prefix(stem) if budget else None for stem in stems]
        lengths = [hit[1] if hit else len(stem) for hit, stem in zip(known, stems, strict=True)]
        kvs: list[Any] = [hit[0] if hit else None for hit in known]
        missing = [j for j, kv in enumerate(kvs) if kv is None]
        if missing:
            ids, mask = self._padded([stems[j] for j in missing], left=True)
            _, fresh = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), keep=1)
            layers = getattr(fresh, "layers", None)
            if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
                self._split_stems = False
                raise NotImplementedError("this model's cache cannot be split per stem")
            for r, j in enumerate(missing):
                n = len(stems[j])
                kvs[j] = [(layer.keys[r:r + 1, :, -n:], layer.values[r:r + 1, :, -n:]) for layer in layers]
                if budget and keep[j] and n <= budget:
                    self._stems[tuple(stems[j])] = [(k.clone(), v.clone()) for k, v in kvs[j]]
            while sum(len(k) for k in self._stems) > budget:
                self._stems.popitem(last=False)
        return kvs, lengths

    def _empty_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _stem_cache(self, stems: list[list[int]], keep: list[bool]) -> tuple[Any, torch.Tensor, list[int]]:
        """The KV cache of ``stems`` (one left-padded row each), its attention mask, and how many
        tokens of each stem it holds (see :meth:`_stem_kvs`)."""
        budget = self.prefix_cache_tokens
        if not (budget and self._split_stems) or not (any(keep) or any(self._cached_prefix(stem) for stem in stems)):
            # nothing to store or reuse: the pass's own cache, padding and all (any cache type)
            ids, mask = self._padded(stems, left=True)
            _, fresh = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), keep=1)
            return fresh, mask, [len(stem) for stem in stems]
        from transformers import DynamicCache

        kvs, lengths = self._stem_kvs(stems, keep)
        width = max(lengths)
        _, mask = self._padded([stem[:n] for stem, n in zip(stems, lengths, strict=True)], left=True)
        data = []
        for layer in range(len(kvs[0])):
            keys, values = [], []
            for kv, n in zip(kvs, lengths, strict=True):
                k, v = kv[layer]
                keys.append(torch.nn.functional.pad(k, (0, 0, width - n, 0)) if n < width else k)
                values.append(torch.nn.functional.pad(v, (0, 0, width - n, 0)) if n < width else v)
            data.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(ddp_cache_data=data, config=self.model.config), mask, lengths

    def _remainders_and_suffixes(self, questions: list[_Question], m_ids: torch.Tensor, m_mask: torch.Tensor,
                                 mask: torch.Tensor, positions: torch.Tensor, keep: int,
                                 cache: Any) -> tuple[torch.Tensor, list[list[int]]]:
        """Pass 2 with the choices' suffixes in the same row: ``[remainder | suffix 1 | suffix 2 ...]``.

        A suffix token sees the stem, the whole remainder and the earlier tokens of its own suffix,
        at the positions it would have right after the prompt. A suffix's last token is not fed:
        its logits would predict what follows the choice, which no score reads (with `` (A)``
        choices, 2 of a question's 6 logit rows and 2 of its positions). Returns the logits of the
        last ``keep`` remainder columns and of every fed suffix column, and each suffix's start
        column.
        """
        fed = [[x[:-1] for x in q.suffixes] for q in questions]
        starts = [[sum(len(x) for x in xs[:c]) for c in range(len(xs))] for xs in fed]
        x_ids, _ = self._padded([[t for x in xs for t in x] for xs in fed], left=False)
        batch, width_m, width_x = len(questions), m_ids.shape[1], x_ids.shape[1]
        width_s = mask.shape[1] - width_m
        device = m_ids.device
        allowed = torch.zeros((batch, width_m + width_x, width_s + width_m + width_x), dtype=torch.bool,
                              device=device)
        allowed[:, :, :width_s] = mask[:, None, :width_s].bool()
        causal = torch.ones((width_m, width_m), dtype=torch.bool, device=device).tril()
        allowed[:, :width_m, width_s:width_s + width_m] = causal[None] & m_mask[:, None, :].bool()
        # padding sees itself, so no query is left without keys (shared-stem attention has no stem columns)
        allowed[:, range(width_m), range(width_s, width_s + width_m)] = True
        allowed[:, width_m:, width_s:width_s + width_m] = m_mask[:, None, :].bool()
        x_positions = torch.zeros((batch, width_x), dtype=torch.long, device=device)
        for i, (q, xs) in enumerate(zip(questions, fed, strict=True)):
            for start, suffix in zip(starts[i], xs, strict=True):
                n = len(suffix)
                rows, cols = slice(width_m + start, width_m + start + n), slice(width_s + width_m + start,
                                                                                 width_s + width_m + start + n)
                allowed[i, rows, cols] = torch.ones((n, n), dtype=torch.bool, device=device).tril()
                x_positions[i, start:start + n] = len(q.prefix) + torch.arange(n, device=device)
        dtype = self.model.dtype
        mask4d = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)[:, None]
        logits, _ = self._forward(torch.cat([m_ids, x_ids], dim=1), mask4d, torch.cat([positions, x_positions], 1),
                                  keep + width_x, cache)
        return logits, starts

    def close(self) -> None:
        """Drop the model and the stored stems, so that their memory can be freed."""
        self.model = None
        self._head = None  # it holds the base model and the head
        self._stems.clear()
