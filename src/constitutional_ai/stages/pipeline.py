"""``cai run``: the registry's pipeline stages end to end, each skipped when complete and unchanged.

The order follows from what each stage consumes and produces (``registry.run_order``: the RL loop
repeated ``rl.iterations`` times, its stages from iteration 2 named ``pairs@2``, ``pm@2``...). A
stage's identity is the hash of the config sections it declares and of the identities of the
stages whose outputs it consumes, kept in the layout's ``pipeline.json``: a rerun skips stages
whose identity is unchanged and complete, re-runs from scratch those whose inputs changed (and,
through the identities, everything after them), and resumes a stage that was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from constitutional_ai.config import EMBEDDED_MODEL, RunConfig
from constitutional_ai.data.store import write_atomic
from constitutional_ai.layout import RunLayout
from constitutional_ai.stages import registry


def check_models(config: RunConfig) -> None:
    """Every hub model the run will need, checked before the first stage: an id that is neither
    cached nor downloadable fails at once in one line, not half-way through the pipeline."""
    from constitutional_ai.models.loading import check_hub_model

    served = [m.model_name_or_path for m in (config.policy, config.feedback.model)
              if m is not None and m.backend == "openai"]  # a name the server knows, not a hub id
    names = [config.policy.model_name_or_path, config.pm.model_name_or_path, config.rl.policy,
             config.rl.reward_model, config.eval.judge, config.feedback.model.model_name_or_path
             if config.feedback.model else ""]
    names = [n for n in names if n not in served]
    for name in dict.fromkeys(n for n in names if n and n != EMBEDDED_MODEL and not n.startswith("run:")):
        if not Path(name).expanduser().exists():
            check_hub_model(name, None)


def stage_identities(config: RunConfig, layout: RunLayout, order: list[registry.Stage]) -> dict[str, str]:
    """Each stage's identity: the hash of its sections, read on the config it runs with (its
    ``wire``: SFT fine-tunes the policy model), and of the identities of the stages it reads from."""
    identities: dict[str, str] = {}
    for stage in order:
        wired = stage.wire(config, layout) if stage.wire is not None else config
        upstream = [identities[u] for u in registry.upstream(stage, order)]
        parts: list[Any] = [stage.name, wired.fingerprint(stage.sections), upstream]
        digests = registry.input_digests(stage.name, wired)
        if digests:  # the user's own files, by content: one edited in place re-runs the stage
            parts.append(digests)
        extra = stage.extra_identity(wired) if stage.extra_identity is not None else {}
        if extra:
            parts.append(extra)
        blob = json.dumps(parts)
        identities[stage.name] = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
    return identities


def run_pipeline(config: RunConfig) -> dict[str, Any]:
    """Run (or continue) every pipeline stage under one progress display; returns the run summary
    (also written to the layout's ``summary.json``): total seconds, each stage's identity, status,
    seconds and what it made, the headline figures, and the report's path."""
    from constitutional_ai.common.progress import RunDisplay, clock
    from constitutional_ai.report.build import build_report
    from constitutional_ai.report.headline import headline

    t0 = time.perf_counter()
    check_models(config)
    layout = RunLayout(config.output_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    config.to_yaml(layout.config)
    state: dict[str, Any] = json.loads(layout.pipeline.read_text()) if layout.pipeline.is_file() else {}
    order = registry.run_order(config)
    identities = stage_identities(config, layout, order)
    stages: dict[str, Any] = {}
    with RunDisplay(len(order), enabled=config.progress) as display:
        for k, stage in enumerate(order):
            display.stage(k, stage.name)
            previous = state.get(stage.name)
            if previous and previous["identity"] == identities[stage.name] and previous["status"] == "complete" \
                    and not config.overwrite:
                display.print(f"[dim]  {stage.name}: complete and unchanged, skipped[/]")
                stages[stage.name] = {**previous, "skipped": True}
                continue
            changed = bool(previous) and previous["identity"] != identities[stage.name]
            stage_cfg = config.model_copy(update={"overwrite": config.overwrite or changed, "resume": True})
            if stage.wire is not None:  # now, after the stages before it have written what it may point at
                stage_cfg = stage.wire(stage_cfg, layout)
            if changed:
                display.print(f"  {stage.name}: inputs changed, running again")
            state[stage.name] = {"identity": identities[stage.name], "status": "running"}
            write_atomic(layout.pipeline, json.dumps(state, indent=2))
            start = time.perf_counter()
            result = stage.run(stage_cfg)
            seconds = round(time.perf_counter() - start, 1)
            state[stage.name] = {"identity": identities[stage.name], "status": "complete", "seconds": seconds,
                                 "produced": stage.produced(result) if stage.produced and result is not None else ""}
            write_atomic(layout.pipeline, json.dumps(state, indent=2))
            stages[stage.name] = {**state[stage.name], "skipped": False}
            display.print(f"[green]✓[/] {stage.name}: {state[stage.name]['produced'] or 'done'} in {clock(seconds)}")
        display.phase("writing the report")
        report = build_report(layout.root, registry.report_sections())
        display.finish(len(order))
    summary = {"run": str(layout.root), "total_seconds": round(time.perf_counter() - t0, 1), "stages": stages,
               "headline": headline(layout.root), "report": str(report), "log": str(layout.log)}
    write_atomic(layout.summary, json.dumps(summary, indent=2))
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The end of `cai run` as plain lines for stdout: total time, each stage's time and what it
    made, the headline figures with their sample sizes and intervals, and where to look next."""
    from constitutional_ai.common.progress import clock
    from constitutional_ai.report.headline import format_headline

    width = max((len(name) for name in summary["stages"]), default=5)
    lines = [f"cai run finished in {clock(summary['total_seconds'])} ({summary['total_seconds']:.1f} s)", ""]
    for name, s in summary["stages"].items():
        when = "skipped (unchanged)" if s.get("skipped") else f"{s.get('seconds', 0):7.1f} s"
        lines.append(f"  {name:<{width}}  {when:>19}  {s.get('produced', '')}")
    figures = format_headline(summary["headline"])
    if figures:
        lines += ["", *figures]
    lines += ["", f"report:  {summary['report']}", f"summary: {RunLayout(summary['run']).summary}",
              f"log:     {summary['log']}"]
    return lines
