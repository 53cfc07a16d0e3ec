"""The headline figures of a run, read in one place: the report, the comparison page and the end of
``cai run`` all call :func:`headline`, so the numbers a reader sees in a console, a forwarded page
and a diff of two runs can never disagree.

Every figure comes with what it rests on (how many prompts, pairs, items, steps) and, where it is
an estimate, its 95% interval: a PM accuracy of 0.8 on 5 pairs is not news, on 500 it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from constitutional_ai.data.store import RECORDS, read_json
from constitutional_ai.evaluation.calibration import wilson_interval
from constitutional_ai.evaluation.curves import rl_metric_curves
from constitutional_ai.layout import RunLayout
from constitutional_ai.report.render import count, plain, signed
from constitutional_ai.report.sources import records

SETS = ("harmless", "helpful")


def headline(run_dir: Path) -> dict[str, Any]:
    """``{"elo", "pm", "labeler", "rl"}``, each present only when the run measured it::

        {"elo": {"harmless": {checkpoint: {"elo", "lower", "upper"}}, "helpful": {...},
                 "prompts": {"harmless": int, "helpful": int}},
         "pm": {"accuracy", "lower", "upper", "n", "ece"},
         "labeler": {"accuracy", "lower", "upper", "n", "ece", "position_bias", "position_bias_n"},
         "rl": {"steps", "reward_start", "reward_end", "kl_start", "kl_end", "length_start", "length_end"}}

    A run that iterated RL-CAI has its last iteration's PM and RL figures there, and
    ``"iterations"``: one entry per iteration (see :func:`_iteration`).

    A file that is missing or unreadable leaves its key out: a partial run still has a headline."""
    layout = RunLayout(run_dir)
    iterations = layout.iterations()
    out: dict[str, Any] = {}
    elo = _elo(read_json(layout.elo))
    for key, value in (("elo", elo), ("pm", _pm(read_json(layout.latest("pm_eval").pm_eval))),
                       ("labeler", _labeler(read_json(layout.labeler_results), layout.eval_labeler / RECORDS)),
                       ("rl", _rl(layout.latest("rl_records").rl_records))):
        if value:
            out[key] = value
    if len(iterations) > 1:
        out["iterations"] = [_iteration(layout.at(k), elo) for k in iterations]
    return out


def _iteration(layout: RunLayout, elo: dict[str, Any]) -> dict[str, Any]:
    """One RL-CAI iteration: its PM on the fixed held-out set and on the newest policy's pairs (with
    the previous iteration's PM on those same pairs: how stale it had grown), its RL curves' ends,
    and its policy's Elo (``rl@K`` in the eval)."""
    k = layout.iteration
    out: dict[str, Any] = {"iteration": k}
    newest = read_json(layout.pm_eval_newest) or {}
    previous = newest.get("previous_pm") or {}
    for key, value in (("pm_heldout", _pm(read_json(layout.pm_eval))), ("pm_newest", _pm(newest)),
                       ("previous_pm_newest", _accuracy(previous.get("accuracy"), previous.get("pairs"), None)),
                       ("rl", _rl(layout.rl_records)),
                       ("elo", {s: elo[s][f"rl@{k}"] for s in SETS if f"rl@{k}" in elo.get(s, {})})):
        if value:
            out[key] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _elo(summary: dict[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {}
    out: dict[str, Any] = {}
    prompts: dict[str, int] = {}
    for s in SETS:
        ratings = summary.get(s)
        if not isinstance(ratings, dict) or not isinstance(ratings.get("elo"), dict):
            continue
        names = [m for m in summary.get("checkpoints") or ratings["elo"] if m in ratings["elo"]]
        bounds = {side: ratings.get(side) or {} for side in ("lower", "upper")}
        out[s] = {m: {"elo": float(ratings["elo"][m]), **{side: float(bounds[side].get(m, ratings["elo"][m]))
                                                           for side in bounds}} for m in names}
        if _number(ratings.get("prompts")):
            prompts[s] = int(ratings["prompts"])
    if out and prompts:
        out["prompts"] = prompts
    return out


def _accuracy(accuracy: Any, n: Any, ece: Any) -> dict[str, Any]:
    if not _number(accuracy) or not _number(n) or int(n) < 1:
        return {}
    lower, upper = wilson_interval(float(accuracy), int(n))
    out = {"accuracy": float(accuracy), "lower": lower, "upper": upper, "n": int(n)}
    if _number(ece):
        out["ece"] = float(ece)
    return out


def _pm(results: dict[str, Any] | None) -> dict[str, Any]:
    return _accuracy(results.get("accuracy"), results.get("pairs"), results.get("ece")) if results else {}


def _labeler(results: dict[str, Any] | None, store: Path) -> dict[str, Any]:
    if not results:
        return {}
    out = _accuracy(results.get("accuracy"), results.get("n"), results.get("ece"))
    if out:
        rate = results.get("position_bias_rate")
        n = results.get("position_bias_n")
        if rate is not None and not _number(n):  # older results files: count what the rate was taken over
            n = sum(1 for r in records(store) if r.get("kind") == "pairwise"
                    for p in r.get("principles") or [] if p.get("p_a_ba") is not None) or None
        out["position_bias"] = float(rate) if _number(rate) else None
        out["position_bias_n"] = int(n) if rate is not None and _number(n) else None
    return out


def _rl(path: Path) -> dict[str, Any]:
    curves = rl_metric_curves(path) if path.is_file() else {}
    if not curves:
        return {}
    out: dict[str, Any] = {"steps": max(step for points in curves.values() for step, _ in points)}
    for name, short in (("reward", "reward"), ("kl", "kl"), ("response_length", "length")):
        if curves.get(name):
            out[f"{short}_start"], out[f"{short}_end"] = curves[name][0][1], curves[name][-1][1]
    return out


def _whole(value: float) -> str:
    return str(round(value))


def format_headline(h: dict[str, Any]) -> list[str]:
    """One short line per measured figure, for a console or a mail: the same numbers as the report."""
    lines = []
    elo = h.get("elo", {})
    for s in SETS:
        if elo.get(s):
            parts = [f"{m} {signed(r['elo'])} [{_whole(r['lower'])}, {_whole(r['upper'])}]" for m, r in elo[s].items()]
            n = elo.get("prompts", {}).get(s)
            lines.append(f"Elo ({s}): " + ", ".join(parts) + (f" on {count(n, 'prompts')}" if n is not None else ""))
    for key, label, unit in (("pm", "PM", "pairs"), ("labeler", "labeler", "items")):
        m = h.get(key)
        if m:
            line = f"{label} accuracy {m['accuracy']:.3f} [{m['lower']:.2f}, {m['upper']:.2f}] on {count(m['n'], unit)}"
            if m.get("ece") is not None:
                line += f", ECE {m['ece']:.3f}"
            if m.get("position_bias") is not None:
                line += f", position bias {m['position_bias']:.2f}"
                if m.get("position_bias_n"):
                    line += f" on {count(m['position_bias_n'], 'comparisons')}"
            lines.append(line)
    rl = h.get("rl")
    if rl:
        parts = [f"{label} {plain(rl[f'{key}_start'], d)} -> {plain(rl[f'{key}_end'], d)}{suffix}"
                 for key, label, d, suffix in (("reward", "reward", 2, ""), ("kl", "KL", 2, ""),
                                               ("length", "length", 1, " tokens")) if f"{key}_start" in rl]
        lines.append("RL " + ", ".join(parts) + f" over {count(rl['steps'], 'steps')}")
    lines += [iteration_line(it) for it in h.get("iterations", [])]
    return lines


def iteration_line(it: dict[str, Any]) -> str:
    """``iteration 2: PM 0.81 held-out (40 pairs), 0.74 on the newest policy's pairs (previous PM
    0.62); reward 0.1 -> 0.4, KL 0.3 over 16 steps; Elo harmless +12``."""
    parts = []
    if it.get("pm_heldout"):
        m = it["pm_heldout"]
        parts.append(f"PM {m['accuracy']:.2f} [{m['lower']:.2f}, {m['upper']:.2f}] held-out ({count(m['n'], 'pairs')})")
    if it.get("pm_newest"):
        m = it["pm_newest"]
        text = f"{m['accuracy']:.2f} on the newest policy's pairs ({count(m['n'], 'pairs')})"
        if it.get("previous_pm_newest"):
            text += f", previous PM {it['previous_pm_newest']['accuracy']:.2f}"
        parts.append(text)
    rl = it.get("rl")
    if rl and "reward_start" in rl:
        kl = f", KL {plain(rl['kl_end'], 2)}" if "kl_end" in rl else ""
        parts.append(f"reward {plain(rl['reward_start'], 2)} -> {plain(rl['reward_end'], 2)}{kl} over "
                     f"{count(rl['steps'], 'steps')}")
    elo = it.get("elo") or {}
    if elo:
        parts.append("Elo " + ", ".join(f"{s} {signed(r['elo'])}" for s, r in elo.items()))
    return f"iteration {it['iteration']}: " + ("; ".join(parts) or "not measured yet")
