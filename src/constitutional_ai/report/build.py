"""``cai report DIR``: one static HTML page (and a Markdown summary) of what a run did, made to be
forwarded: plots inlined, every metric with the sample it rests on and its 95% interval, and what
to do next.

Everything comes from the run directory: the config and the constitution snapshot, each stage's
manifest (status, count, timing), the headline figures (``report.headline``, shared with ``cai
run``'s closing lines), the plots stages declare, and side-by-side samples (initial response, every
critique and revision, each checkpoint's answer to the same prompt). Missing stages are left out,
so the report works on a partial run too. No JavaScript, no network: the page opens anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from constitutional_ai.config import EMBEDDED_MODEL
from constitutional_ai.data.store import MANIFEST, read_json, write_atomic
from constitutional_ai.layout import RunLayout
from constitutional_ai.report.headline import format_headline, headline
from constitutional_ai.report.render import (
    count,
    duration,
    esc,
    figure,
    interval,
    next_steps_html,
    next_steps_markdown,
    page,
    signed,
    table,
)
from constitutional_ai.report.sources import records, run_config, run_constitution
from constitutional_ai.report.spec import ReportSpec

#: Plots shown inside the section about the figure they illustrate; any other declared plot
#: (a plug-in's too) goes under "Figures".
SECTION_PLOTS = {"elo_plot": "elo", "labeler_plot": "labeler", "pm_plot": "pm", "rl_reward_plot": "rl"}
TOY_TITLE = "These are toy models."
TOY_TEXT = ("The embedded default uses a 1.2M-parameter demo model trained for 120 steps on the package's own "
            "text, so that the whole pipeline runs offline in minutes; its text is word salad, its preference "
            "model learns from a few dozen pairs the same toy judged, and the numbers below show the machinery, "
            "not alignment.")


def _stage_row(name: str, spec: ReportSpec, manifest: dict[str, Any], seconds: Any) -> dict[str, Any]:
    """Counts carry their unit: "12" alone does not say whether a stage saw prompts or steps. A
    training store holds log entries, so its manifest's step count is shown beside them."""
    n = manifest.get("records")
    steps = manifest.get("global_step", manifest.get("steps"))
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
    text = count(n, spec.unit) if isinstance(n, int) else ""
    if steps is not None and (steps != n or spec.unit != "steps"):
        text += f" ({count(steps, 'training steps')})"
    seconds = float(seconds) if isinstance(seconds, (int, float)) and seconds > 0 else None
    rate, done, unit = None, steps or n, "steps" if steps else spec.unit
    if seconds and isinstance(done, int) and done > 0:  # slow stages read better as time per item
        per = done / seconds
        rate = f"{per:.3g} {unit}/s" if per >= 1 else f"{duration(seconds / done)} per {count(1, unit)[2:]}"
    return {"stage": name, "status": manifest.get("status"), "records": text, "time": duration(seconds),
            "rate": rate}


def collect(run: Path, sections: list[tuple[str, ReportSpec]]) -> dict[str, Any]:
    """Every figure the report shows, from the files a run left; ``sections`` says, stage by stage in
    order, which record store and plots to show."""
    layout = RunLayout(run)
    config = run_config(run)
    facts: dict[str, Any] = {"run": str(run), "headline": headline(run)}
    facts["config_yaml"] = layout.config.read_text(encoding="utf-8") if layout.config.is_file() else None
    facts["toy"] = config is None or config.policy.model_name_or_path == EMBEDDED_MODEL
    timings = {n: e.get("seconds") for n, e in (read_json(layout.pipeline) or {}).items() if isinstance(e, dict)}
    stages, plots = [], {}
    iterations = layout.iterations()
    for name, spec in sections:
        # a stage of the RL loop has a row per iteration (pm, pm@2...); its plots are the last iteration's
        looped = RunLayout.split_name(spec.store)[0] in RunLayout.PER_ITERATION
        for k in iterations if looped else [1]:
            label = name if k == 1 else f"{name}@{k}"
            manifest = read_json(layout.path(RunLayout.at_iteration(spec.store, k)) / MANIFEST)
            if manifest:
                seconds = timings.get(label) or manifest.get("seconds") or manifest.get("train_seconds")
                stages.append(_stage_row(label, spec, manifest, seconds))
            for plot in spec.plots:
                path = layout.path(RunLayout.at_iteration(plot.entry, k))
                if path.is_file():
                    caption = plot.caption + (f" (iteration {k})" if len(iterations) > 1 and looped else "")
                    plots[plot.entry] = (path, caption)
    facts["stages"], facts["plots"] = stages, plots
    recorded = run_constitution(run)
    critique = records(layout.critique_records)[:5]
    facts["constitution_source"] = recorded.source
    facts["constitution_hash"] = recorded.constitution.hash if recorded.constitution else (
        critique[0].get("constitution_hash") if critique else None)
    if recorded.constitution is not None:
        facts["principles"] = [p.id for p in recorded.constitution.critique_revision]
        facts["comparison_principles"] = len(recorded.constitution.comparison)
    facts["elo"] = read_json(layout.elo)
    facts["pm_eval"] = read_json(layout.pm_eval)
    answers: dict[str, dict[str, str]] = {}
    for r in records(layout.eval_records):
        if r.get("set") == "harmless" and "prompt_key" in r:
            answers.setdefault(r["prompt_key"], {})[str(r.get("model"))] = str(r.get("response", ""))
    facts["samples"] = [{"prompt": r["prompt"][-1]["content"], "initial": r["initial_response"],
                         "rounds": r.get("rounds", []), "answers": answers.get(r["key"], {})} for r in critique]
    return facts


def _elo_html(facts: dict[str, Any]) -> list[str]:
    elo = facts["headline"].get("elo")
    if not elo:
        return []
    raw = facts.get("elo") or {}
    evasive = raw.get("evasive_fraction", {}).get("harmless", {})
    sets = [s for s in ("harmless", "helpful") if s in elo]
    rows = [{"checkpoint": m, **{f"{s} Elo [95% CI]": f"{signed(elo[s][m]['elo'], 1)} "
                                 f"{interval(elo[s][m]['lower'], elo[s][m]['upper'], 1)}" for s in sets if m in elo[s]},
             "evasive answers (red-team)": f"{evasive[m]:.0%}" if m in evasive else None}
            for m in dict.fromkeys(m for s in sets for m in elo[s])]
    prompts = elo.get("prompts", {})
    rests = ", ".join(f"{count(prompts[s], 'prompts')} ({s})" for s in sets if s in prompts)
    judge = raw.get("judge")
    return ["<h2>Elo</h2>", f"<p>Anchored on <code>{esc(raw.get('anchor', ''))}</code>"
            + (f", judged by the {esc(judge)}" if judge else "") + (f", on {esc(rests)}" if rests else "")
            + "; 95% bootstrap intervals.</p>", table(rows, list(rows[0]))]


def _accuracy_row(m: dict[str, Any], unit: str) -> dict[str, Any]:
    return {"accuracy": f"{m['accuracy']:.3f}", "95% CI (Wilson)": interval(m["lower"], m["upper"]),
            "measured on": count(m["n"], unit), "ECE": f"{m['ece']:.3f}" if m.get("ece") is not None else None}


def _quality_html(facts: dict[str, Any]) -> dict[str, list[str]]:
    h, out = facts["headline"], {}
    if h.get("labeler"):
        m = h["labeler"]
        row = _accuracy_row(m, "items")
        if m.get("position_bias") is not None:
            row["position bias"] = f"{m['position_bias']:.2f}" + (
                f" on {count(m['position_bias_n'], 'comparisons')}" if m.get("position_bias_n") else "")
        out["labeler"] = ["<h2>Feedback labeler</h2><p>How often the AI labeler picks the better response on data "
                          "with known answers, how honest its probabilities are (ECE; the reliability diagram "
                          "below), and how often it picks the same slot whichever order the pair is shown in.</p>",
                          table([row], list(row))]
    if h.get("pm"):
        row = _accuracy_row(h["pm"], "held-out pairs")
        margin = (facts.get("pm_eval") or {}).get("mean_margin")
        row["mean margin"] = f"{margin:.3f}" if isinstance(margin, (int, float)) else None
        out["pm"] = ["<h2>Preference model</h2>", table([row], list(row))]
    if h.get("rl"):
        out["rl"] = ["<h2>RL training</h2>", *(f"<p>{esc(line)}</p>" for line in format_headline({"rl": h["rl"]}))]
    if h.get("iterations"):
        out["iterations"] = _iterations_html(h["iterations"])
    return out


def _iterations_html(iterations: list[dict[str, Any]]) -> list[str]:
    """Iterated RL-CAI, one row per iteration: is the PM keeping up with the policy it rewards?"""
    def acc(m: dict[str, Any] | None, unit: str) -> str | None:
        return f"{m['accuracy']:.3f} {interval(m['lower'], m['upper'])} on {count(m['n'], unit)}" if m else None

    rows = []
    for it in iterations:
        rl, elo = it.get("rl") or {}, it.get("elo") or {}
        rows.append({
            "iteration": it["iteration"],
            "PM, fixed held-out set": acc(it.get("pm_heldout"), "pairs"),
            "PM, newest policy's pairs": acc(it.get("pm_newest"), "pairs") if it["iteration"] > 1 else "(the same)",
            "previous PM, same pairs": acc(it.get("previous_pm_newest"), "pairs"),
            "RL reward (first -> last)": f"{rl['reward_start']:.3f} -> {rl['reward_end']:.3f}"
            if "reward_start" in rl else None,
            "KL (last)": f"{rl['kl_end']:.3f}" if "kl_end" in rl else None,
            **{f"{s} Elo": f"{signed(r['elo'], 1)} {interval(r['lower'], r['upper'], 1)}" for s, r in elo.items()},
        })
    columns = list(dict.fromkeys(c for row in rows for c in row))
    return ["<h2>Iterations</h2><p>Iterated online RL-CAI: each iteration samples pairs from the policy the last "
            "one left, labels them, continues the PM on the accumulated mix (the newest weighted up) and continues "
            "RL. The held-out set is fixed (iteration 1's prompts); the newest policy's pairs on those prompts show "
            "whether the PM keeps up with the policy, and the previous PM on the same pairs how stale it had "
            "grown. Each iteration's rewards come from its own PM, so compare rewards within a row, not "
            "across.</p>", table(rows, columns)]


def _samples_html(samples: list[dict[str, Any]]) -> list[str]:
    parts = ["<h2>Samples</h2>"] if samples else []
    for sample in samples:
        rows = [{"step": "prompt", "text": sample["prompt"]}, {"step": "initial response", "text": sample["initial"]}]
        for r in sample["rounds"]:
            rows += [{"step": f"critique {r.get('round')} ({r.get('principle_id')})", "text": r.get("critique")},
                     {"step": f"revision {r.get('round')}", "text": r.get("revision")}]
        rows += [{"step": f"answer of {m}", "text": a} for m, a in sample["answers"].items()]
        parts.append("<div class='sample'>" + table(rows, ["step", "text"]) + "</div>")
    return parts


def render_html(facts: dict[str, Any]) -> str:
    body = [f"<p>Run directory: <code>{esc(facts['run'])}</code>"]
    if facts.get("constitution_hash"):
        body.append(f"<br>Constitution: <code>{esc(facts['constitution_hash'])}</code> "
                    f"(from {esc(facts['constitution_source'])})")
    body.append("</p>")
    if facts["toy"]:
        body.append(f"<p class='note'><b>{esc(TOY_TITLE)}</b> {esc(TOY_TEXT)} "
                    "To run the same pipeline on a real model: <code>cai run --config configs/one-gpu-qwen.yaml"
                    "</code>.</p>")
    lines = format_headline(facts["headline"])
    if lines:
        body.append("<h2>Headline</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>")
    body.append(next_steps_html())
    if facts.get("principles"):
        body.append(f"<h2>Constitution</h2><p>{len(facts['principles'])} critique/revision principles, "
                    f"{facts.get('comparison_principles', 0)} comparison principles: "
                    + ", ".join(f"<code>{esc(p)}</code>" for p in facts["principles"]) + "</p>")
    if facts["stages"]:
        body += ["<h2>Stages</h2>", table(facts["stages"], ["stage", "status", "records", "time", "rate"])]
    plots = dict(facts["plots"])
    sections = {"elo": _elo_html(facts), **_quality_html(facts)}
    for key in ("elo", "labeler", "pm", "rl", "iterations"):
        if sections.get(key):
            body += sections[key]
            body += [figure(*plots.pop(entry)) for entry, home in SECTION_PLOTS.items()
                     if home == key and entry in plots]
    if plots:
        body += ["<h2>Figures</h2>", *(figure(path, caption) for path, caption in plots.values())]
    body += _samples_html(facts["samples"])
    if facts.get("config_yaml"):
        body.append(f"<h2>Config</h2><pre>{esc(facts['config_yaml'])}</pre>")
    return page("Constitutional AI run report", body)


def render_markdown(facts: dict[str, Any]) -> str:
    lines = ["# Constitutional AI run report", "", f"Run: `{facts['run']}`"]
    if facts.get("constitution_hash"):
        lines.append(f"Constitution: `{facts['constitution_hash']}` (from {facts['constitution_source']})")
    if facts["toy"]:
        lines += ["", f"**{TOY_TITLE.rstrip('.')}**: the numbers show the machinery, not alignment "
                      "(`cai run --config configs/one-gpu-qwen.yaml` runs a real one)."]
    headline_lines = format_headline(facts["headline"])
    if headline_lines:
        lines += ["", "## Headline", "", *(f"- {line}" for line in headline_lines)]
    if facts["stages"]:
        lines += ["", "| stage | status | records | time |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {s['stage']} | {s['status']} | {s['records']} | {s['time']} |" for s in facts["stages"]]
    lines += ["", *next_steps_markdown()]
    lines += ["", f"Plots and samples: `{RunLayout(facts['run']).report.name}` (self-contained: it can be mailed)."]
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
