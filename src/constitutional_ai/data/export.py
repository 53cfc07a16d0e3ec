"""Exports of stage records to the formats trainers read.

SL-CAI records become conversational SFT examples (TRL's ``messages`` format): each prompt with
its final revision, or with every revision step as the paper did, optionally mixed with
helpfulness conversations so the fine-tuned model stays helpful.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional_ai.config import PromptSourceConfig, SFTExportConfig
from constitutional_ai.data.prompts import PromptReport, _rows, conversation_key
from constitutional_ai.data.store import read_records
from constitutional_ai.errors import DataError


@dataclass
class ExportResult:
    output: Path
    critique_examples: int
    helpful_examples: int
    skipped_empty: int

    def as_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "critique_examples": self.critique_examples,
                "helpful_examples": self.helpful_examples, "skipped_empty_revisions": self.skipped_empty}


def load_conversations(config: PromptSourceConfig) -> tuple[list[list[dict[str, str]]], PromptReport]:
    """Whole conversations ending with an assistant turn (for example helpfulness demonstrations).

    Rows may hold ``messages`` or hh-rlhf ``chosen`` transcripts; others are reported and skipped.
    """
    from constitutional_ai.chat_format import parse_raw

    report = PromptReport(source=config.path)
    out = []
    for n, row in _rows(config, report):
        report.read += 1
        messages: Any = None
        if isinstance(row, dict):
            field = config.field or ("messages" if "messages" in row else "chosen" if "chosen" in row else None)
            value = row.get(field) if field else None
            messages = parse_raw(value) if isinstance(value, str) else value
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
                and messages[-1].get("role") == "assistant" and str(messages[-1].get("content", "")).strip()):
            report.skip("malformed", f"{config.path}:{n}")
            continue
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
        if config.limit and len(out) >= config.limit:
            break
    report.kept = len(out)
    return out, report


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write all rows, then rename: readers never see a half-written dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def critique_to_sft(records_path: str | Path, output_path: str | Path, config: SFTExportConfig,
                    seed: int = 0) -> ExportResult:
    """Write the SFT dataset for ``records_path`` to ``output_path`` (JSONL, ``messages`` rows)."""
    records_path, output_path = Path(records_path), Path(output_path)
    if not records_path.exists():
        raise DataError(f"{records_path}: no critique records; run `cai critique` first or pass --input")
    rows: list[dict[str, Any]] = []
    skipped = 0
    for record in read_records(records_path):
        if config.revisions == "final":
            steps = [(len(record["rounds"]), record["final_response"])]
        else:
            steps = [(r["round"], r["revision"]) for r in record["rounds"]]
        for round_no, text in steps:
            if not text.strip():
                skipped += 1
                continue
            rows.append({"messages": [*record["prompt"], {"role": "assistant", "content": text}],
                         "source": "critique", "key": f"{record['key']}:r{round_no}",
                         "constitution_hash": record["constitution_hash"]})
    n_critique = len(rows)
    n_helpful = 0
    if config.helpful is not None and config.helpful_fraction > 0 and n_critique:
        conversations, _ = load_conversations(config.helpful)
        if not conversations:
            raise DataError(f"{config.helpful.path}: no usable helpfulness conversations (need messages ending "
                            "with an assistant turn, or hh-rlhf 'chosen' transcripts)")
        want = round(n_critique * config.helpful_fraction / (1 - config.helpful_fraction))
        rng = random.Random(seed)
        picked = (rng.sample(conversations, want) if want <= len(conversations)
                  else [rng.choice(conversations) for _ in range(want)])
        rows += [{"messages": m, "source": "helpful", "key": conversation_key(m), "constitution_hash": None}
                 for m in picked]
        n_helpful = len(picked)
        random.Random(seed + 1).shuffle(rows)
    write_jsonl_atomic(output_path, rows)
    return ExportResult(output_path, n_critique, n_helpful, skipped)
