"""Metrics for judging an AI feedback labeler: accuracy, calibration and position bias.

RL-CAI trains the preference model on the labeler's *soft* labels, so a labeler is only as useful as
its probabilities are honest: it must pick the better response (accuracy), say how sure it is
truthfully (calibration, ECE and the reliability diagram), and not prefer whichever response
happens to be shown first (position bias).

Most functions take ``p_correct``: for each labelled comparison, the probability the labeler gave
to the response that is actually better. Binary preferences are symmetric, so the labeler's
*confidence* is ``max(p, 1 - p)`` (always in [0.5, 1]) and its pick is right when ``p > 0.5``.
A probability of exactly 0.5 is a coin flip with no pick: it counts as half correct everywhere,
so a labeler that always answers 0.5 scores 50% accuracy, as chance would, and has ECE 0.

All functions are pure, read any sequence of numbers (lists, tuples, NumPy arrays, 1-D tensors)
and raise ``ValueError`` on empty input or values that are not probabilities.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "binary_accuracy",
    "calibration_summary",
    "difference_interval",
    "expected_calibration_error",
    "position_bias_rate",
    "reliability_bins",
    "reliability_diagram",
    "wilson_interval",
]

# Bin edges are compared with this slack so that a confidence written as a decimal edge (0.6,
# 0.7, ...) lands in the bin that starts there, despite binary rounding of (0.6 - 0.5) * 20.
_EDGE_TOL = 1e-9


def _probabilities(values: Sequence[float], name: str) -> list[float]:
    """Floats checked to be finite and in [0, 1]: a bad label must fail loudly, not skew a metric."""
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name} is empty: need at least one probability")
    for i, p in enumerate(out):
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"{name}[{i}] = {p!r} is not a probability in [0, 1]")
    return out


def _check_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return n_bins


def _correctness(p: float) -> float:
    """1 if the pick is right, 0 if wrong, 0.5 for an exact 0.5 (no pick, so half credit)."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def _confidence(p: float) -> float:
    return max(p, 1.0 - p)


def _bin_index(confidence: float, n_bins: int) -> int:
    """Equal-width bins over [0.5, 1]: bin i is [lo, hi), the last one also holds 1.0."""
    idx = math.floor((confidence - 0.5) * 2 * n_bins + _EDGE_TOL)
    return min(max(idx, 0), n_bins - 1)


def binary_accuracy(p_correct: Sequence[float]) -> float:
    """Fraction of comparisons where the labeler favours the better response (p > 0.5).

    An exact 0.5 counts as half correct: it picks neither side, and counting it as right or wrong
    would reward or punish a labeler for abstaining.
    """
    ps = _probabilities(p_correct, "p_correct")
    return sum(_correctness(p) for p in ps) / len(ps)


def reliability_bins(p_correct: Sequence[float], n_bins: int = 10) -> list[dict[str, Any]]:
    """Per-confidence-bin counts, mean confidence and accuracy: the data behind the diagram and ECE.

    Bins split the binary confidence range [0.5, 1] into ``n_bins`` equal-width intervals
    ``[lo, hi)`` (the last one closed). Every bin is returned, in order, so plots and tables line
    up across labelers; an empty bin has ``count`` 0 and ``None`` for ``mean_confidence`` and
    ``accuracy``.
    """
    n_bins = _check_bins(n_bins)
    ps = _probabilities(p_correct, "p_correct")
    conf_sum = [0.0] * n_bins
    correct_sum = [0.0] * n_bins
    counts = [0] * n_bins
    for p in ps:
        c = _confidence(p)
        b = _bin_index(c, n_bins)
        counts[b] += 1
        conf_sum[b] += c
        correct_sum[b] += _correctness(p)
    width = 0.5 / n_bins
    bins: list[dict[str, Any]] = []
    for b in range(n_bins):
        n = counts[b]
        bins.append({
            "lo": 0.5 + b * width,
            "hi": 0.5 + (b + 1) * width if b < n_bins - 1 else 1.0,
            "count": n,
            "mean_confidence": conf_sum[b] / n if n else None,
            "accuracy": correct_sum[b] / n if n else None,
        })
    return bins


def _ece_from_bins(bins: list[dict[str, Any]]) -> float:
    total = sum(b["count"] for b in bins)
    return sum(
        b["count"] / total * abs(b["accuracy"] - b["mean_confidence"]) for b in bins if b["count"]
    )


def expected_calibration_error(p_correct: Sequence[float], n_bins: int = 10) -> float:
    """Expected calibration error: how far stated confidence is from actual accuracy, on average.

    Soft labels become the preference model's targets, so a labeler that says 0.99 but is right
    70% of the time teaches overconfidence (ECE 0.29). Computed in the binary "confidence" form:
    ``ECE = sum_b (n_b / N) * |accuracy_b - mean_confidence_b|`` over the bins of
    :func:`reliability_bins`. 0 is perfectly calibrated; the maximum is 1.
    """
    return _ece_from_bins(reliability_bins(p_correct, n_bins))


def calibration_summary(p_correct: Sequence[float], n_bins: int = 10) -> dict[str, Any]:
    """Accuracy, ECE, N, mean confidence and the bins in one dict, for reports and JSON logs."""
    ps = _probabilities(p_correct, "p_correct")
    bins = reliability_bins(ps, n_bins)
    return {
        "n": len(ps),
        "accuracy": binary_accuracy(ps),
        "ece": _ece_from_bins(bins),
        "mean_confidence": sum(_confidence(p) for p in ps) / len(ps),
        "bins": bins,
    }


def reliability_diagram(
    p_correct: Sequence[float],
    path: str | os.PathLike[str],
    title: str = "AI feedback labeler reliability",
    n_bins: int = 10,
) -> Path:
    """Save a reliability diagram (accuracy per confidence bin vs. the diagonal) as a PNG.

    A picture shows *where* a labeler is miscalibrated (e.g. only its most confident answers),
    which one ECE number hides. Drawn on a bare :class:`~matplotlib.figure.Figure` with the Agg
    canvas, never pyplot, so it neither needs a display nor changes the process's backend.
    Parent directories are created. Returns the path written.
    """
    summary = calibration_summary(p_correct, n_bins)  # validate before paying for matplotlib's import

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = summary["bins"]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.5 / len(bins)
    filled = [b for b in bins if b["count"]]
    ax.bar(
        [b["lo"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
        color="tab:blue", edgecolor="black", alpha=0.75, label="accuracy",
    )
    ax.plot(
        [b["mean_confidence"] for b in filled], [b["accuracy"] for b in filled], "o",
        color="tab:orange", markersize=4, label="mean confidence",
    )
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfect calibration")
    for b in filled:
        ax.annotate(
            f"n={b['count']}", (b["lo"] + width / 2, b["accuracy"]), xytext=(0, 3),
            textcoords="offset points", ha="center", va="bottom", fontsize=7,
        )
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.08)
    ax.set_xlabel("confidence  max(p, 1 - p)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {summary['ece']:.3f}   N = {summary['n']}   accuracy = {summary['accuracy']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def position_bias_rate(p_first_order: Sequence[float], p_second_order: Sequence[float]) -> float:
    """Fraction of comparisons where the same *slot* wins in both presentation orders.

    Each comparison is scored twice with the responses swapped; both inputs are P(slot A wins).
    A judge that reads content picks the same *response* both times, so the winning slot flips:
    rate 0. A judge that always picks slot A has rate 1. A comparison counts when both
    probabilities are > 0.5 or both are < 0.5; an exact 0.5 in either order names no winner and
    does not count.
    """
    p1 = _probabilities(p_first_order, "p_first_order")
    p2 = _probabilities(p_second_order, "p_second_order")
    if len(p1) != len(p2):
        raise ValueError(
            f"p_first_order has {len(p1)} items but p_second_order has {len(p2)}: "
            "each comparison must be scored in both orders"
        )
    same_slot = sum(1 for a, b in zip(p1, p2, strict=False) if (a > 0.5 and b > 0.5) or (a < 0.5 and b < 0.5))
    return same_slot / len(p1)


def wilson_interval(accuracy: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on ``n`` items.

    Evaluation sets here are small (5 held-out pairs on the toy run, a few hundred on a real one),
    and the normal approximation then gives intervals outside [0, 1] or of zero width at 0% and
    100%; Wilson's stays inside and honest. ``accuracy`` may count half-credit ties, so it is taken
    as a rate rather than a count of successes.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
        raise ValueError(f"accuracy = {accuracy!r} is not a rate in [0, 1]")
    z2 = z * z
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(a: float, a_interval: tuple[float, float], b: float,
                        b_interval: tuple[float, float]) -> tuple[float, float]:
    """Interval of ``b - a`` for two independent estimates, from each one's own interval (MOVER,
    Newcombe's method for two proportions).

    Two runs are measured on different samples, so "B is better" needs the uncertainty of both; the
    intervals may be asymmetric (Wilson, bootstrap), which adding standard errors would ignore.
    """
    (a_lo, a_hi), (b_lo, b_hi) = a_interval, b_interval
    d = b - a
    return d - math.hypot(b - b_lo, a_hi - a), d + math.hypot(b_hi - b, a - a_lo)
