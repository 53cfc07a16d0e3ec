"""AI feedback labels: the feedback model answers a multiple-choice question under comparison
principles, and the normalised probabilities of ``(A)``/``(B)`` become soft preference labels.

No text is generated for a label: each question is one ``score_choices`` call (batched), and the
label is ``p(A) = exp(l_A) / (exp(l_A) + exp(l_B))``. Options: one sampled principle per
comparison (the paper), the mean over k or all principles; both option orders averaged (Lee et
al. 2023); a chain-of-thought rationale first, with the label clamped (paper: 40-60%).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from constitutional_ai.backends.base import LanguageModel
from constitutional_ai.common.chat_format import RAW_STOP
from constitutional_ai.common.seeding import derive_seed
from constitutional_ai.common.text import clean_completion
from constitutional_ai.common.types import Conversation
from constitutional_ai.config import FeedbackConfig
from constitutional_ai.constitution.model import ComparisonPrinciple, Constitution
from constitutional_ai.feedback.prompts import FeedbackPromptBuilder, FeedbackQuestion


@dataclass(frozen=True)
class Comparison:
    """Two responses to the same conversation; ``response_a`` and ``response_b`` in stored order."""

    key: str
    prompt: Conversation
    response_a: str
    response_b: str


@dataclass(frozen=True)
class _Job:
    """One question: comparison index, principle, option order, the two options in that order, and
    the seed its few-shot block is drawn from."""

    ci: int
    principle: ComparisonPrinciple
    order: str
    a: str
    b: str
    seed: int


def normalise(logprob_a: float, logprob_b: float) -> float:
    """P(A) from the two continuations' log-probabilities, computed stably."""
    top = max(logprob_a, logprob_b)
    ea, eb = math.exp(logprob_a - top), math.exp(logprob_b - top)
    return ea / (ea + eb)


def clamp(p: float, bounds: tuple[float, float]) -> float:
    return min(max(p, bounds[0]), bounds[1])


class FeedbackLabeler:
    """Labels batches of comparisons; stateless between batches, reproducible from the seed."""

    def __init__(self, backend: LanguageModel, constitution: Constitution, config: FeedbackConfig, seed: int = 0):
        if not constitution.comparison:
            raise ValueError("the constitution has no comparison principles")
        self.backend = backend
        self.constitution = constitution
        self.config = config
        self.seed = seed
        self.builder = FeedbackPromptBuilder(backend.style, constitution.comparison,
                                             constitution.feedback_examples[:config.few_shot],
                                             special_tokens=getattr(backend, "special_tokens", ()))
        self.rationale_params = config.rationale
        if backend.style == "raw":
            stops = [s for s in RAW_STOP if s not in config.rationale.stop]
            self.rationale_params = config.rationale.model_copy(update={"stop": [*config.rationale.stop, *stops]})
        self.truncated = 0
        self.too_long = 0

    def principles_for(self, key: str) -> list[ComparisonPrinciple]:
        """The principles one comparison is judged under, drawn from the seed and its key alone."""
        pool = self.constitution.comparison
        if self.config.principles == "all":
            return list(pool)
        rng = random.Random(derive_seed(self.seed, "comparison-principles", key))
        if self.config.principles == "k":
            return rng.sample(pool, min(self.config.k, len(pool)))
        return [rng.choice(pool)]

    def _orders(self) -> tuple[str, ...]:
        return ("ab", "ba") if self.config.both_orders else ("ab",)

    def _fit(self, comparison: Comparison,
             make: Callable[[Conversation], Any]) -> tuple[Any, bool, Conversation] | None:
        """Build the prompt, dropping the oldest turns (then the start of the first one) until it fits
        the context; the principle, the options and the answer are never cut."""
        reserve = 16 + (self.config.rationale.max_new_tokens if self.config.chain_of_thought else 0)
        budget = self.backend.context_length - reserve
        conversation = list(comparison.prompt)
        cut = False
        while True:
            if not conversation:
                return None
            built = make(conversation)
            prompt = built.prompt if isinstance(built, FeedbackQuestion) else built
            if self.backend.count_tokens([prompt])[0] <= budget:
                return built, cut, conversation
            if len(conversation) > 1:
                conversation = conversation[1:]
            else:
                text = conversation[0]["content"]
                if len(text) < 32:
                    return None
                conversation = [{**conversation[0], "content": "..." + text[len(text) // 4:]}]
            cut = True

    def _shots_seed(self, key: str, principle_id: str, order: str) -> int:
        """The seed a question's few-shot block is drawn from: one of ``few_shot_blocks`` per run
        (identical blocks are a shared prompt prefix, computed once per batch), or its own."""
        blocks = self.config.few_shot_blocks
        if blocks:
            block = derive_seed(self.seed, "feedback-shot-block", key, principle_id, order) % blocks
            return derive_seed(self.seed, "feedback-shots", block)
        return derive_seed(self.seed, "feedback-shots", key, principle_id, order)

    def questions(self, comparisons: Sequence[Comparison]) -> list[str | Conversation]:
        """The question prompts :meth:`label` scores, in order, before any truncation (for judges
        and benchmarks that must ask exactly the same questions)."""
        return [self.builder.build(list(comparisons[job.ci].prompt), job.principle.text, job.a, job.b,
                                   random.Random(job.seed)).prompt for job in self._jobs(comparisons)]

    def _jobs(self, comparisons: Sequence[Comparison]) -> list[_Job]:
        """One question per (comparison, principle, order), with its option order and few-shot seed."""
        jobs = []
        for ci, comp in enumerate(comparisons):
            for principle in self.principles_for(comp.key):
                for order in self._orders():
                    a, b = (comp.response_a, comp.response_b) if order == "ab" else (comp.response_b, comp.response_a)
                    jobs.append(_Job(ci, principle, order, a, b, self._shots_seed(comp.key, principle.id, order)))
        return jobs

    def label(self, comparisons: Sequence[Comparison]) -> list[dict[str, Any] | None]:
        """One record per comparison (None when it cannot fit the context even truncated)."""
        jobs = self._jobs(comparisons)
        fitted: list[tuple[Any, bool, Conversation] | None] = []
        rationales: list[str | None] = [None] * len(jobs)
        for job in jobs:
            make = self.builder.rationale_prompt if self.config.chain_of_thought else self.builder.build
            fitted.append(self._fit(comparisons[job.ci], lambda conv, job=job, make=make:
                                    make(conv, job.principle.text, job.a, job.b, random.Random(job.seed))))
        if self.config.chain_of_thought:
            live = [i for i, f in enumerate(fitted) if f is not None]
            seeds = [derive_seed(self.seed, "rationale", comparisons[jobs[i].ci].key, jobs[i].principle.id,
                                 jobs[i].order) for i in live]
            outs = self.backend.generate([fitted[i][0] for i in live], self.rationale_params, seeds=seeds)
            for i, g in zip(live, outs, strict=True):
                rationales[i] = clean_completion(g.text, self.backend.style)
            questions: list[FeedbackQuestion | None] = []
            for j, job in enumerate(jobs):
                if fitted[j] is None:
                    questions.append(None)
                    continue
                # the question with its rationale (and any few-shot block) is fitted again: it is
                # longer than the prompt the rationale was generated from
                comp = comparisons[job.ci]
                final = self._fit(Comparison(comp.key, fitted[j][2], job.a, job.b),
                                  lambda conv, job=job, r=rationales[j] or "": self.builder.build(
                                      conv, job.principle.text, job.a, job.b, random.Random(job.seed), prefix=r))
                if final is not None and final[1]:
                    fitted[j] = (fitted[j][0], True, final[2])
                questions.append(final[0] if final is not None else None)
        else:
            questions = [f[0] if f is not None else None for f in fitted]
        live = [i for i, q in enumerate(questions) if q is not None]
        scores = self.backend.score_choices([questions[i].prompt for i in live],  # type: ignore[union-attr]
                                            [list(questions[i].choices) for i in live])  # type: ignore[union-attr]
        p_slot_a: dict[int, float] = {i: normalise(*s) for i, s in zip(live, scores, strict=True)}
        return self._records(comparisons, jobs, fitted, p_slot_a, rationales)

    def _records(self, comparisons: Sequence[Comparison], jobs: list[_Job],
                 fitted: list[Any], p_slot_a: dict[int, float], rationales: list[str | None]) -> list[dict | None]:
        per: dict[int, dict[str, dict[str, Any]]] = {}
        truncated: dict[int, bool] = {}
        failed: set[int] = set()
        for j, job in enumerate(jobs):
            ci, principle, order = job.ci, job.principle, job.order
            if j not in p_slot_a:
                failed.add(ci)
                continue
            truncated[ci] = truncated.get(ci, False) or bool(fitted[j][1])
            # P(response_a is better): slot A holds response_a in order ab, response_b in order ba
            p = p_slot_a[j] if order == "ab" else 1.0 - p_slot_a[j]
            if self.config.chain_of_thought:
                p = clamp(p, self.config.clamp)
            entry = per.setdefault(ci, {}).setdefault(principle.id, {"id": principle.id})
            entry["p_a_ab" if order == "ab" else "p_a_ba"] = p
            if rationales[j] is not None:
                entry[f"rationale_{order}"] = rationales[j]
        records: list[dict[str, Any] | None] = []
        for ci, comp in enumerate(comparisons):
            if ci in failed:
                self.too_long += 1
                records.append(None)
                continue
            self.truncated += int(truncated.get(ci, False))
            principles = list(per[ci].values())
            for entry in principles:
                orders = [entry[k] for k in ("p_a_ab", "p_a_ba") if k in entry]
                entry["p_a"] = sum(orders) / len(orders)
                entry.setdefault("p_a_ba", None)
            p_a = sum(e["p_a"] for e in principles) / len(principles)
            a_wins = p_a >= 0.5
            records.append({
                "key": comp.key,
                "prompt": comp.prompt,
                "response_a": comp.response_a,
                "response_b": comp.response_b,
                "chosen": comp.response_a if a_wins else comp.response_b,
                "rejected": comp.response_b if a_wins else comp.response_a,
                "p_chosen": p_a if a_wins else 1.0 - p_a,
                "p_a": p_a,
                "principles": principles,
                "labeler_id": self.backend.model_id,
                "constitution_hash": self.constitution.hash,
                "seed": self.seed,
                "chain_of_thought": self.config.chain_of_thought,
                "truncated": truncated.get(ci, False),
            })
        return records


def position_pairs(records: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """``(P(slot A wins) in order AB, P(slot A wins) in order BA)`` over every principle scored in
    both orders: the input of the position-bias rate."""
    first, second = [], []
    for record in records:
        for entry in record["principles"]:
            if entry.get("p_a_ba") is not None:
                first.append(entry["p_a_ab"])
                second.append(1.0 - entry["p_a_ba"])
    return first, second
