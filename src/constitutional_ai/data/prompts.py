"""Prompt sources: files (JSONL, JSON, CSV, Parquet, text), embedded samples, Hugging Face datasets,
and hh-rlhf transcripts. :mod:`constitutional_ai.data.readers` reads them; this module turns rows
into prompts.

Bad rows (malformed, empty, duplicate) never stop a run: they are counted, a few are kept as
examples for the report, and the rest of the data goes through.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from constitutional_ai.common.chat_format import ASSISTANT, parse_raw
from constitutional_ai.common.errors import DataError
from constitutional_ai.config import PromptSourceConfig
from constitutional_ai.data.readers import Row, read_rows

EMBEDDED = "embedded:"
TEXT_FIELDS = ("prompt", "text", "question", "instruction", "input", "query", "content")
#: Columns that hold ``Human:/Assistant:`` transcripts (hh-rlhf's), parsed into turns in ``auto`` format.
TRANSCRIPT_FIELDS = ("chosen", "rejected", "transcript")
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
    #: Rows whose text was parsed as a ``Human:/Assistant:`` transcript (``format: hh`` or a transcript
    #: column): the one case where a prompt is not used as written, so it is counted.
    parsed_transcripts: int = 0

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
        return {"source": self.source, "read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "examples": self.examples, "parsed_transcripts": self.parsed_transcripts}


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
def embedded_path(name: str, folder: str = "prompts") -> Path:
    """The file an ``embedded:NAME`` source means: data shipped in the package's ``resources/FOLDER``
    (prompts: red_team, helpful; eval: labeler)."""
    directory = resources.files("constitutional_ai") / "resources" / folder
    ref = directory / f"{name}.jsonl"
    if not ref.is_file():
        names = sorted(p.name.removesuffix(".jsonl") for p in directory.iterdir())
        kind = folder.removesuffix("s")
        raise DataError(f"embedded:{name}: no such embedded {kind} set; choose one of {', '.join(names)}")
    return Path(str(ref))


def iter_rows(config: PromptSourceConfig, report: PromptReport) -> Iterator[Row]:
    """A prompt source's rows; a JSONL line that is not JSON is reported as malformed, not raised."""
    spec = config.path
    source = embedded_path(spec[len(EMBEDDED):]) if spec.startswith(EMBEDDED) else spec
    return read_rows(source, "auto" if config.format == "hh" else config.format, name=spec, split=config.split,
                     subset=config.subset, data_dir=config.data_dir,
                     on_bad_line=lambda where: report.skip("malformed", where),
                     missing_hint="; pass an existing file, embedded:red_team, or a hub dataset id")


# -- rows to conversations ----------------------------------------------------------------------------
def field_of(row: dict[str, Any], config: PromptSourceConfig) -> str | None:
    """The column a row's prompt is read from: ``config.field``, else ``messages``, then hh-rlhf
    ``chosen``, then the usual text columns."""
    if config.field is not None:
        return config.field
    if "messages" in row:
        return "messages"
    if config.format == "hh" or ("chosen" in row and "prompt" not in row):
        return "chosen"
    return next((f for f in TEXT_FIELDS if f in row), None)


def parses_transcript(row: Any, config: PromptSourceConfig) -> bool:
    """Whether this row's text is read as a ``Human:/Assistant:`` transcript rather than as written."""
    if not isinstance(row, dict):
        return False
    name = field_of(row, config)
    return isinstance(row.get(name), str) and (config.format == "hh" or name in TRANSCRIPT_FIELDS)


def row_conversation(row: Any, config: PromptSourceConfig) -> Conversation | None:
    """The conversation a row holds, whole (a trailing assistant turn included), or None.

    ``config.field`` names the column; unset, ``messages``, then hh-rlhf ``chosen``, then the
    usual text columns are tried. Strings holding ``Human:/Assistant:`` transcripts are parsed.
    """
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    if not isinstance(row, dict):
        return None
    name = field_of(row, config)
    value = row.get(name) if name is not None else None
    if isinstance(value, list):
        if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                   and isinstance(m.get("content"), str) for m in value):
            return None
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if not isinstance(value, str):
        return None
    if config.format == "hh" or name in TRANSCRIPT_FIELDS:  # asked for, or hh-rlhf's own columns
        return parse_raw(value)
    return [{"role": "user", "content": value}]  # text is a prompt as written, whatever it contains


def _prompt_of(row: Any, config: PromptSourceConfig) -> Conversation | None:
    """A row's prompt: its conversation up to the last user turn."""
    messages = row_conversation(row, config)
    return None if messages is None else up_to_last_user_turn(messages)


def load_prompts(config: PromptSourceConfig) -> tuple[list[PromptItem], PromptReport]:
    """All usable prompts of a source, in order, deduplicated by content."""
    report = PromptReport(source=config.path)
    items: list[PromptItem] = []
    seen: set[str] = set()
    fields: set[str] = set()
    for n, where, row in iter_rows(config, report):
        report.read += 1
        if isinstance(row, dict) and len(fields) < 50:
            fields.update(str(k) for k in row)
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
        report.parsed_transcripts += parses_transcript(row, config)
        meta = {k: row[k] for k in ("category", "id") if isinstance(row, dict) and k in row}
        items.append(PromptItem(key=key, messages=messages, index=n, meta=meta))
        if config.limit and len(items) >= config.limit:
            break
    report.kept = len(items)
    if not items:
        raise DataError(_nothing_usable(config, report, fields))
    return items, report


def _nothing_usable(config: PromptSourceConfig, report: PromptReport, fields: set[str]) -> str:
    """The one-line error for a source that gave no prompt: what was looked for, what was there."""
    looked = config.field or ", ".join(("messages", *TRANSCRIPT_FIELDS[:1], *TEXT_FIELDS))
    found = f"the rows have fields {', '.join(sorted(fields))}" if fields else "no JSON object rows"
    return (f"{config.path}: no usable prompts ({report.summary()}); looked for {looked}; {found}; "
            "set prompts.field (--prompts-field) to the column holding the prompt")
