"""What a run directory recorded, read the same way by the report and the comparison.

The constitution comes from the snapshot a generation stage saved beside its records, not from the
path in the config: that file may have been edited since, and a report must describe the run that
happened. Only when no snapshot exists is the config's path loaded, and the page says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional_ai.common.errors import CAIError, ConfigError
from constitutional_ai.common.yaml_safe import load_yaml
from constitutional_ai.config import RunConfig
from constitutional_ai.constitution import Constitution
from constitutional_ai.data.store import MANIFEST, read_records
from constitutional_ai.layout import STAGE_CONSTITUTION, RunLayout


def records(path: Path) -> list[dict[str, Any]]:
    try:
        return list(read_records(path)) if path.is_file() else []
    except CAIError:  # a corrupt line: the stage that wrote it reports it, the report shows the rest
        return []


def run_config(run: Path) -> RunConfig | None:
    path = RunLayout(run).config
    try:
        return RunConfig.from_yaml(path) if path.is_file() else None
    except CAIError:  # written by another version of the package: the raw YAML is still shown
        return None


def config_values(run: Path) -> dict[str, Any]:
    """The run's config as dotted keys; validated (so defaults are filled in and two versions
    compare field by field) when it still loads, the raw YAML otherwise."""
    config = run_config(run)
    if config is not None:
        return flatten(config.model_dump(mode="json"))
    path = RunLayout(run).config
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), str(path), ConfigError) if path.is_file() else None
    except (OSError, CAIError):
        raw = None
    return flatten(raw) if isinstance(raw, dict) else {}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class RecordedConstitution:
    constitution: Constitution | None
    source: str  # where it was read from, in words
    snapshot: bool  # True when it is what the run recorded


def run_constitution(run: Path) -> RecordedConstitution:
    layout = RunLayout(run)
    for store in (layout.critique, layout.labels):
        snapshot = store / STAGE_CONSTITUTION
        if snapshot.is_file():
            try:
                return RecordedConstitution(Constitution.from_file(str(snapshot)),
                                            f"{snapshot.relative_to(run)}, recorded by the run", True)
            except (OSError, CAIError):
                continue
    config = run_config(run)
    if config is not None:
        spec = config.constitution or "default"
        try:
            return RecordedConstitution(Constitution.load(config.constitution),
                                        f"config.constitution = {spec}, loaded now: the run recorded no snapshot, "
                                        "so this is that file as it is today", False)
        except (OSError, CAIError):
            return RecordedConstitution(None, f"config.constitution = {spec} no longer loads", False)
    return RecordedConstitution(None, "not recorded (no snapshot, no config.yaml)", False)


def is_run_dir(run: Path, stores: list[str]) -> bool:
    """Something a run writes is there: its config, the pipeline state or a stage's manifest."""
    layout = RunLayout(run)
    return layout.config.is_file() or layout.pipeline.is_file() or any(
        (layout.path(store) / MANIFEST).is_file() for store in stores if store in RunLayout.ENTRIES)


def check_run_dir(run: Path, stores: list[str]) -> None:
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run directory; pass the --output-dir of a run")
    if not is_run_dir(run, stores):
        raise ConfigError(f"{run}: not a run directory (no config.yaml, pipeline.json or stage manifest); "
                          "pass the --output-dir of a run")


def prompt_text(messages: Any) -> str:
    """The last user turn: what a reader recognises as "the same prompt" across two runs."""
    if isinstance(messages, str):
        return messages
    users = [m.get("content", "") for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""
