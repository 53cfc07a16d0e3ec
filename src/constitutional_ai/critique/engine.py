"""The critique-revision engine (SL-CAI, Bai et al. 2022, section 3).

For a batch of prompts: one initial response each from the helpful model, then ``n_rounds``
rounds in which every prompt gets an independently sampled principle, a critique under it and a
revision conditioned on that critique. The whole batch advances step by step (all critiques,
then all revisions), so the backend always sees a full batch instead of one prompt at a time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from constitutional_ai.backends.base import Generation, LanguageModel
from constitutional_ai.common.chat_format import RAW_STOP
from constitutional_ai.common.seeding import derive_seed
from constitutional_ai.common.text import clean_completion
from constitutional_ai.config import CritiqueConfig, GenerationParams
from constitutional_ai.constitution.model import Constitution, CritiqueRevisionPrinciple
from constitutional_ai.constitution.prompts import CritiquePromptBuilder, CritiqueStep
from constitutional_ai.data.prompts import PromptItem


@dataclass
class _Batch:
    items: list[PromptItem]
    responses: list[str]
    rounds: list[list[dict[str, Any]]]
    timings: dict[str, Any]
    tokens: list[list[int]]
    last: list[Generation] = field(default_factory=list)


class CritiqueRevisionEngine:
    """Runs SL-CAI on batches of prompts; stateless between batches, so resume is trivial."""

    def __init__(self, backend: LanguageModel, constitution: Constitution, config: CritiqueConfig, seed: int = 0):
        if not constitution.critique_revision:
            raise ValueError("the constitution has no critique_revision principles")
        self.backend = backend
        self.constitution = constitution
        self.config = config
        self.seed = seed
        self.builder = CritiquePromptBuilder(backend.style, constitution.critique_examples[:config.few_shot])
        stops = list(config.generation.stop)
        if backend.style == "raw":
            stops += [s for s in RAW_STOP if s not in stops]
        self.params: GenerationParams = config.generation.model_copy(update={"stop": stops})
        self._on_step: Callable[[str, int], None] | None = None

    def principles_for(self, key: str) -> list[CritiqueRevisionPrinciple]:
        """The principles for one prompt: independent draws with replacement, reproducible from the
        run seed and the prompt's key alone, so batching, ordering and resume cannot change them."""
        rng = random.Random(derive_seed(self.seed, "principles", key))
        return [rng.choice(self.constitution.critique_revision) for _ in range(self.config.n_rounds)]

    def _generate(self, batch: _Batch, prompts: Sequence[Any], step: str) -> list[str]:
        """One batched generation step; returns cleaned texts and keeps the raw results in ``batch``."""
        start = time.perf_counter()
        seeds = [derive_seed(self.seed, step, it.key) for it in batch.items]
        out = self.backend.generate(prompts, self.params, seeds=seeds)
        batch.last = out
        batch.timings[step] = round(time.perf_counter() - start, 4)
        for i, g in enumerate(out):
            batch.tokens[i][0] += g.prompt_tokens
            batch.tokens[i][1] += g.completion_tokens
        if self._on_step is not None:
            self._on_step(step, sum(g.completion_tokens for g in out))
        return [clean_completion(g.text, self.backend.style) for g in out]

    def run(self, items: Sequence[PromptItem],
            on_step: Callable[[str, int], None] | None = None) -> list[dict[str, Any]]:
        """Critique-revision records for ``items``, in order.

        ``on_step(step_name, completion_tokens)`` is called after every batched generation step,
        so a progress display can move while a large batch is still in flight.
        """
        items = list(items)
        if not items:
            return []
        self._on_step = on_step
        t0 = time.perf_counter()
        batch = _Batch(items, [], [[] for _ in items], {"batch_size": len(items)}, [[0, 0] for _ in items])
        batch.responses = self._generate(batch, [it.messages for it in items], "initial")
        initial = list(batch.responses)
        principles = [self.principles_for(it.key) for it in items]
        for r in range(self.config.n_rounds):
            steps = [CritiqueStep(p[r].critique_request, p[r].revision_request) for p in principles]
            critiques: list[str | None] = [None] * len(items)
            if not self.config.skip_critique:
                prompts = [self.builder.critique(it.messages, resp, s)
                           for it, resp, s in zip(items, batch.responses, steps, strict=True)]
                critiques = list(self._generate(batch, prompts, f"critique_{r + 1}"))
                steps = [replace(s, critique=c) for s, c in zip(steps, critiques, strict=True)]
            prompts = [self.builder.revision(it.messages, resp, s)
                       for it, resp, s in zip(items, batch.responses, steps, strict=True)]
            revisions = self._generate(batch, prompts, f"revision_{r + 1}")
            for i, (text, g) in enumerate(zip(revisions, batch.last, strict=True)):
                batch.rounds[i].append({
                    "round": r + 1, "principle_id": principles[i][r].id,
                    "critique_request": steps[i].critique_request, "critique": critiques[i],
                    "revision_request": steps[i].revision_request, "revision": text,
                    "finish_reason": g.finish_reason,
                })
                if text:  # an empty revision leaves the response as it was for the next round
                    batch.responses[i] = text
        batch.timings["total"] = round(time.perf_counter() - t0, 4)
        return [self._record(batch, i, initial[i]) for i in range(len(items))]

    def _record(self, batch: _Batch, i: int, initial: str) -> dict[str, Any]:
        item = batch.items[i]
        return {
            "key": item.key,
            "prompt": item.messages,
            "initial_response": initial,
            "rounds": batch.rounds[i],
            "final_response": batch.responses[i],
            "model_id": self.backend.model_id,
            "prompt_style": self.backend.style,
            "constitution_hash": self.constitution.hash,
            "seed": self.seed,
            "source_index": item.index,
            "category": item.meta.get("category"),
            "tokens": {"prompt": batch.tokens[i][0], "completion": batch.tokens[i][1]},
            "timings": {k: v for k, v in batch.timings.items()},
        }
