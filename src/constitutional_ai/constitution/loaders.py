"""Reading and writing constitutions: our YAML/JSON format and the paper's published files."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from constitutional_ai.common.chat_format import parse_raw, split_blocks
from constitutional_ai.common.errors import ConstitutionError, first_line
from constitutional_ai.common.yaml_safe import MAX_YAML_BYTES, load_yaml

PAPER_FILES = {
    "critique_revision": "CritiqueRevisionInstructions.json",
    "critique_examples": "CritiqueRevisionFewShotPrompts.json",
    "comparison": "RLMadisonInstructions.json",
    "feedback_examples": "RLMadisonFewShotPrompts.json",
    "chain_of_thought_examples": "RLMadisonPrecogFewShotPrompts.json",
}
PAPER_SCHEME = "anthropic-paper:"


def read_constitution_file(path: str | Path) -> tuple[Any, str]:
    """The raw data of a YAML/JSON constitution (or of the paper's directory) and its source name."""
    path = Path(path)
    if path.is_dir():
        return read_anthropic_paper(path)
    if not path.exists():
        raise ConstitutionError(f"{path}: no such constitution file; pass a YAML/JSON file or 'default'")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConstitutionError(f"{path}: {path.stat().st_size} bytes is over the {MAX_YAML_BYTES}-byte limit for a "
                                "constitution")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConstitutionError(f"{path}: not UTF-8 text; save the constitution as UTF-8") from None
    if path.suffix != ".json":
        return load_yaml(text, str(path), ConstitutionError), str(path)
    try:
        return json.loads(text), str(path)
    except json.JSONDecodeError as exc:
        raise ConstitutionError(f"{path} (line {exc.lineno}): not valid JSON: {first_line(exc)}") from None


def read_default() -> tuple[Any, str]:
    """The raw data of the bundled constitution."""
    ref = resources.files("constitutional_ai") / "resources" / "constitution.yaml"
    return yaml.safe_load(ref.read_text(encoding="utf-8")), "<default constitution>"


def write_constitution(data: dict[str, Any], path: str | Path) -> None:
    """Write a constitution's data as JSON (``.json``) or YAML (anything else)."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8")


def read_spec(spec: str | Path) -> tuple[Any, str]:
    """A config value (``anthropic-paper:DIR``, a directory or a file; not ``default``) read as raw data."""
    spec = str(spec)
    if spec.startswith(PAPER_SCHEME):
        return read_anthropic_paper(spec[len(PAPER_SCHEME):])
    return read_constitution_file(spec)


def _strip_label(text: str, label: str) -> str:
    """``\\n\\nCritiqueRequest: X\\n\\nCritique:`` -> ``X``."""
    blocks = split_blocks(text if text.startswith("\n\n") else "\n\n" + text)
    for name, content in blocks:
        if name == label:
            return content
    return text.strip()


def _parse_critique_example(text: str, source: str) -> dict[str, Any]:
    blocks = split_blocks(text)
    fields = {"CritiqueRequest": "critique_request", "Critique": "critique",
              "RevisionRequest": "revision_request", "Revision": "revision"}
    example: dict[str, Any] = {}
    dialogue_end = next((i for i, (label, _) in enumerate(blocks) if label == "CritiqueRequest"), None)
    if dialogue_end is None:
        raise ConstitutionError(f"{source}: few-shot example has no CritiqueRequest block")
    example["messages"] = [m for m in parse_raw("".join(f"\n\n{label}: {c}" for label, c in blocks[:dialogue_end]))]
    for label, content in blocks[dialogue_end:]:
        if label in fields and fields[label] not in example:
            example[fields[label]] = content
    return example


def _read_json(directory: Path, name: str) -> Any:
    path = directory / name
    if not path.exists():
        raise ConstitutionError(f"{path}: missing; the paper's directory must hold {', '.join(PAPER_FILES.values())}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConstitutionError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None


def read_anthropic_paper(directory: str | Path) -> tuple[Any, str]:
    """The paper's published principles and few-shot prompts as raw constitution data.

    Critique/revision and comparison strings keep the paper's wording; only the framing labels
    (``CritiqueRequest:``, ``Critique:``, trailing ``Options:``) are removed, because our prompt
    renderer adds them for either the raw or the chat format.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConstitutionError(f"{directory}: not a directory; point to the folder with the paper's JSON files")
    cr = _read_json(directory, PAPER_FILES["critique_revision"])
    principles = []
    for key, entry in cr.items():
        prompts = entry.get("prompt") or [""]
        principles.append({
            "id": key,
            "critique_request": _strip_label(prompts[0], "CritiqueRequest"),
            "revision_request": _strip_label(entry.get("edit_request", ""), "RevisionRequest"),
        })
    comparison = [
        {"id": f"rl{i}", "text": re.sub(r"\s*Options:\s*$", "", text.strip())}
        for i, text in enumerate(_read_json(directory, PAPER_FILES["comparison"]))
    ]
    src = str(directory / PAPER_FILES["critique_examples"])
    critique_examples = [_parse_critique_example(t, src)
                         for t in _read_json(directory, PAPER_FILES["critique_examples"])]
    feedback_examples = []
    for entry in _read_json(directory, PAPER_FILES["feedback_examples"]):
        feedback_examples.append({
            "messages": parse_raw(entry["prompt"]),
            "chosen": entry["corrects"][0].strip(),
            "rejected": entry["incorrects"][0].strip(),
        })
    cot = [e["prompt"] for e in _read_json(directory, PAPER_FILES["chain_of_thought_examples"])]
    raw = {
        "name": "anthropic-constitutional-harmlessness-paper",
        "version": "2022-12",
        "description": "Principles and few-shot prompts published with Bai et al. 2022, arXiv 2212.08073.",
        "critique_revision": principles,
        "comparison": comparison,
        "critique_examples": critique_examples,
        "feedback_examples": feedback_examples,
        "chain_of_thought_examples": cot,
        "metadata": {"source": "anthropics/ConstitutionalHarmlessnessPaper"},
    }
    return raw, str(directory)
