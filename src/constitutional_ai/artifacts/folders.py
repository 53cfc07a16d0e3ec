"""Hub-ready folders: what ``load_dataset(folder)`` and ``from_pretrained(folder)`` load as they are.

A dataset becomes ``data/train.jsonl`` (every row checked on the way) and a ``README.md`` whose
header's ``configs`` point the loader at it; a model becomes a copy of its safetensors folder
(weights, config, tokenizer, the run's info files) and a ``README.md``. Each folder is built
beside its final place and renamed into it, so a crash never leaves half a folder behind, and a
folder ``cai export`` did not write is never replaced.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from constitutional_ai.artifacts.cards import DATA_FILE, DatasetStats, ModelStats, dataset_card, model_card
from constitutional_ai.artifacts.facts import Facts, gather, store_status
from constitutional_ai.artifacts.table import ARTIFACTS, EXPORT_ENTRY, Artifact, artifact_layout, artifact_path, made
from constitutional_ai.common.errors import ConfigError, DataError
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import read_json
from constitutional_ai.layout import RunLayout

CARD = "README.md"


@dataclass(frozen=True)
class Exported:
    """One folder written: what it is, where, and what it cost."""

    name: str
    kind: str
    folder: Path
    rows: int | None  # a dataset's rows
    bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"artifact": self.name, "kind": self.kind, "folder": str(self.folder), "rows": self.rows,
                "megabytes": round(self.bytes / 1e6, 3), "seconds": round(self.seconds, 3)}


def default_output(run_dir: str | Path) -> Path:
    """Where a run's artifacts go when ``export.output`` is empty."""
    return RunLayout(run_dir).path(EXPORT_ENTRY)


def select(run_dir: Path, names: list[str] | None = None) -> list[str]:
    """The artifacts to export: ``names`` (each checked to exist in the run), or every one it made."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory; pass the --output-dir of a run")
    for name in names or []:
        if name not in ARTIFACTS:
            raise ConfigError(f"export.artifacts: {name!r} is not exportable; choose from {', '.join(ARTIFACTS)}")
    found = made(run_dir)
    if not names:
        if not found:
            where = ", ".join(str(artifact_path(run_dir, n).relative_to(run_dir)) for n in ARTIFACTS)
            raise DataError(f"{run_dir}: nothing to export (none of {where} is there); run `cai run` (or the stage "
                            "commands) with this --output-dir first")
        return found
    for name in names:
        if name not in found:
            a = ARTIFACTS[name]
            raise DataError(f"{artifact_path(run_dir, name)}: this run has no {name} ({a.title}); run `cai "
                            f"{a.made_by} --output-dir {run_dir}` first, or leave {name} out of --export.artifacts")
    return list(dict.fromkeys(names))


def export_artifacts(run_dir: str | Path, output: str | Path | None = None, names: list[str] | None = None,
                     config: RunConfig | None = None, repo_ids: dict[str, str] | None = None) -> list[Exported]:
    """Write each artifact (``names``, or every one the run made) to ``output/<artifact>``.

    ``config`` is the config of the command that just made them (a stage's ``--push-to-hub``); left
    out, each card shows what the run recorded. ``repo_ids`` are the Hub repositories the folders
    are about to be pushed to: the cards name them in their loading snippets and link each other."""
    run_dir = Path(run_dir)
    chosen = select(run_dir, names)
    target = Path(output) if output else default_output(run_dir)
    return [export_artifact(run_dir, name, target / name, config, (repo_ids or {}).get(name), repo_ids)
            for name in chosen]


def export_artifact(run_dir: Path, name: str, folder: Path, config: RunConfig | None = None,
                    repo_id: str | None = None, related: dict[str, str] | None = None) -> Exported:
    """Write one artifact's folder (see the module docstring)."""
    start = time.perf_counter()
    artifact = ARTIFACTS[name]
    source = artifact_path(run_dir, name)
    _check_finished(run_dir, artifact, source)
    if artifact.kind == "model" and _inside(folder, source):
        raise ConfigError(f"export.output: {folder.parent} is inside the model folder {source}; choose a folder "
                          "outside it")
    _check_replaceable(folder, name)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        facts = gather(run_dir, artifact, config)
        if artifact.kind == "dataset":
            stats = copy_rows(source, partial / DATA_FILE, artifact)
            card = dataset_card(artifact, facts, stats, run_dir, repo_id)
            rows: int | None = stats.rows
        else:
            model = replace(copy_model(source, partial), base_model=base_model(run_dir, artifact, facts))
            card = model_card(artifact, facts, model, run_dir, repo_id, related)
            rows = None
        card.save(str(partial / CARD))
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return Exported(name, artifact.kind, folder, rows, size, time.perf_counter() - start)


def _check_finished(run_dir: Path, artifact: Artifact, source: Path) -> None:
    if store_status(run_dir, artifact) == "incomplete":
        store = artifact_layout(run_dir, artifact.name).path(artifact.store) if artifact.store else source
        raise DataError(f"{store}: the `cai {artifact.made_by}` run that makes {artifact.name} is not finished; run "
                        "the same command again to complete it, then export")


def _inside(path: Path, parent: Path) -> bool:
    return path.resolve().is_relative_to(parent.resolve())


def _check_replaceable(folder: Path, name: str) -> None:
    """Only a folder this exporter wrote (its card names the artifact) may be replaced."""
    if not folder.exists():
        return
    card = folder / CARD
    try:
        ours = folder.is_dir() and f"cai_artifact: {name}" in card.read_text(encoding="utf-8")
    except OSError:
        ours = False
    if not ours:
        raise ConfigError(f"{folder}: exists and was not written by cai export; move it away or choose another "
                          "--export.output")


# -- datasets --------------------------------------------------------------------------------------

def copy_rows(source: Path, target: Path, artifact: Artifact) -> DatasetStats:
    """Copy a JSONL dataset row by row, checking each has the fields its format needs, and count
    what the card reports. A bad row is a one-line error naming the file and line."""
    stats = DatasetStats(rows=0, counts={f: Counter() for f in artifact.count_by})
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open(encoding="utf-8") as src, target.open("w", encoding="utf-8") as out:
        for n, line in enumerate(src, 1):
            if not line.strip():
                continue
            row = _row(line, source, n)
            missing = [f for f in artifact.required if f not in row]
            if missing:
                raise DataError(f"{source}:{n}: no {', '.join(missing)} field; {artifact.name} rows need "
                                f"{', '.join(artifact.required)}: rewrite the file with `cai {artifact.made_by}`")
            if "p_chosen" in artifact.required:
                p = row["p_chosen"]
                if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                    raise DataError(f"{source}:{n}: p_chosen {p!r} is not a probability in [0, 1]; rewrite the file "
                                    f"with `cai {artifact.made_by}`")
                stats.p_chosen.append(float(p))
            for f in artifact.count_by:
                stats.counts[f][str(row.get(f))] += 1
            stats.constitution_hashes[row.get("constitution_hash")] += 1
            stats.rows += 1
            out.write(line if line.endswith("\n") else line + "\n")
    if not stats.rows:
        raise DataError(f"{source}: no rows; rerun `cai {artifact.made_by}` before exporting {artifact.name}")
    return stats


def _row(line: str, source: Path, n: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError:
        raise DataError(f"{source}:{n}: not valid JSON; fix or delete that line, or rerun the stage that wrote "
                        "it") from None
    if not isinstance(row, dict):
        raise DataError(f"{source}:{n}: not a JSON object; fix or delete that line")
    return row


# -- models ----------------------------------------------------------------------------------------

def copy_model(source: Path, target: Path) -> ModelStats:
    """Copy a saved model's files (weights, config, tokenizer, info files, plots) into ``target``."""
    config = read_json(source / "config.json")
    weights = sorted(source.glob("*.safetensors"))
    if config is None:
        raise DataError(f"{source}: not a saved model (no readable config.json); rerun the stage that trains it")
    if not weights:
        raise DataError(f"{source}: no *.safetensors weights; rerun the stage that trains it (it saves safetensors)")
    if not any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(f"{source}: no tokenizer (tokenizer.json or tokenizer_config.json); rerun the stage that "
                        "trains it")
    files = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != CARD and not path.name.startswith("."):
            shutil.copy2(path, target / path.name)
            files.append(path.name)
    architectures = config.get("architectures") or [None]
    return ModelStats(files=files, bytes=sum(w.stat().st_size for w in weights),
                      parameters=_parameters(weights), architecture=architectures[0], base_model=None)


def base_model(run_dir: Path, artifact: Artifact, facts: Facts) -> str | None:
    """The model this one was trained from, as the run named it: its info file's ``base_model``, else
    (an RL policy) ``rl.policy`` or this run's SFT model."""
    named = facts.info.get("base_model") or (facts.config.get("rl") or {}).get("policy")
    if named:
        return str(named)
    if artifact.name == "rl_model" and artifact_path(run_dir, "sft_model").is_dir():
        return str(artifact_path(run_dir, "sft_model"))
    return None


def _parameters(weights: list[Path]) -> int | None:
    """Parameters counted from the safetensors headers (no tensor is read)."""
    total = 0
    try:
        for path in weights:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return total
