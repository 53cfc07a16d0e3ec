"""What differs between two runs, as data: the comparison page renders it, tests check it.

Two runs are compared to answer "what did my change do?", so each difference is named by what a
user changed (a principle id, a dotted config key) and each metric delta carries the uncertainty
of both runs, so a difference inside the noise reads as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional_ai.constitution import Constitution
from constitutional_ai.evaluation.calibration import difference_interval
from constitutional_ai.layout import RunLayout
from constitutional_ai.report.render import count
from constitutional_ai.report.sources import prompt_text, records

#: The fields that make a principle what it is, per kind of principle.
PRINCIPLE_FIELDS = {"critique_revision": ("critique_request", "revision_request"), "comparison": ("text",)}


@dataclass(frozen=True)
class PrincipleDiff:
    added: list[str]  # ids in B only
    removed: list[str]  # ids in A only
    changed: dict[str, dict[str, tuple[str, str]]]  # id -> field -> (A's text, B's text)


def principle_diff(a: Constitution, b: Constitution, kind: str) -> PrincipleDiff:
    """By principle id: a reworded request is "changed", a renamed id is one removed and one added."""
    fields = PRINCIPLE_FIELDS[kind]
    old = {p.id: p for p in getattr(a, kind)}
    new = {p.id: p for p in getattr(b, kind)}
    changed = {}
    for pid in (p for p in old if p in new):
        fields_changed = {f: (getattr(old[pid], f), getattr(new[pid], f)) for f in fields
                          if getattr(old[pid], f) != getattr(new[pid], f)}
        if fields_changed:
            changed[pid] = fields_changed
    return PrincipleDiff([p for p in new if p not in old], [p for p in old if p not in new], changed)


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, A's value, B's value)`` for each key whose values differ; a key one run lacks
    has ``None`` there."""
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class Delta:
    metric: str
    a: float
    b: float
    a_interval: tuple[float, float] | None = None
    b_interval: tuple[float, float] | None = None
    a_n: str = ""  # what A's figure rests on ("300 pairs")
    b_n: str = ""

    @property
    def delta(self) -> float:
        return self.b - self.a

    @property
    def delta_interval(self) -> tuple[float, float] | None:
        if self.a_interval is None or self.b_interval is None:
            return None
        return difference_interval(self.a, self.a_interval, self.b, self.b_interval)


def metric_deltas(ha: dict[str, Any], hb: dict[str, Any]) -> list[Delta]:
    """B − A for each headline figure both runs measured (``report.headline.headline`` of each)."""
    out = []
    elo_a, elo_b = ha.get("elo", {}), hb.get("elo", {})
    for s in ("harmless", "helpful"):
        for m, ra in elo_a.get(s, {}).items():
            rb = elo_b.get(s, {}).get(m)
            if rb is not None and not (ra == rb and ra["lower"] == ra["upper"]):  # both anchors: 0 by definition
                out.append(Delta(f"Elo ({s}) {m}", ra["elo"], rb["elo"], (ra["lower"], ra["upper"]),
                                 (rb["lower"], rb["upper"]), _prompts(elo_a, s), _prompts(elo_b, s)))
    for key, label, unit in (("pm", "PM accuracy", "pairs"), ("labeler", "labeler accuracy", "items")):
        a, b = ha.get(key), hb.get(key)
        if a and b:
            out.append(Delta(label, a["accuracy"], b["accuracy"], (a["lower"], a["upper"]), (b["lower"], b["upper"]),
                             count(a["n"], unit), count(b["n"], unit)))
    a, b = ha.get("rl"), hb.get("rl")
    if a and b:
        for key, label in (("reward_end", "RL reward at the end"), ("kl_end", "RL KL at the end")):
            if key in a and key in b:
                out.append(Delta(label, a[key], b[key], a_n=count(a["steps"], "steps"), b_n=count(b["steps"], "steps")))
    return out


def _prompts(elo: dict[str, Any], s: str) -> str:
    n = elo.get("prompts", {}).get(s)
    return count(n, "prompts") if n is not None else ""


def _final(record: dict[str, Any]) -> str:
    rounds = record.get("rounds") or []
    return rounds[-1].get("revision", "") if rounds else record.get("initial_response", "")


def _answers(run: Path) -> tuple[dict[tuple[str, str], dict[str, str]], dict[str, str]]:
    """``{(set, prompt text): {checkpoint: answer}}`` and ``{prompt text: final SL-CAI revision}``:
    keyed by the prompt's text, which is what makes "the same prompt" in two runs."""
    layout = RunLayout(run)
    evals: dict[tuple[str, str], dict[str, str]] = {}
    for r in records(layout.eval_records):
        evals.setdefault((str(r.get("set")), prompt_text(r.get("prompt"))), {})[str(r.get("model"))] = \
            str(r.get("response", ""))
    finals = {prompt_text(r.get("prompt")): _final(r) for r in records(layout.critique_records)}
    return evals, finals


def same_prompts(a: Path, b: Path, limit: int = 5) -> list[dict[str, Any]]:
    """Up to ``limit`` prompts both runs answered: the prompt, then ``(who, A's text, B's text)`` rows
    for every checkpoint and the final SL-CAI revision. Red-team prompts come first."""
    (eval_a, final_a), (eval_b, final_b) = _answers(a), _answers(b)
    common = sorted((k for k in eval_a if k in eval_b and k[1]), key=lambda k: k[0] != "harmless")
    keys = common or [("critique", t) for t in final_a if t in final_b and t]
    out = []
    for s, text in keys[:limit]:
        by_a, by_b = eval_a.get((s, text), {}), eval_b.get((s, text), {})
        rows = [(m, by_a.get(m, ""), by_b.get(m, "")) for m in dict.fromkeys([*by_a, *by_b])]
        if text in final_a or text in final_b:
            rows.append(("SL-CAI final revision", final_a.get(text, ""), final_b.get(text, "")))
        out.append({"set": s, "prompt": text, "rows": rows})
    return out
