"""Sampling that depends on each prompt's seed alone, for batched generation with transformers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from constitutional_ai.config import GenerationParams


class SeededSampler(LogitsProcessor):
    """Temperature/top-k/top-p sampling with one random stream per sequence (the Gumbel-max trick).

    Adding Gumbel noise to the warped log-probabilities and taking the argmax is an exact sample
    from them; drawing each row's noise from a generator seeded for that prompt makes the sample
    depend on the prompt's seed alone, not on which batch it ran in or what else was in it, so a
    resumed or re-batched run writes the same records as an uninterrupted one (as vLLM's per-request
    ``seed`` does). Generation itself then runs greedy, taking the argmax this returns.
    """

    def __init__(self, params: GenerationParams, seeds: Sequence[int]):
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.warpers: list[Any] = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s % 2**63) for s in self.seeds]
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
        return scores.float().log_softmax(-1) + gumbel
