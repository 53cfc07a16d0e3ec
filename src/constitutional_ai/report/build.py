"""``cai report DIR``: one static HTML page (and a Markdown summary) of what a run did.

Everything comes from the run directory: the config and constitution, each stage's manifest and
info files (timings, throughput), the evaluation JSONs (labeler and PM accuracy and calibration,
Elo), their PNG plots, and side-by-side samples (initial response, every critique and revision,
the RL policy's answer to the same prompt). Missing stages are simply left out, so the report
works on a partial run too. No JavaScript, no network: the page opens from disk.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from constitutional_ai.config import EMBEDDED_MODEL, RunConfig
from constitutional_ai.data.store import MANIFEST, read_records, write_atomic
from constitutional_ai.layout import PM_INFO, RunLayout
from constitutional_ai.report.spec import ReportSpec


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def collect(run: Path, sections: list[tuple[str, ReportSpec]]) -> dict[str, Any]:
    """Every figure the report shows, from the files a run left; ``sections`` says, stage by stage in
    order, which record store and plots to show."""
    facts: dict[str, Any] = {"run": str(run)}
    layout = RunLayout(run)
    config_file = layout.config
    config = RunConfig.from_yaml(config_file) if config_file.is_file() else None
    facts["config_yaml"] = config_file.read_text(encoding="utf-8") if config else None
    facts["toy"] = config is None or config.policy.model_name_or_path == EMBEDDED_MODEL
    pipeline = _json(layout.pipeline) or {}
    timings = {name: entry.get("seconds") for name, entry in pipeline.items() if isinstance(entry, dict)}
    stages, plots = [], []
    for name, spec in sections:
        manifest = _json(layout.path(spec.store) / MANIFEST)
        if manifest:
            seconds = timings.get(name) or manifest.get("seconds") or manifest.get("train_seconds")
            records = manifest.get("records")
            stages.append({"stage": name, "status": manifest.get("status"), "records": records,
                           "unit": spec.unit, "seconds": seconds,
                           "records/s": round(records / seconds, 2) if records and seconds else None})
        for plot in spec.plots:
            path = layout.path(plot.entry)
            if path.is_file():
                plots.append((str(path.relative_to(run)), plot.caption))
    facts["stages"] = stages
    facts["pm_info"] = _json(layout.pm_model / PM_INFO)
    facts["pm_eval"] = _json(layout.pm_eval)
    facts["labeler_eval"] = _json(layout.labeler_results)
    facts["elo"] = _json(layout.elo)
    facts["plots"] = plots
    records = list(read_records(layout.critique_records))[:5] if layout.critique_records.is_file() else []
    facts["constitution_hash"] = records[0]["constitution_hash"] if records else None
    if config is not None:
        try:
            from constitutional_ai.constitution import Constitution

            constitution = Constitution.load(config.constitution)
            facts["constitution_hash"] = constitution.hash
            facts["principles"] = [p.id for p in constitution.critique_revision]
            facts["comparison_principles"] = len(constitution.comparison)
        except Exception:  # the report must not fail on a moved constitution file
            facts["principles"] = None
    answers: dict[str, dict[str, str]] = {}
    if layout.eval_records.is_file():
        for r in read_records(layout.eval_records):
            if r.get("set") == "harmless":
                answers.setdefault(r["prompt_key"], {})[r["model"]] = r["response"]
    facts["samples"] = [{"prompt": r["prompt"][-1]["content"], "initial": r["initial_response"],
                         "rounds": r.get("rounds", []), "answers": answers.get(r["key"], {})} for r in records]
    return facts


def render_html(facts: dict[str, Any]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Constitutional AI run report</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;"
             "line-height:1.45}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:left;vertical-align:top}img{max-width:100%;border:1px solid #ddd}"
             ".note{background:#fff6d6;border:1px solid #e8c95a;padding:.6em 1em}pre{background:#f5f5f5;"
             "padding:1em;overflow:auto;font-size:12px}.sample td{max-width:420px;white-space:pre-wrap}</style>",
             "</head><body><h1>Constitutional AI run report</h1>",
             f"<p>Run directory: <code>{_esc(facts['run'])}</code>"]
    if facts.get("constitution_hash"):
        parts.append(f"<br>Constitution: <code>{_esc(facts['constitution_hash'])}</code>")
    parts.append("</p>")
    if facts["toy"]:
        parts.append("<p class='note'><b>These are toy models.</b> The embedded default trains tiny models for a "
                     "few hundred steps on the package's own text so that the whole pipeline runs offline in "
                     "minutes; their text is word salad and the numbers below show the machinery, not alignment. "
                     "To run the same pipeline on a real model: <code>cai run --config "
                     "configs/one-gpu-qwen.yaml</code>.</p>")
    if facts.get("principles"):
        parts.append(f"<h2>Constitution</h2><p>{len(facts['principles'])} critique/revision principles, "
                     f"{facts.get('comparison_principles', 0)} comparison principles: "
                     + ", ".join(f"<code>{_esc(p)}</code>" for p in facts["principles"]) + "</p>")
    if facts["stages"]:
        parts.append("<h2>Stages</h2>" + _table(facts["stages"], ["stage", "status", "records", "seconds",
                                                                  "records/s"]))
    elo = facts.get("elo")
    if elo:
        rows = [{"checkpoint": m, **{f"{s} Elo": elo[s]["elo"][m] for s in ("harmless", "helpful") if s in elo},
                 **{f"{s} 95% CI": f"{elo[s]['lower'][m]} .. {elo[s]['upper'][m]}" for s in ("harmless", "helpful")
                    if s in elo},
                 "evasive (red-team)": elo.get("evasive_fraction", {}).get("harmless", {}).get(m, "")}
                for m in elo["checkpoints"]]
        parts.append("<h2>Elo</h2>" + _table(rows, list(rows[0])))
    quality = []
    if facts.get("labeler_eval"):
        e = facts["labeler_eval"]
        quality.append({"model": "feedback labeler", "accuracy": e.get("accuracy"), "ECE": e.get("ece"),
                        "pairs": e.get("n"), "position bias": e.get("position_bias_rate")})
    if facts.get("pm_eval"):
        e = facts["pm_eval"]
        quality.append({"model": "preference model", "accuracy": e.get("accuracy"), "ECE": e.get("ece"),
                        "pairs": e.get("pairs"), "mean margin": e.get("mean_margin")})
    if quality:
        parts.append("<h2>Labeler and preference model</h2>"
                     + _table(quality, ["model", "accuracy", "ECE", "pairs", "position bias", "mean margin"]))
    for path, caption in facts["plots"]:
        parts.append(f"<figure><img src='{_esc(path)}' alt='{_esc(caption)}'><figcaption>{_esc(caption)}"
                     "</figcaption></figure>")
    if facts["samples"]:
        parts.append("<h2>Samples</h2>")
        for sample in facts["samples"]:
            rows = [{"step": "prompt", "text": sample["prompt"]},
                    {"step": "initial response", "text": sample["initial"]}]
            for r in sample["rounds"]:
                rows += [{"step": f"critique {r.get('round')} ({r.get('principle_id')})", "text": r.get("critique")},
                         {"step": f"revision {r.get('round')}", "text": r.get("revision")}]
            rows += [{"step": f"answer of {m}", "text": a} for m, a in sample["answers"].items()]
            parts.append("<div class='sample'>" + _table(rows, ["step", "text"]) + "</div>")
    if facts.get("config_yaml"):
        parts.append(f"<h2>Config</h2><pre>{_esc(facts['config_yaml'])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(facts: dict[str, Any]) -> str:
    lines = ["# Constitutional AI run report", "", f"Run: `{facts['run']}`"]
    if facts.get("constitution_hash"):
        lines.append(f"Constitution: `{facts['constitution_hash']}`")
    if facts["toy"]:
        lines += ["", "**These are toy models**: the numbers show the machinery, not alignment "
                      "(`cai run --config configs/one-gpu-qwen.yaml` runs a real one)."]
    if facts["stages"]:
        lines += ["", "| stage | status | records | seconds |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {s['stage']} | {s['status']} | {s['records']} | {_fmt(s['seconds'])} |" for s in facts["stages"]]
    elo = facts.get("elo")
    if elo:
        lines += ["", "| checkpoint | harmless Elo | helpful Elo |", "| --- | ---: | ---: |"]
        lines += [f"| {m} | {elo.get('harmless', {}).get('elo', {}).get(m, '')} | "
                  f"{elo.get('helpful', {}).get('elo', {}).get(m, '')} |" for m in elo["checkpoints"]]
    for key, label in (("labeler_eval", "Feedback labeler"), ("pm_eval", "Preference model")):
        if facts.get(key):
            lines.append(f"\n{label}: accuracy {_fmt(facts[key].get('accuracy'))}, ECE {_fmt(facts[key].get('ece'))}")
    lines += ["", f"Plots and samples: `{RunLayout(facts['run']).report.name}`."]
    return "\n".join(lines) + "\n"


def build_report(run: str | Path, sections: list[tuple[str, ReportSpec]]) -> Path:
    """Write ``report.html`` and ``report.md`` into the run directory; returns the HTML path.
    ``sections`` is ``stages.registry.report_sections()`` (what each stage asks to show)."""
    run = Path(run)
    if not run.is_dir():
        from constitutional_ai.common.errors import ConfigError

        raise ConfigError(f"{run}: no such run directory; pass the --output-dir of a run")
    facts = collect(run, sections)
    layout = RunLayout(run)
    write_atomic(layout.report_md, render_markdown(facts))
    write_atomic(layout.report, render_html(facts))
    return layout.report
