"""What a run recorded about one artifact, read for its card: the constitution, the config, the
training facts and the measurements, each with where it was read from.

Everything is read from the run directory as it is (a missing or torn file leaves its fact out,
and the card says it was not recorded), never recomputed: a card describes the run that happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional_ai.artifacts.table import Artifact, artifact_layout, artifact_path
from constitutional_ai.common.errors import CAIError, ConfigError
from constitutional_ai.common.yaml_safe import load_yaml
from constitutional_ai.config import RunConfig
from constitutional_ai.constitution import Constitution
from constitutional_ai.data.store import MANIFEST, RECORDS, read_json, read_records
from constitutional_ai.layout import PM_EVAL_RESULTS, STAGE_CONFIG, STAGE_CONSTITUTION, RunLayout


@dataclass(frozen=True)
class Metric:
    """One measured figure, with the sample it rests on: 0.8 on 5 pairs is not 0.8 on 500."""

    key: str  # its name in the card's metadata (``pm_heldout_accuracy``)
    label: str
    value: float
    n: int | None
    unit: str  # what n counts
    source: str  # the file it was read from, relative to the run
    interval: tuple[float, float] | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "n": self.n, "unit": self.unit, "source": self.source}
        if self.interval is not None:
            out["interval_95"] = list(self.interval)
        return out


@dataclass
class Facts:
    """Everything a card says about one artifact beyond its own rows or weights."""

    constitution: Constitution | None
    constitution_source: str
    config: dict[str, Any]
    config_source: str
    iteration: int = 1  # of the RL loop the artifact comes from
    info: dict[str, Any] = field(default_factory=dict)  # the model folder's info file
    training: dict[str, Any] = field(default_factory=dict)  # the stage manifest's scalar figures
    metrics: list[Metric] = field(default_factory=list)


#: Manifest keys that are bookkeeping, not what the stage did.
_NOT_FIGURES = frozenset({"identity", "fields", "status", "created", "updated", "records", "resumed"})




def gather(run_dir: Path, artifact: Artifact, given: RunConfig | None = None) -> Facts:
    """The facts of ``artifact`` in ``run_dir``; ``given`` is the config of the command that just made it."""
    constitution, constitution_source = recorded_constitution(run_dir, artifact, given)
    config, config_source = config_excerpt(run_dir, artifact, given)
    layout = artifact_layout(run_dir, artifact.name)
    info = read_json(artifact_path(run_dir, artifact.name) / artifact.info) if artifact.info else None
    manifest = read_json(layout.path(artifact.store) / MANIFEST) if artifact.store else None
    training = {k: v for k, v in (manifest or {}).items()
                if k not in _NOT_FIGURES and isinstance(v, (int, float, str))}
    metrics = [m for name in artifact.metrics for m in METRICS[name](run_dir, artifact)]
    return Facts(constitution, constitution_source, config, config_source, layout.iteration, info or {}, training,
                 metrics)


def store_status(run_dir: Path, artifact: Artifact) -> str | None:
    """The producing stage's manifest status (``complete``/``incomplete``), None when it kept none."""
    if artifact.store is None:
        return None
    manifest = read_json(artifact_layout(run_dir, artifact.name).path(artifact.store) / MANIFEST)
    return None if manifest is None else str(manifest.get("status"))


def recorded_constitution(run_dir: Path, artifact: Artifact,
                          given: RunConfig | None = None) -> tuple[Constitution | None, str]:
    """The constitution the stage saved beside its records (what shaped the artifact), else the
    config's, loaded now and said to be so: that file may have changed since the run."""
    layout = artifact_layout(run_dir, artifact.name)
    for store in artifact.constitution_from:
        snapshot = layout.path(store) / STAGE_CONSTITUTION
        if snapshot.is_file():
            try:
                return Constitution.from_file(str(snapshot)), f"{snapshot.relative_to(run_dir)}, recorded by the run"
            except (OSError, CAIError):
                continue
    config = given or _root_config(run_dir)
    if config is None:
        return None, "not recorded (no constitution snapshot and no config.yaml in the run)"
    spec = config.constitution or "default"
    try:
        return Constitution.load(config.constitution), (f"config.constitution = {spec}, loaded at export: the run "
                                                        "recorded no snapshot")
    except (OSError, CAIError):
        return None, f"config.constitution = {spec} no longer loads"


def config_excerpt(run_dir: Path, artifact: Artifact, given: RunConfig | None = None) -> tuple[dict[str, Any], str]:
    """The sections of the config that made the artifact, and where they were read from: the
    command's own config, the snapshot beside the stage's records, the fields its manifest
    recorded, or the run's config.yaml; secrets are redacted by the config's own serialiser."""
    layout = artifact_layout(run_dir, artifact.name)
    if given is not None:
        return _sections(given.model_dump(mode="json"), artifact), "the command that made it"
    store = layout.path(artifact.store) if artifact.store else None
    if store is not None and (store / STAGE_CONFIG).is_file():
        data = _yaml(store / STAGE_CONFIG)
        if data:
            return _sections(data, artifact), str((store / STAGE_CONFIG).relative_to(run_dir))
    manifest = read_json(store / MANIFEST) if store is not None else None
    if manifest and isinstance(manifest.get("fields"), dict):
        return (_sections(_nest(manifest["fields"]), artifact),
                f"{(store / MANIFEST).relative_to(run_dir)} (the fields in the stage's identity)")  # type: ignore[operator]
    if layout.config.is_file():
        data = _yaml(layout.config)
        if data:
            return _sections(data, artifact), f"{layout.config.relative_to(run_dir)} (the run's config)"
    return {}, "not recorded"


def _root_config(run_dir: Path) -> RunConfig | None:
    path = RunLayout(run_dir).config
    try:
        return RunConfig.from_yaml(path) if path.is_file() else None
    except CAIError:
        return None


def _yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path), ConfigError)
    except (OSError, CAIError):
        return None
    return data if isinstance(data, dict) else None


def _sections(data: dict[str, Any], artifact: Artifact) -> dict[str, Any]:
    return {s: data[s] for s in artifact.sections if s in data}


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in dotted.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# -- measurements: each reader returns the figures one file holds ------------------------------------

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pm(run_dir: Path, artifact: Artifact) -> list[Metric]:
    path = artifact_path(run_dir, "pm_model") / PM_EVAL_RESULTS
    results = read_json(path)
    if not results or not _number(results.get("pairs")):
        return []
    where, n = _relative(path, run_dir), int(results["pairs"])
    out = []
    for key, label in (("accuracy", "PM accuracy on held-out pairs"), ("ece", "PM expected calibration error"),
                       ("mean_margin", "PM mean reward margin (chosen - rejected)"),
                       ("soft_label_mae", "PM mean absolute error against the soft labels")):
        if _number(results.get(key)):
            out.append(Metric(f"pm_heldout_{key}", label, float(results[key]), n, "pairs", where))
    return out


def _labeler(run_dir: Path, artifact: Artifact) -> list[Metric]:
    path = RunLayout(run_dir).labeler_results
    results = read_json(path)
    if not results or not _number(results.get("n")):
        return []
    where, n = _relative(path, run_dir), int(results["n"])
    note = f"labeler {inside_run(str(results['labeler_id']), run_dir)}" if results.get("labeler_id") else ""
    out = [Metric(f"labeler_{key}", label, float(results[key]), n, "items with known answers", where, note=note)
           for key, label in (("accuracy", "feedback labeler accuracy"), ("ece", "feedback labeler ECE"))
           if _number(results.get(key))]
    if _number(results.get("position_bias_rate")):
        bias_n = results.get("position_bias_n")
        if not _number(bias_n):  # older results files: count the comparisons the rate was taken over
            bias_n = _both_orders(RunLayout(run_dir).path("eval_labeler") / RECORDS) or None
        out.append(Metric("labeler_position_bias", "feedback labeler position bias",
                          float(results["position_bias_rate"]), int(bias_n) if _number(bias_n) else None,
                          "comparisons in both orders", where, note=note))
    return out


def _both_orders(records: Path) -> int:
    try:
        return sum(1 for r in read_records(records) if r.get("kind") == "pairwise"
                   for p in r.get("principles") or [] if isinstance(p, dict) and p.get("p_a_ba") is not None)
    except (OSError, CAIError):
        return 0


def _elo(run_dir: Path, artifact: Artifact) -> list[Metric]:
    path = RunLayout(run_dir).elo
    summary = read_json(path)
    if not summary or not artifact.elo_name:
        return []
    # a run that iterated RL-CAI names each iteration's policy ``rl@K``
    names = (f"{artifact.elo_name}@{artifact_layout(run_dir, artifact.name).iteration}", artifact.elo_name)
    out = []
    for prompt_set in ("harmless", "helpful"):
        ratings = summary.get(prompt_set)
        elo = ratings.get("elo") if isinstance(ratings, dict) else None
        name = next((n for n in names if isinstance(elo, dict) and _number(elo.get(n))), None)
        if name is None:
            continue
        lower, upper = (ratings.get(side) or {} for side in ("lower", "upper"))
        interval = (float(lower[name]), float(upper[name])) if _number(lower.get(name)) and _number(
            upper.get(name)) else None
        others = ", ".join(f"{m} {float(v):+.0f}" for m, v in elo.items() if m != name and _number(v))
        n = ratings.get("prompts")
        out.append(Metric(f"elo_{prompt_set}", f"{prompt_set} Elo (judge: {summary.get('judge', 'recorded judge')})",
                          float(elo[name]), int(n) if _number(n) else None, "prompts", _relative(path, run_dir),
                          interval, note=f"others: {others}" if others else ""))
    return out


def _rl(run_dir: Path, artifact: Artifact) -> list[Metric]:
    if artifact.store is None:
        return []
    path = artifact_layout(run_dir, artifact.name).path(artifact.store) / MANIFEST
    manifest = read_json(path)
    if not manifest or not _number(manifest.get("steps")):
        return []
    steps, where = int(manifest["steps"]), _relative(path, run_dir)
    return [Metric(f"rl_{key}", label, float(manifest[key]), steps, "updates", where)
            for key, label in (("first_reward", "mean PM reward at the first update"),
                               ("last_reward", "mean PM reward at the last update"),
                               ("last_kl", "KL to the reference policy at the last update"))
            if _number(manifest.get(key))]


def inside_run(text: str, run_dir: Path) -> str:
    """A path inside the run written relative to it (``sft/model``); any other text as it is."""
    for root in dict.fromkeys((str(run_dir.resolve()), str(run_dir))):
        if text.startswith(root + "/"):
            return text[len(root) + 1:]
    return text


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


#: The card's metric readers by name (an ``Artifact.metrics`` entry).
METRICS = {"pm": _pm, "labeler": _labeler, "elo": _elo, "rl": _rl}
