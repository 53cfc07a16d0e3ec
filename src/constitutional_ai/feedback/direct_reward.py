"""Direct RLAIF (Lee et al. 2023, d-RLAIF): the feedback model's own judgement is the reward, with
no preference model trained in between.

Nothing is generated: every reward call is one batched ``score_choices`` pass over the questions
of all its responses, so a PPO step costs the judge one forward pass per question.

- ``rating``: the feedback model rates each response from 1 to 10 under a comparison principle
  read as a standard; the reward is the expected rating ``sum_k k * softmax(logp)_k``, in
  ``[1, 10]`` (``center=True``: less the midpoint 5.5, so an average response earns 0; the RL
  stage centres). The expectation, not the argmax, keeps the reward smooth in the judge's
  confidence, so small improvements in a response still move it.
- ``pairwise``: the feedback model answers the labeler's A/B question, the response against the
  reference policy's response to the same prompt; the reward is ``2 * P(response better) - 1``,
  in ``[-1, 1]`` (0 is "as good as the reference").

Principles follow ``FeedbackConfig.principles`` exactly as for labels, drawn from the seed and the
(prompt, response) alone, so a reward is reproducible whatever the batch. ``chain_of_thought`` is
not used here (a rationale would have to be generated).

A response whose question cannot fit the feedback model's context, even with every earlier turn
dropped and the first cut, gets the minimum reward (1 in ``rating``, -1 in ``pairwise``) and is
marked ``too_long`` in :attr:`FeedbackReward.last`: raising would kill an RL run over one sample,
while the minimum tells the policy that a response its judge cannot read is not a good one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from constitutional_ai.backends.base import LanguageModel
from constitutional_ai.common.types import Conversation
from constitutional_ai.config import FeedbackConfig
from constitutional_ai.constitution.model import ComparisonPrinciple, Constitution
from constitutional_ai.data.prompts import conversation_key
from constitutional_ai.feedback.labeler import Comparison, FeedbackLabeler
from constitutional_ai.feedback.prompts import RATINGS, RatingQuestion

#: The reference policy's response to each prompt: a function of the batch's prompts, or a mapping
#: from :func:`~constitutional_ai.data.prompts.conversation_key` to the response.
Reference = Callable[[list[Conversation]], list[str]] | Mapping[str, str]

#: Tokens kept free after a rating question: the longest choice (``Rating: 10/10``) with room to spare.
_RESERVE = 16


def softmax(logps: Sequence[float]) -> list[float]:
    """Normalised probabilities from log-probabilities, computed stably."""
    top = max(logps)
    exps = [math.exp(x - top) for x in logps]
    total = sum(exps)
    return [e / total for e in exps]


def expected_rating(logps: Sequence[float]) -> tuple[float, list[float]]:
    """The expected rating over :data:`RATINGS` and the distribution it is taken under."""
    probs = softmax(logps)
    return sum(k * p for k, p in zip(RATINGS, probs, strict=True)), probs


def reward_key(prompt: Conversation, response: str) -> str:
    """What a reward's principles are drawn from: the prompt's content key and the response."""
    digest = hashlib.sha256(response.encode("utf-8")).hexdigest()[:20]
    return f"{conversation_key(prompt)}/{digest}"


class FeedbackReward:
    """A :data:`~constitutional_ai.common.types.RewardFn` scored by the feedback model.

    After each call :attr:`last` holds one dict per response: ``principle`` (an id when one is
    sampled, a list of ids under ``k``/``all``), ``reward``, ``key``, ``truncated`` (earlier turns
    dropped to fit), ``too_long``, and ``ratings`` (P(1)..P(10), averaged over principles) in
    ``rating`` mode or ``p_better`` and ``reference`` in ``pairwise`` mode. ``truncated`` and
    ``too_long`` count responses over the object's life, as the labeler's counters do.
    """

    last: list[dict[str, Any]]

    def __init__(self, backend: LanguageModel, constitution: Constitution, config: FeedbackConfig, *,
                 mode: Literal["rating", "pairwise"] = "rating", seed: int = 0,
                 reference: Reference | None = None, center: bool = False):
        if mode not in ("rating", "pairwise"):
            raise ValueError(f"mode must be 'rating' or 'pairwise', not {mode!r}")
        if mode == "pairwise" and reference is None:
            raise ValueError("pairwise feedback rewards need reference responses (reference=...) to compare against")
        self.backend = backend
        self.constitution = constitution
        # a rationale would be generated text; the reward is always one scoring pass
        self.config = config.model_copy(update={"chain_of_thought": False})
        self.mode = mode
        self.seed = seed
        self.reference = reference
        # ratings centred on the scale's midpoint: an average response earns 0, so a PPO value that
        # starts at 0 learns the differences between responses instead of a constant offset of ~5
        self.offset = (RATINGS[0] + RATINGS[-1]) / 2 if center and mode == "rating" else 0.0
        # the labeler owns principle sampling, the A/B question, both orders and fitting: pairwise
        # rewards are its labels, and ratings draw their principles exactly as it does
        self.labeler = FeedbackLabeler(backend, constitution, self.config, seed=seed)
        self.builder = self.labeler.builder
        self.last = []
        self.truncated = 0
        self.too_long = 0

    def principles_for(self, prompt: Conversation, response: str) -> list[ComparisonPrinciple]:
        """The principles one response is judged under."""
        return self.labeler.principles_for(reward_key(prompt, response))

    def _principle_field(self, ids: list[str]) -> str | list[str]:
        return ids[0] if self.config.principles == "sample" else ids

    def __call__(self, prompts: list[Conversation], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            self.last = []
            return []
        details = self._rating(prompts, responses) if self.mode == "rating" else self._pairwise(prompts, responses)
        self.truncated += sum(d["truncated"] for d in details)
        self.too_long += sum(d["too_long"] for d in details)
        if self.offset:
            for d in details:
                d["expected_rating"], d["reward"] = d["reward"], d["reward"] - self.offset
        self.last = details
        return [d["reward"] for d in details]

    # -- rating -----------------------------------------------------------------------------------
    def _fit(self, prompt: Conversation, principle: str, response: str,
             first: RatingQuestion, first_tokens: int) -> tuple[RatingQuestion | None, bool]:
        """The rating question, with the oldest turns dropped (then the start of the first one) until
        it fits the context, as the labeler fits its questions; the principle, the response and the
        cue are never cut. ``None`` when even that cannot fit."""
        budget = self.backend.context_length - _RESERVE
        if first_tokens <= budget:
            return first, False
        conversation = list(prompt)
        while True:
            if len(conversation) > 1:
                conversation = conversation[1:]
            else:
                text = conversation[0]["content"] if conversation else ""
                if len(text) < 32:
                    return None, True
                conversation = [{**conversation[0], "content": "..." + text[len(text) // 4:]}]
            built = self.builder.build_rating(conversation, principle, response)
            if self.backend.count_tokens([built.prompt])[0] <= budget:
                return built, True

    def _rating(self, prompts: list[Conversation], responses: list[str]) -> list[dict[str, Any]]:
        jobs: list[tuple[int, ComparisonPrinciple]] = []
        principles: list[list[ComparisonPrinciple]] = []
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            principles.append(self.principles_for(prompt, response))
            jobs += [(i, p) for p in principles[-1]]
        built = [self.builder.build_rating(list(prompts[i]), p.text, responses[i]) for i, p in jobs]
        lengths = self.backend.count_tokens([q.prompt for q in built])  # one batch for the common case
        questions: list[RatingQuestion | None] = []
        truncated = [False] * len(prompts)
        for (i, p), q, n in zip(jobs, built, lengths, strict=True):
            fitted, cut = self._fit(list(prompts[i]), p.text, responses[i], q, n)
            questions.append(fitted)
            truncated[i] |= cut and fitted is not None
        dead = {i for (i, _), q in zip(jobs, questions, strict=True) if q is None}
        # a response is rated under all its principles or not at all
        live = [j for j, (i, _) in enumerate(jobs) if i not in dead]
        scores = self.backend.score_choices([questions[j].prompt for j in live],  # type: ignore[union-attr]
                                            [list(questions[j].choices) for j in live]) if live else []  # type: ignore[union-attr]
        by_job = dict(zip(live, scores, strict=True))
        details = []
        jobs_of: dict[int, list[int]] = {}
        for j, (i, _) in enumerate(jobs):
            jobs_of.setdefault(i, []).append(j)
        for i in range(len(prompts)):
            entry: dict[str, Any] = {"principle": self._principle_field([p.id for p in principles[i]]),
                                     "key": reward_key(prompts[i], responses[i])}
            if i in dead:
                entry.update(reward=float(RATINGS[0]), ratings=None, truncated=False, too_long=True)
            else:
                rated = [expected_rating(by_job[j]) for j in jobs_of[i]]
                ratings = [sum(dist[k] for _, dist in rated) / len(rated) for k in range(len(RATINGS))]
                entry.update(reward=sum(r for r, _ in rated) / len(rated), ratings=ratings,
                             truncated=truncated[i], too_long=False)
                if len(rated) > 1:
                    entry["principle_rewards"] = [r for r, _ in rated]
            details.append(entry)
        return details

    # -- pairwise ---------------------------------------------------------------------------------
    def _references(self, prompts: list[Conversation]) -> list[str]:
        if isinstance(self.reference, Mapping):
            missing = [conversation_key(p) for p in prompts if conversation_key(p) not in self.reference]
            if missing:
                raise KeyError(f"no reference response for prompt {missing[0]} ({len(missing)} missing)")
            return [self.reference[conversation_key(p)] for p in prompts]
        refs = list(self.reference(prompts))  # type: ignore[misc]
        if len(refs) != len(prompts):
            raise ValueError(f"the reference gave {len(refs)} responses for {len(prompts)} prompts")
        return refs

    def _pairwise(self, prompts: list[Conversation], responses: list[str]) -> list[dict[str, Any]]:
        refs = self._references(prompts)
        comparisons = [Comparison(reward_key(p, r), list(p), r, ref)
                       for p, r, ref in zip(prompts, responses, refs, strict=True)]
        # response_a is the response: the label's p_a is P(response better than the reference),
        # averaged over both option orders and the principles exactly as a preference label is
        records = self.labeler.label(comparisons)
        details = []
        for comp, ref, record in zip(comparisons, refs, records, strict=True):
            ids = [p.id for p in self.labeler.principles_for(comp.key)]
            entry: dict[str, Any] = {"principle": self._principle_field(ids), "key": comp.key, "reference": ref}
            if record is None:
                entry.update(reward=-1.0, p_better=None, truncated=False, too_long=True)
            else:
                p = float(record["p_a"])
                entry.update(reward=2.0 * p - 1.0, p_better=p, truncated=bool(record["truncated"]), too_long=False)
            details.append(entry)
        return details
