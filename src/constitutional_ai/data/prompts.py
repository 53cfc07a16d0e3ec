"""Prompt sources: files (JSONL, JSON, CSV, Parquet, text), embedded samples, Hugging Face datasets,
and hh-rlhf transcripts.

Bad rows (malformed, empty, duplicate) never stop a run: they are counted, a few are kept as
examples for the report, and the rest of the data goes through.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from constitutional_ai.common.chat_format import ASSISTANT, parse_raw
from constitutional_ai.common.errors import DataError, first_line
from constitutional_ai.common.hub import looks_like_path
from constitutional_ai.config import PromptSourceConfig

EMBEDDED = "embedded:"
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_FIELDS = ("prompt", "text", "question", "instruction", "input", "query", "content")
Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class PromptItem:
    """One prompt: a conversation ending with the user's turn, keyed by its content."""

    key: str
    messages: Conversation
    index: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class PromptReport:
    """What was read and what was skipped, with the reason and a few examples of each."""

    source: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < 3:
            bucket.append(where)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} prompts from {self.source}"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.kept} prompts from {self.source} (skipped {parts})"

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "read": self.read, "kept": self.kept,
                "skipped": dict(self.skipped), "examples": self.examples}


def conversation_key(messages: Conversation) -> str:
    """Content key: the same conversation gets the same key in every run and every source."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def up_to_last_user_turn(messages: Conversation) -> Conversation:
    """The prompt part of a conversation: everything before its trailing assistant turns."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def hh_prompt(transcript: str) -> Conversation:
    """An hh-rlhf transcript without its final assistant turn: the prompt that response answered."""
    return up_to_last_user_turn(parse_raw(transcript))


def hh_split(transcript: str) -> tuple[Conversation, str]:
    """``(prompt conversation, final assistant response)`` of an hh-rlhf transcript."""
    messages = parse_raw(transcript)
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, ""


def hh_pair(chosen: str, rejected: str) -> tuple[Conversation, str, str]:
    """``(shared prompt, chosen response, rejected response)`` of two hh-rlhf transcripts.

    The two split where they first differ, at the last ``Assistant:`` turn before that point, so
    transcripts that diverge before their final turn (or hold two assistant turns in a row, as some
    hh-rlhf rows do) still give the responses that were actually compared.
    """
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(ASSISTANT, 0, shared)
    if cut < 0:
        prompt, good = hh_split(chosen)
        return prompt, good, hh_split(rejected)[1]
    start = cut + len(ASSISTANT)
    return parse_raw(chosen[:cut]), chosen[start:].strip(), rejected[start:].strip()


# -- raw rows -----------------------------------------------------------------------------------------
def _embedded_path(name: str) -> Path:
    ref = resources.files("constitutional_ai") / "resources" / "prompts" / f"{name}.jsonl"
    if not ref.is_file():
        names = sorted(p.name.removesuffix(".jsonl") for p in
                       (resources.files("constitutional_ai") / "resources" / "prompts").iterdir())
        raise DataError(f"embedded:{name}: no such embedded prompt set; choose one of {', '.join(names)}")
    return Path(str(ref))


def _detect_format(path: Path, fmt: str) -> str:
    if fmt not in ("auto", "hh"):
        return fmt
    suffix = path.suffix.lower()
    if suffix in FILE_FORMATS:
        return FILE_FORMATS[suffix]
    raise DataError(f"{path}: unknown file type {suffix!r}; set prompts.format to jsonl, json, csv, parquet or text")


def iter_rows(config: PromptSourceConfig, report: PromptReport) -> Iterator[tuple[int, Any]]:
    """Yield ``(row number, row)``; rows that cannot be parsed are reported, not raised."""
    spec = config.path
    path = _embedded_path(spec[len(EMBEDDED):]) if spec.startswith(EMBEDDED) else Path(spec).expanduser()
    if not path.exists():
        if config.format in ("auto", "hub", "hh") and not looks_like_path(spec, FILE_FORMATS):
            yield from hub_rows(config)
            return
        raise DataError(f"{spec}: file not found; pass an existing file, embedded:red_team, or a hub dataset id")
    fmt = _detect_format(path, config.format)
    try:
        if fmt == "jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError:
                        report.skip("malformed", f"{path}:{n}")
        elif fmt == "json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), [data])
            yield from enumerate(data, 1)
        elif fmt == "csv":
            with path.open(encoding="utf-8", newline="") as f:
                yield from enumerate(csv.DictReader(f), 2)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            yield from enumerate(pq.read_table(path).to_pylist(), 1)
        elif fmt == "text":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    yield n, {"prompt": line.rstrip("\n")}
        else:
            raise DataError(f"{path}: format {fmt!r} needs a hub dataset id, not a file")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError) as exc:
        raise DataError(f"{path}: cannot be read as {fmt}: {first_line(exc)}") from None
    except Exception as exc:  # pyarrow raises its own types
        if type(exc).__module__.startswith("pyarrow"):
            raise DataError(f"{path}: cannot be read as parquet: {first_line(exc)}") from None
        raise


def hub_rows(config: PromptSourceConfig) -> Iterator[tuple[int, Any]]:
    from constitutional_ai.common.hub import hub_offline_reason, quiet_hub_logs

    reason = None if _hub_dataset_cached(config.path) else hub_offline_reason(
        offline_vars=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if reason:
        raise DataError(f"{config.path}: not a local file, and the Hugging Face dataset cannot be downloaded "
                        f"({reason}); download it where there is network access or pass a local file")
    try:
        import datasets
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        kwargs: dict[str, Any] = {"split": config.split}
        if config.subset:
            kwargs["name"] = config.subset
        if config.data_dir:
            kwargs["data_dir"] = config.data_dir
        with quiet_hub_logs():
            ds = datasets.load_dataset(config.path, **kwargs)
    except Exception as exc:
        raise DataError(f"{config.path}: not a local file and cannot be loaded as a Hugging Face dataset "
                        f"({first_line(exc)}); download it where there is network or pass a local file") from None
    yield from enumerate(ds, 1)


def _hub_dataset_cached(name: str) -> bool:
    """Whether ``datasets`` has this id in its local cache (so no network is needed)."""
    try:
        from datasets import config as ds_config

        cache = Path(ds_config.HF_DATASETS_CACHE)
    except Exception:
        return False
    return any(cache.glob(name.replace("/", "___") + "*"))


# -- rows to conversations ----------------------------------------------------------------------------
def row_conversation(row: Any, config: PromptSourceConfig) -> Conversation | None:
    """The conversation a row holds, whole (a trailing assistant turn included), or None.

    ``config.field`` names the column; unset, ``messages``, then hh-rlhf ``chosen``, then the
    usual text columns are tried. Strings holding ``Human:/Assistant:`` transcripts are parsed.
    """
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    if not isinstance(row, dict):
        return None
    name = config.field
    if name is None:
        if "messages" in row:
            name = "messages"
        elif config.format == "hh" or ("chosen" in row and "prompt" not in row):
            name = "chosen"
        else:
            name = next((f for f in TEXT_FIELDS if f in row), None)
    value = row.get(name) if name is not None else None
    if isinstance(value, list):
        if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                   and isinstance(m.get("content"), str) for m in value):
            return None
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if not isinstance(value, str):
        return None
    if config.format == "hh" or "\n\nHuman:" in value:
        return parse_raw(value)
    return [{"role": "user", "content": value}]


def _prompt_of(row: Any, config: PromptSourceConfig) -> Conversation | None:
    """A row's prompt: its conversation up to the last user turn."""
    messages = row_conversation(row, config)
    return None if messages is None else up_to_last_user_turn(messages)


def load_prompts(config: PromptSourceConfig) -> tuple[list[PromptItem], PromptReport]:
    """All usable prompts of a source, in order, deduplicated by content."""
    report = PromptReport(source=config.path)
    items: list[PromptItem] = []
    seen: set[str] = set()
    for n, row in iter_rows(config, report):
        report.read += 1
        where = f"{config.path}:{n}"
        messages = _prompt_of(row, config)
        if messages is None:
            report.skip("malformed", where)
            continue
        if not messages or not any(m["content"].strip() for m in messages if m["role"] == "user"):
            report.skip("empty", where)
            continue
        key = conversation_key(messages)
        if key in seen:
            report.skip("duplicate", where)
            continue
        seen.add(key)
        meta = {k: row[k] for k in ("category", "id") if isinstance(row, dict) and k in row}
        items.append(PromptItem(key=key, messages=messages, index=n, meta=meta))
        if config.limit and len(items) >= config.limit:
            break
    report.kept = len(items)
    return items, report
