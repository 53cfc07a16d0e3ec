"""``cai run``: the registry's pipeline stages end to end, each skipped when complete and unchanged.

The order follows from what each stage consumes and produces (``registry.pipeline_order``). A
stage's identity is the hash of the config sections it declares and of the identities of the
stages whose outputs it consumes, kept in the layout's ``pipeline.json``: a rerun skips stages
whose identity is unchanged and complete, re-runs from scratch those whose inputs changed (and,
through the identities, everything after them), and resumes a stage that was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
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
    for name in dict.fromkeys(n for n in names if n and n != EMBEDDED_MODEL):
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
        blob = json.dumps(parts)
        identities[stage.name] = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
    return identities


def run_pipeline(config: RunConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) every pipeline stage; returns ``{stage: {identity, status, seconds, skipped}}``."""
    from constitutional_ai.report.build import build_report

    check_models(config)
    layout = RunLayout(config.output_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    config.to_yaml(layout.config)
    state: dict[str, Any] = json.loads(layout.pipeline.read_text()) if layout.pipeline.is_file() else {}
    order = registry.pipeline_order()
    identities = stage_identities(config, layout, order)
    summary: dict[str, Any] = {}
    for stage in order:
        previous = state.get(stage.name)
        if previous and previous["identity"] == identities[stage.name] and previous["status"] == "complete" \
                and not config.overwrite:
            progress(f"{stage.name}: complete and unchanged, skipped")
            summary[stage.name] = {**previous, "skipped": True}
            continue
        changed = bool(previous) and previous["identity"] != identities[stage.name]
        stage_cfg = config.model_copy(update={"overwrite": config.overwrite or changed, "resume": True})
        if stage.wire is not None:  # now, after the stages before it have written what it may point at
            stage_cfg = stage.wire(stage_cfg, layout)
        progress(f"{stage.name}: {'inputs changed, running again' if changed else 'running'}")
        state[stage.name] = {"identity": identities[stage.name], "status": "running"}
        write_atomic(layout.pipeline, json.dumps(state, indent=2))
        start = time.perf_counter()
        stage.run(stage_cfg)
        state[stage.name] = {"identity": identities[stage.name], "status": "complete",
                             "seconds": round(time.perf_counter() - start, 1)}
        write_atomic(layout.pipeline, json.dumps(state, indent=2))
        summary[stage.name] = {**state[stage.name], "skipped": False}
    summary["report"] = str(build_report(layout.root, registry.report_sections()))
    return summary
