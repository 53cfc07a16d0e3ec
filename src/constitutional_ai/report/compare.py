"""``cai report A B``: one self-contained page saying what differs between two runs and what it did:
the constitution (principles added, removed and reworded), the config, the headline metrics with
the uncertainty of both, and both runs' answers to the same prompts side by side.

It reads only what each run recorded (``report.sources``, ``report.headline``), so it works on
runs made months apart, on another machine, or with a constitution file edited since.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from constitutional_ai.constitution import Constitution
from constitutional_ai.data.store import read_json, write_atomic
from constitutional_ai.layout import RunLayout
from constitutional_ai.report.diff import (
    PRINCIPLE_FIELDS,
    Delta,
    config_diff,
    metric_deltas,
    principle_diff,
    same_prompts,
)
from constitutional_ai.report.headline import headline
from constitutional_ai.report.render import esc, interval, page, plain, signed, table
from constitutional_ai.report.sources import (
    RecordedConstitution,
    check_run_dir,
    config_values,
    run_constitution,
)
from constitutional_ai.report.spec import ReportSpec


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _principle_text(constitution: Constitution, kind: str, pid: str) -> str:
    principle = next(p for p in getattr(constitution, kind) if p.id == pid)
    return "\n".join(f"{field}: {getattr(principle, field)}" for field in PRINCIPLE_FIELDS[kind])


def _constitution_html(ca: RecordedConstitution, cb: RecordedConstitution) -> list[str]:
    rows = [{"run": run, "hash": c.constitution.hash if c.constitution else "unknown", "read from": c.source}
            for run, c in (("A", ca), ("B", cb))]
    parts = ["<h2>Constitution</h2>", table(rows, ["run", "hash", "read from"])]
    parts += [f"<p class='note'>Run {run}'s constitution was not recorded by the run: {esc(c.source)}.</p>"
              for run, c in (("A", ca), ("B", cb)) if not c.snapshot]
    if ca.constitution is None or cb.constitution is None:
        return [*parts, "<p>No principle diff: one run's constitution cannot be read.</p>"]
    if ca.constitution.hash == cb.constitution.hash:
        return [*parts, "<p>Identical constitutions.</p>"]
    for kind, title in (("critique_revision", "Critique/revision principles"), ("comparison", "Comparison principles")):
        d = principle_diff(ca.constitution, cb.constitution, kind)
        if not (d.added or d.removed or d.changed):
            parts.append(f"<h3>{title}</h3><p>No change.</p>")
            continue
        rows = [{"principle": p, "change": "added in B", "B": _principle_text(cb.constitution, kind, p)}
                for p in d.added]
        rows += [{"principle": p, "change": "removed in B", "A": _principle_text(ca.constitution, kind, p)}
                 for p in d.removed]
        rows += [{"principle": p, "change": f"changed: {field}", "A": old, "B": new}
                 for p, fields in d.changed.items() for field, (old, new) in fields.items()]
        parts += [f"<h3>{title}</h3>", "<div class='sample'>" + table(rows, ["principle", "change", "A", "B"])
                  + "</div>"]
    return parts


def _config_html(a: Path, b: Path) -> list[str]:
    diffs = config_diff(config_values(a), config_values(b))
    if not diffs:
        return ["<h2>Config</h2><p>No difference.</p>"]
    rows = [{"key": k, "A": _value(va), "B": _value(vb)} for k, va, vb in diffs]
    return ["<h2>Config</h2><p>Only the keys whose values differ.</p>", table(rows, ["key", "A", "B"])]


def _figure(value: float, ci: tuple[float, float] | None, n: str, digits: int) -> str:
    text = plain(value, digits)
    if ci is not None:
        text += f" {interval(*ci, digits=digits if digits < 3 else 2)}"
    return text + (f" on {n}" if n else "")


def _metrics_html(deltas: list[Delta], judges: tuple[Any, Any]) -> list[str]:
    if not deltas:
        return ["<h2>Metrics</h2><p>No headline figure measured in both runs.</p>"]
    rows = []
    for d in deltas:
        digits = 1 if d.metric.startswith("Elo") else 3
        ci = d.delta_interval
        rows.append({"metric": d.metric, "A": _figure(d.a, d.a_interval, d.a_n, digits),
                     "B": _figure(d.b, d.b_interval, d.b_n, digits),
                     "B − A": signed(d.delta, digits) + (f" {interval(*ci, digits=digits if digits < 3 else 2)}"
                                                         if ci else "")})
    note = ("<p>95% intervals: Wilson for accuracies, bootstrap for Elo; the interval of B − A combines both "
            "runs' (MOVER). Each run's Elo is relative to its own first checkpoint and judged by its own judge "
            f"(A: {esc(judges[0] or 'unknown')}, B: {esc(judges[1] or 'unknown')}), so an Elo delta compares "
            "like with like only when both runs share the judge.</p>")
    return ["<h2>Metrics</h2>", note, table(rows, ["metric", "A", "B", "B − A"])]


def _answers_html(a: Path, b: Path) -> list[str]:
    prompts = same_prompts(a, b)
    if not prompts:
        return ["<h2>Answers to the same prompts</h2><p>No prompt answered by both runs.</p>"]
    parts = ["<h2>Answers to the same prompts</h2>"]
    for p in prompts:
        rows = [{"answer of": who, "A": ta, "B": tb} for who, ta, tb in p["rows"]]
        parts.append(f"<div class='sample'><p><b>{esc(p['set'])} prompt:</b> {esc(p['prompt'])}</p>"
                     + table(rows, ["answer of", "A", "B"]) + "</div>")
    return parts


def compare_runs(a: Path, b: Path, sections: list[tuple[str, ReportSpec]], output: Path | None = None) -> Path:
    """Write the comparison page (default ``A/compare.html``) and return its path; a path that is
    not a run directory is a one-line ``ConfigError`` naming it."""
    a, b = Path(a), Path(b)
    stores = [spec.store for _, spec in sections]
    for run in (a, b):
        check_run_dir(run, stores)
    output = Path(output) if output is not None else a / "compare.html"
    judges = tuple((read_json(RunLayout(run).elo) or {}).get("judge") for run in (a, b))
    body = [f"<p>A: <code>{esc(a)}</code><br>B: <code>{esc(b)}</code></p>",
            *_constitution_html(run_constitution(a), run_constitution(b)), *_config_html(a, b),
            *_metrics_html(metric_deltas(headline(a), headline(b)), (judges[0], judges[1])), *_answers_html(a, b)]
    write_atomic(output, page("Comparing two Constitutional AI runs", body))
    return output
