"""``cai eval``: checkpoints answer held-out red-team and helpfulness prompts, a preference model
judges every pair of answers to the same prompt, and Elo ratings with bootstrap intervals come out
per prompt set, anchored on the first checkpoint (the paper anchors the initial helpful model).

Each comparison's outcome is the judge's probability ``sigma(r_a - r_b)``, not a hard win, so a
near-tie counts as one. Answers stream to ``<output_dir>/eval/records.jsonl`` (resumable, keyed by
set, checkpoint and prompt); ``elo.json`` and ``elo.png`` (harmlessness against helpfulness, as the
paper's figure) are written at the end.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from constitutional_ai.config import RunConfig
from constitutional_ai.evaluation.elo import Comparison, elo_ratings

SETS = ("harmless", "helpful")


def feedback_judgments(records: list[dict[str, Any]], names: list[str],
                       config: RunConfig) -> dict[tuple[str, str, str, str], float]:
    """``P(a's answer is better)`` for every pair of answers to one prompt, from the feedback model
    answering the paper's multiple-choice question under sampled comparison principles."""
    from constitutional_ai.backends import load_backend
    from constitutional_ai.constitution import Constitution
    from constitutional_ai.feedback.labeler import Comparison as Pair
    from constitutional_ai.feedback.labeler import FeedbackLabeler

    answers: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        answers.setdefault((r["set"], r["prompt_key"]), {})[r["model"]] = r
    pairs, index = [], []
    for (s, key), by_model in answers.items():
        for a, b in itertools.combinations(names, 2):
            if a in by_model and b in by_model:
                pairs.append(Pair(f"{s}:{key}:{a}:{b}", by_model[a]["prompt"], by_model[a]["response"],
                                  by_model[b]["response"]))
                index.append((s, key, a, b))
    backend = load_backend(config.feedback.model or config.policy)
    try:
        labeler = FeedbackLabeler(backend, Constitution.load(config.constitution), config.feedback, seed=config.seed)
        labels = labeler.label(pairs)
    finally:
        backend.close()
    return {i: label["p_a"] for i, label in zip(index, labels, strict=True) if label is not None}


def summarise(records: list[dict[str, Any]], names: list[str], bootstrap: int, seed: int, plot: Path,
              judged: dict[tuple[str, str, str, str], float] | None = None) -> dict[str, Any]:
    """Elo per prompt set from every pair of checkpoints' answers to the same prompt: the PM's
    ``sigma(r_a - r_b)``, or the feedback model's ``P(a is better)`` when ``judged`` is given."""
    summary: dict[str, Any] = {"anchor": names[0], "checkpoints": names}
    for s in SETS:
        by_prompt: dict[str, dict[str, float]] = {}
        for r in records:
            if r["set"] == s and r["model"] in names:
                by_prompt.setdefault(r["prompt_key"], {})[r["model"]] = r["reward"]
        if judged is not None:
            comparisons = [Comparison(a, b, p) for (js, _, a, b), p in judged.items() if js == s]
        else:
            comparisons = [Comparison(a, b, 1.0 / (1.0 + math.exp(-(scores[a] - scores[b]))))
                           for scores in by_prompt.values() for a, b in itertools.combinations(names, 2)
                           if a in scores and b in scores and scores[a] is not None and scores[b] is not None]
        if not comparisons:
            continue
        result = elo_ratings(comparisons, anchor=names[0], bootstrap=bootstrap, seed=seed)
        rewards = {m: [sc[m] for sc in by_prompt.values() if sc.get(m) is not None] for m in names}
        summary[s] = {"elo": {m: round(result.ratings[m], 1) for m in names},
                      "lower": {m: round(result.lower[m], 1) for m in names},
                      "upper": {m: round(result.upper[m], 1) for m in names},
                      "mean_reward": {m: sum(v) / len(v) for m, v in rewards.items() if v},
                      "prompts": len(by_prompt), "comparisons": len(comparisons)}
    if all(s in summary for s in SETS):
        plot_elo(summary, plot)
    return summary


def plot_elo(summary: dict[str, Any], path: Path) -> Path:
    """Harmlessness Elo against helpfulness Elo, with bootstrap intervals (the paper's figure 2)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    help_, harm = summary["helpful"], summary["harmless"]
    for name in summary["checkpoints"]:
        x, y = help_["elo"][name], harm["elo"][name]
        ax.errorbar(x, y, xerr=[[x - help_["lower"][name]], [help_["upper"][name] - x]],
                    yerr=[[y - harm["lower"][name]], [harm["upper"][name] - y]], fmt="o", capsize=3, label=name)
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title(f"Elo vs {summary['anchor']} (95% bootstrap intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
