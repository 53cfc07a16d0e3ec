"""Dataset and model cards (``huggingface_hub.DatasetCard``/``ModelCard``) for exported artifacts.

The YAML header is what the Hub and ``card.data`` read: tags, the loader's ``configs`` for a
dataset, ``library_name``/``pipeline_tag``/``base_model`` for a model, and our own keys:
``cai_artifact``, ``constitution_name``/``constitution_hash`` and ``cai_metrics`` (each figure with
the sample it rests on). The body says the same for a reader: the constitution in full, how the
artifact was made (stage, config excerpt, sources and counts), the metrics, intended use and
limitations. Paths inside the run are written relative to it, so a card names no local directory.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from constitutional_ai.artifacts.facts import Facts, Metric, inside_run
from constitutional_ai.artifacts.push import is_hub_model
from constitutional_ai.artifacts.table import Artifact
from constitutional_ai.config import EMBEDDED_MODEL
from constitutional_ai.constitution import Constitution

TAGS = ("constitutional-ai", "rlaif")
DATA_FILE = "data/train.jsonl"
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))


@dataclass
class DatasetStats:
    """What copying a dataset's rows counted."""

    rows: int
    counts: dict[str, Counter] = field(default_factory=dict)  # field -> value -> rows
    constitution_hashes: Counter = field(default_factory=Counter)
    p_chosen: list[float] = field(default_factory=list)


@dataclass
class ModelStats:
    """What a model folder holds."""

    files: list[str]
    bytes: int
    parameters: int | None
    architecture: str | None
    base_model: str | None  # as the run named it (a hub id, a local folder, embedded:...)


def version() -> str:
    try:
        return metadata.version("constitutional-ai")
    except metadata.PackageNotFoundError:
        return "unknown"


def size_category(rows: int) -> str:
    return next((label for limit, label in _SIZES if rows < limit), "n>100M")


def dataset_card(artifact: Artifact, facts: Facts, stats: DatasetStats, run_dir: Path,
                 repo_id: str | None = None) -> Any:
    """The dataset's card; its ``configs`` make ``load_dataset(folder)`` read ``data/train.jsonl``."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        pretty_name=artifact.title, tags=[*TAGS, artifact.name.replace("_", "-")], task_categories=[artifact.task],
        size_categories=[size_category(stats.rows)],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}],
        **_own_keys(artifact, facts))
    body = [f"# {artifact.title}", "", _intro(artifact, run_dir), "",
            "```python", "from datasets import load_dataset", "",
            f"dataset = load_dataset({(repo_id or 'FOLDER_OR_REPO_ID')!r})", "```", "",
            "## Dataset structure", "", f"One split, `train`: {stats.rows} rows in `{DATA_FILE}` (JSON lines).", "",
            "| field | meaning |", "| --- | --- |", *(f"| `{k}` | {v} |" for k, v in artifact.fields), "",
            *_constitution(facts, stats.constitution_hashes),
            *_how_made(artifact, facts, run_dir, _dataset_counts(stats)),
            *_metrics(facts.metrics), *_use(artifact, facts)]
    return DatasetCard(_document(data.to_yaml(), body))


def model_card(artifact: Artifact, facts: Facts, stats: ModelStats, run_dir: Path, repo_id: str | None = None,
               related: dict[str, str] | None = None) -> Any:
    """The model's card; ``related`` names the Hub repositories of artifacts pushed with it (its
    training data, the SFT model an RL policy started from), which the card links."""
    from huggingface_hub import ModelCard, ModelCardData

    related = related or {}
    base = related.get("sft_model") if artifact.name == "rl_model" else None
    base = base or (stats.base_model if stats.base_model and is_hub_model(stats.base_model) else None)
    datasets = [related[n] for n in artifact.trained_on if n in related]
    data = ModelCardData(library_name="transformers", pipeline_tag=artifact.task, tags=[*TAGS, artifact.slug],
                         base_model=base, datasets=datasets or None, **_own_keys(artifact, facts))
    auto = "AutoModelForSequenceClassification" if artifact.task == "text-classification" else "AutoModelForCausalLM"
    where = repo_id or "FOLDER_OR_REPO_ID"
    size = f"{stats.parameters:,} parameters, " if stats.parameters else ""
    body = [f"# {artifact.title}", "", _intro(artifact, run_dir), "",
            "```python", f"from transformers import AutoTokenizer, {auto}", "",
            f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
            f"model = {auto}.from_pretrained({where!r})", "```", "",
            f"Architecture: {stats.architecture or 'see config.json'} ({size}{stats.bytes / 1e6:.1f} MB of "
            f"safetensors). Files: {', '.join(f'`{f}`' for f in stats.files)}.", "",
            *_constitution(facts, Counter({h: 1 for h in facts.info.get("constitution_hashes") or []})),
            *_how_made(artifact, facts, run_dir, _model_counts(artifact, facts, stats, related, run_dir)),
            *_metrics(facts.metrics), *_use(artifact, facts, stats.base_model)]
    return ModelCard(_document(data.to_yaml(), body))


def _document(header: str, body: list[str]) -> str:
    return f"---\n{header}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def _own_keys(artifact: Artifact, facts: Facts) -> dict[str, Any]:
    c = facts.constitution
    keys: dict[str, Any] = {
        "cai_artifact": artifact.name, "cai_version": version(), "constitution_name": c.name if c else None,
        "constitution_version": c.version if c else None, "constitution_hash": c.hash if c else None,
        "cai_metrics": {m.key: m.as_dict() for m in facts.metrics}}
    return {k: v for k, v in keys.items() if v is not None}


def _intro(artifact: Artifact, run_dir: Path) -> str:
    return (f"{artifact.description} Made by `cai {artifact.made_by}` (constitutional-ai {version()}) and "
            f"exported from the run `{run_dir.name}` by `cai export`.")


def _constitution(facts: Facts, seen: Counter) -> list[str]:
    lines = ["## Constitution", ""]
    c = facts.constitution
    if c is None:
        lines += [f"Not known: {facts.constitution_source}.", ""]
    else:
        lines += [f"**{c.name}** (version {c.version}), `{c.hash}`; read from {facts.constitution_source}.", ""]
        if c.description.strip():
            lines += [c.description.strip(), ""]
        lines += _principles(c)
    recorded = sorted(h for h in seen if h)
    if recorded:
        match = c is not None and recorded == [c.hash]
        lines += [("Every row records this hash." if match else
                   "Hashes recorded in the data: " + ", ".join(f"`{h}` ({seen[h]})" for h in recorded)
                   + ("" if c is None or c.hash in recorded else "; none is the constitution above: the data "
                      "was made under another version of it.")), ""]
    return lines


def _principles(c: Constitution) -> list[str]:
    lines = []
    if c.critique_revision:
        lines += [f"Critique and revision principles ({len(c.critique_revision)}):", ""]
        lines += [f"- **{p.id}**: {_one_line(p.critique_request)} *Revision:* {_one_line(p.revision_request)}"
                  for p in c.critique_revision]
        lines.append("")
    if c.comparison:
        lines += [f"Comparison principles ({len(c.comparison)}):", ""]
        lines += [f"- **{p.id}**: {_one_line(p.text)}" for p in c.comparison]
        lines.append("")
    examples = len(c.critique_examples) + len(c.feedback_examples)
    if examples:
        lines += [f"Plus {len(c.critique_examples)} worked critique examples and {len(c.feedback_examples)} "
                  "feedback examples (few-shot prompts).", ""]
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _how_made(artifact: Artifact, facts: Facts, run_dir: Path, counts: list[str]) -> list[str]:
    lines = ["## How it was made", "", f"- Stage: `cai {artifact.made_by}` (`cai run` runs it in the pipeline).",
             *([f"- Iteration {facts.iteration} of the RL loop (`rl.iterations`)."] if facts.iteration > 1 else []),
             *counts]
    if facts.training:
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in facts.training.items())
        lines.append(f"- Stage record: {figures}.")
    lines += ["", f"Config ({facts.config_source}):" if facts.config else f"Config: {facts.config_source}.", ""]
    if facts.config:
        text = yaml.safe_dump(_relative(facts.config, run_dir), sort_keys=False, allow_unicode=True, width=100)
        lines += ["```yaml", text.rstrip(), "```", ""]
    return lines


def _dataset_counts(stats: DatasetStats) -> list[str]:
    lines = [f"- Rows: {stats.rows}."]
    for name, counter in stats.counts.items():
        lines.append(f"- By `{name}`: " + ", ".join(f"{v} {n}" for v, n in counter.most_common()) + ".")
    if stats.p_chosen:
        p = stats.p_chosen
        confident = sum(1 for x in p if x >= 0.9 or x <= 0.1)
        lines.append(f"- `p_chosen`: mean {sum(p) / len(p):.3f}, min {min(p):.3f}, max {max(p):.3f}; "
                     f"{confident} of {len(p)} labels at or beyond 0.9/0.1.")
    return lines


def _model_counts(artifact: Artifact, facts: Facts, stats: ModelStats, related: dict[str, str],
                  run_dir: Path) -> list[str]:
    info = facts.info
    lines = []
    if stats.base_model:
        lines.append(f"- Started from: `{_relative(stats.base_model, run_dir)}`.")
    for n in artifact.trained_on:
        if n in related:
            lines.append(f"- Training data: [{related[n]}](https://huggingface.co/datasets/{related[n]}).")
    for key, label in (("examples", "training conversations"), ("train_pairs", "training pairs"),
                       ("eval_pairs", "held-out pairs"), ("truncated_pairs", "pairs truncated to max_length"),
                       ("global_step", "optimiser steps"), ("train_loss", "final training loss"),
                       ("train_seconds", "training seconds")):
        if key in info:
            lines.append(f"- {label}: {_figure(info[key])}.")
    for source in info.get("sources") or []:
        if isinstance(source, dict):
            lines.append(f"- Source `{_relative(source.get('source', '?'), run_dir)}` (weight "
                         f"{source.get('weight')}): read {source.get('read')}, kept {source.get('kept')}, in the mix "
                         f"{source.get('in_mix')}" + (f", dropped {source['dropped']}" if source.get("dropped") else "")
                         + ".")
    return lines


def _metrics(metrics: list[Metric]) -> list[str]:
    lines = ["## Metrics", ""]
    if not metrics:
        return [*lines, "Not measured in this run (`cai run` measures the labeler, the PM on held-out pairs and "
                        "the policies' Elo).", ""]
    lines += ["| metric | value | 95% interval | n | source |", "| --- | --- | --- | --- | --- |"]
    for m in metrics:
        interval = f"[{m.interval[0]:.3g}, {m.interval[1]:.3g}]" if m.interval else ""
        n = f"{m.n} {m.unit}" if m.n is not None else "not recorded"
        note = f" ({m.note})" if m.note else ""
        lines.append(f"| {m.label}{note} | {m.value:.4g} | {interval} | {n} | `{m.source}` |")
    lines += ["", "A figure on a few dozen items has a wide interval: read n before the value.", ""]
    return lines


def _use(artifact: Artifact, facts: Facts, base: str | None = None) -> list[str]:
    demo = EMBEDDED_MODEL in json.dumps([facts.config, facts.info, base], default=str)
    toy = (f" Made with the offline demo model (`{EMBEDDED_MODEL}`), whose text is word salad: it shows the "
           "pipeline works, not that anything is aligned.") if demo else ""
    return ["## Intended use", "", artifact.intended_use, "",
            "## Limitations", "", artifact.limitations + toy, "",
            "No license is set by `cai export`: add a `license:` to this card's header that the prompts, the "
            "base model and the feedback model it was made from allow.", ""]


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _relative(value: Any, run_dir: Path) -> Any:
    """``value`` with paths inside the run written relative to it (a card names no local folder)."""
    if isinstance(value, dict):
        return {k: _relative(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, run_dir) for v in value]
    return inside_run(value, run_dir) if isinstance(value, str) else value
