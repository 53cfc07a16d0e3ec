"""Exports of stage records to the formats trainers read.

SL-CAI records become conversational SFT examples (TRL's ``messages`` format): each prompt with
its final revision, or with every revision step as the paper did, optionally mixed with
helpfulness conversations so the fine-tuned model stays helpful.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional_ai.common.errors import DataError
from constitutional_ai.config import PromptSourceConfig, SFTExportConfig
from constitutional_ai.data.prompts import PromptReport, conversation_key, iter_rows, row_conversation
from constitutional_ai.data.store import MANIFEST, read_records, write_atomic


@dataclass
class ExportResult:
    output: Path
    critique_examples: int
    helpful_examples: int
    skipped: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "critique_examples": self.critique_examples,
                "helpful_examples": self.helpful_examples, "skipped": self.skipped}


def load_conversations(config: PromptSourceConfig) -> tuple[list[list[dict[str, str]]], PromptReport]:
    """Whole conversations ending with a non-empty assistant turn (helpfulness demonstrations):
    ``messages`` rows or hh-rlhf ``chosen`` transcripts; other rows are reported and skipped."""
    report = PromptReport(source=config.path)
    out = []
    for _, where, row in iter_rows(config, report):
        report.read += 1
        messages = row_conversation(row, config)
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            report.skip("malformed", where)
            continue
        out.append(messages)
        if config.limit and len(out) >= config.limit:
            break
    report.kept = len(out)
    return out, report


def critique_to_sft(records_path: str | Path, output_path: str | Path, config: SFTExportConfig,
                    seed: int = 0) -> ExportResult:
    """Write the SFT dataset for ``records_path`` to ``output_path`` (JSONL, ``messages`` rows).

    Only text the model revised is exported: a prompt whose every revision came back empty
    would otherwise contribute its unrevised (possibly harmful) initial response.
    """
    records_path, output_path = Path(records_path), Path(output_path)
    if not records_path.exists():
        raise DataError(f"{records_path}: no critique records; run `cai critique` with the same --output-dir first")
    manifest_path = records_path.parent / MANIFEST
    if manifest_path.exists() and json.loads(manifest_path.read_text(encoding="utf-8")).get("status") != "complete":
        raise DataError(f"{records_path.parent}: the critique run is not finished; run the same `cai critique` "
                        "command again to complete it, then export")
    rows: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for record in read_records(records_path):
        rounds = [r for r in record["rounds"] if r["revision"].strip()]
        skipped["empty_revision"] += len(record["rounds"]) - len(rounds)
        if config.drop_truncated:
            kept = [r for r in rounds if r.get("finish_reason") != "length"]
            skipped["truncated_revision"] += len(rounds) - len(kept)
            rounds = kept
        if config.revisions == "final":
            rounds = rounds[-1:]
        for r in rounds:
            rows.append({"messages": [*record["prompt"], {"role": "assistant", "content": r["revision"]}],
                         "source": "critique", "key": f"{record['key']}:r{r['round']}",
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
    write_atomic(output_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return ExportResult(output_path, n_critique, n_helpful, dict(skipped))
