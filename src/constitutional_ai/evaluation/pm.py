"""Preference-model quality on pairs with known answers: accuracy, margin, soft-label agreement and
calibration, written beside the model so the numbers travel with it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from constitutional_ai.common.errors import DataError
from constitutional_ai.data.store import write_atomic
from constitutional_ai.evaluation.calibration import calibration_summary, reliability_diagram
from constitutional_ai.layout import PM_EVAL_RESULTS
from constitutional_ai.preference_model.data import PreferencePair

if TYPE_CHECKING:
    from constitutional_ai.preference_model.reward_model import RewardModel


def evaluate_pm(scorer: RewardModel, pairs: list[PreferencePair], directory: Path, n_bins: int = 10,
                title: str = "eval pairs", name: str = PM_EVAL_RESULTS) -> dict[str, Any]:
    """Pairwise accuracy, mean margin, agreement with soft labels and calibration of
    ``sigma(r_w - r_l)``; written as JSON (and a reliability PNG) in ``directory``."""
    if not pairs:
        raise DataError("no evaluation pairs; pass --eval-data or set pm.eval_fraction above 0")
    chosen = scorer.score_responses([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = scorer.score_responses([p.prompt for p in pairs], [p.rejected for p in pairs])
    margins = [w - lo for w, lo in zip(chosen, rejected, strict=True)]
    p_model = [1.0 / (1.0 + math.exp(-m)) for m in margins]
    calibration = calibration_summary(p_model, n_bins)
    png = reliability_diagram(p_model, directory / name.replace(".json", "_reliability.png"),
                              title=f"Preference model reliability ({title})", n_bins=n_bins)
    soft = [(p.p, q) for p, q in zip(pairs, p_model, strict=True) if 0.0 < p.p < 1.0]
    by_source: dict[str, list[float]] = {}
    for pair, m in zip(pairs, margins, strict=True):
        by_source.setdefault(pair.source, []).append(1.0 if m > 0 else 0.5 if m == 0 else 0.0)
    summary = {
        "model": scorer.name, "pairs": len(pairs),
        "accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "ece": calibration["ece"], "mean_confidence": calibration["mean_confidence"],
        "soft_label_mae": sum(abs(p - q) for p, q in soft) / len(soft) if soft else None,
        "accuracy_by_source": {s: sum(v) / len(v) for s, v in by_source.items()},
        "truncated_sides": scorer.truncated, "reliability_diagram": str(png), "bins": calibration["bins"],
    }
    write_atomic(directory / name, json.dumps(summary, indent=2))
    return summary
