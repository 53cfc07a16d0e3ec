"""Elo ratings from pairwise comparisons: the Bradley-Terry maximum-likelihood fit behind the
paper's harmlessness-versus-helpfulness figure.

Model ``i`` has strength ``theta_i``; it beats ``j`` with probability ``sigma(theta_i - theta_j)``.
On the Elo scale (``P = 1 / (1 + 10^((R_j - R_i) / 400))``) a rating is ``R = 400 theta / ln 10``.
The fit takes soft outcomes (a PM's or a labeler's probability, or 1 / 0.5 / 0), maximises the
likelihood by Newton's method with a weak Gaussian prior (so a model that never lost stays
finite), and anchors one model at 0 (the paper anchors the initial helpful model). Confidence
intervals come from a bootstrap over the comparisons.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ELO_PER_NAT = 400.0 / math.log(10.0)


@dataclass(frozen=True)
class Comparison:
    """One judged pair: ``score`` is how much ``a`` won (1 = a won, 0 = b won, 0.5 = tie, or a probability)."""

    a: str
    b: str
    score: float


def fit_strengths(comparisons: Sequence[Comparison], models: Sequence[str], prior: float = 0.01,
                  iterations: int = 100) -> np.ndarray:
    """Bradley-Terry strengths (natural-log scale, mean 0) by Newton's method on the penalised
    log-likelihood ``sum s log sigma(d) + (1 - s) log sigma(-d) - prior/2 |theta|^2``."""
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[c.a] for c in comparisons])
    b = np.array([index[c.b] for c in comparisons])
    s = np.array([c.score for c in comparisons], dtype=float)
    theta = np.zeros(len(models))
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
        residual = s - p  # d loglik / d(theta_a - theta_b)
        grad = -prior * theta
        np.add.at(grad, a, residual)
        np.add.at(grad, b, -residual)
        w = p * (1.0 - p)
        hess = -prior * np.eye(len(models))
        np.add.at(hess, (a, a), -w)
        np.add.at(hess, (b, b), -w)
        np.add.at(hess, (a, b), w)
        np.add.at(hess, (b, a), w)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta - theta.mean()


@dataclass(frozen=True)
class EloResult:
    ratings: dict[str, float]  # anchored: ratings[anchor] == 0
    lower: dict[str, float]  # bootstrap percentile interval
    upper: dict[str, float]
    comparisons: int
    anchor: str


def elo_ratings(comparisons: Sequence[Comparison], anchor: str | None = None, bootstrap: int = 200,
                confidence: float = 0.95, seed: int = 0) -> EloResult:
    """Anchored Elo ratings with bootstrap confidence intervals."""
    if not comparisons:
        raise ValueError("no comparisons to rate")
    models = sorted({c.a for c in comparisons} | {c.b for c in comparisons})
    anchor = anchor or models[0]
    if anchor not in models:
        raise ValueError(f"anchor {anchor!r} takes part in no comparison")

    def anchored(theta: np.ndarray) -> np.ndarray:
        return (theta - theta[models.index(anchor)]) * ELO_PER_NAT

    point = anchored(fit_strengths(comparisons, models))
    rng = random.Random(seed)
    samples = []
    for _ in range(bootstrap):
        resample = [comparisons[rng.randrange(len(comparisons))] for _ in comparisons]
        present = {c.a for c in resample} | {c.b for c in resample}
        if present != set(models):
            continue  # a model missing from the resample has no rating in it
        samples.append(anchored(fit_strengths(resample, models)))
    tail = (1.0 - confidence) / 2.0
    if samples:
        stacked = np.stack(samples)
        lo, hi = np.quantile(stacked, tail, axis=0), np.quantile(stacked, 1.0 - tail, axis=0)
    else:
        lo = hi = point
    return EloResult({m: float(point[i]) for i, m in enumerate(models)},
                     {m: float(lo[i]) for i, m in enumerate(models)},
                     {m: float(hi[i]) for i, m in enumerate(models)}, len(comparisons), anchor)


def win_probability(rating_a: float, rating_b: float) -> float:
    """P(a beats b) on the Elo scale."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))
