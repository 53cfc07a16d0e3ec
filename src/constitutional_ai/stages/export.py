"""``cai export`` and every stage command's ``--push-to-hub``: a run's datasets and models as
Hub-ready folders with their cards (``artifacts/``), optionally uploaded.

``cai export`` writes every artifact the run has made (or ``--export.artifacts``) to
``OUTPUT_DIR/export/<artifact>`` (or ``--export.output``); with ``--push-to-hub PREFIX`` each one
goes to ``PREFIX-<artifact>``. A stage command given ``--push-to-hub REPO`` exports what it has just
made and pushes it to ``REPO``: the CLI calls :func:`check_stage_push` before the stage runs (a bad
repository id or a missing token costs nothing) and :func:`push_produced` after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional_ai.artifacts.folders import Exported, default_output, export_artifacts, select
from constitutional_ai.artifacts.push import Pushed, check_push, push_folder
from constitutional_ai.artifacts.table import ARTIFACTS, EXPORT_ENTRY, exportable, made
from constitutional_ai.config import RunConfig
from constitutional_ai.stages.registry import Stage, register

EXPORT = "export"


@dataclass
class ExportResult:
    """What ``cai export`` wrote and pushed."""

    output: Path
    exported: list[Exported]
    pushed: list[Pushed] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output": str(self.output)}
        for e in self.exported:
            rows = f"{e.rows} rows, " if e.rows is not None else ""
            out[e.name] = f"{e.folder} ({rows}{e.bytes / 1e6:.1f} MB)"
        out["seconds"] = round(self.seconds, 2)
        if self.pushed:
            out["pushed"] = {p.name: p.url for p in self.pushed}
        return out


def _output(config: RunConfig) -> Path:
    return Path(config.export.output) if config.export.output else default_output(config.output_dir)


def run_export(config: RunConfig) -> ExportResult:
    """Write the run's artifacts as folders with cards; push each to ``PREFIX-<artifact>`` when
    ``hub.push_to_hub`` is set (checked before anything is written)."""
    start = time.perf_counter()
    run_dir = Path(config.output_dir)
    names = select(run_dir, list(config.export.artifacts) or None)
    ids = check_push(config.hub, names, prefix=True)
    exported = export_artifacts(run_dir, _output(config), names, repo_ids=ids)
    pushed = [push_folder(e.folder, e.name, ids[e.name], config.hub) for e in exported if e.name in ids]
    return ExportResult(_output(config), exported, pushed, time.perf_counter() - start)


def check_stage_push(stage: Stage, config: RunConfig) -> None:
    """Before a stage command runs: refuse a push that would fail after the work (bad repository id,
    no token), so a long training is never followed by an error that could have come first."""
    names = exportable(stage.produces)
    if config.hub.push_to_hub and names and stage.name != EXPORT:
        check_push(config.hub, names, prefix=len(names) > 1)


def push_produced(stage: Stage, config: RunConfig) -> list[str]:
    """After a stage command: export what it made (with a card from the config it ran with) and push
    it; one line per artifact saying where it went. Nothing to do without ``hub.push_to_hub``."""
    from constitutional_ai.training.common import is_main_process

    if not config.hub.push_to_hub or stage.name == EXPORT or not is_main_process():
        return []
    present = set(made(config.output_dir))
    names = [n for n in exportable(stage.produces) if n in present]
    if not names:
        return []
    ids = check_push(config.hub, names, prefix=len(names) > 1)
    lines = []
    for exported in export_artifacts(config.output_dir, _output(config), names, config=config, repo_ids=ids):
        pushed = push_folder(exported.folder, exported.name, ids[exported.name], config.hub)
        private = "private" if pushed.private else "public"
        lines.append(f"exported {exported.name} to {exported.folder} and pushed it to {pushed.url} ({private})")
    return lines


def push_run(config: RunConfig) -> list[str]:
    """After ``cai run`` with ``hub.push_to_hub``: what ``cai export --push-to-hub PREFIX`` does (every
    artifact the run made, each to ``PREFIX-<artifact>``); one line per push. For ``cli.run`` to call
    (and :func:`check_push` on every artifact before the pipeline starts)."""
    from constitutional_ai.training.common import is_main_process

    if not config.hub.push_to_hub or not is_main_process():
        return []
    result = run_export(config)
    return [f"pushed {p.name} to {p.url} ({'private' if p.private else 'public'})" for p in result.pushed]


register(Stage(
    name=EXPORT, command="export", run=run_export, sections=("export",), options=("hub",), pipeline=False,
    help="Write the run's datasets and models as Hub-ready folders with dataset/model cards; --push-to-hub "
         "PREFIX uploads each to PREFIX-<artifact>.",
    consumes=tuple(ARTIFACTS), produces=(EXPORT_ENTRY,),
    produced=lambda r: f"{len(r.exported)} artifacts",
))
