"""Preference pairs from every source a PM is trained or evaluated on, parsed into one shape.

A pair is ``(prompt conversation, chosen response, rejected response, p)`` where ``p`` is the
probability that ``chosen`` is the better one: the soft AI label from ``cai label``, or 1 for a
human label. Sources are mixed by weight, so one run can train on AI harmlessness labels and human
helpfulness pairs together, as the paper did.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional_ai.common.chat_format import parse_raw
from constitutional_ai.common.errors import DataError
from constitutional_ai.common.seeding import derive_seed
from constitutional_ai.common.types import Conversation
from constitutional_ai.config import PreferenceSourceConfig
from constitutional_ai.data.prompts import conversation_key, hh_pair
from constitutional_ai.data.readers import Row, is_hub_id, read_rows
from constitutional_ai.layout import RunLayout

#: ``run:preferences`` names this run's AI labels, written by ``cai label``/``cai export-preferences``.
RUN_PREFERENCES = "run:preferences"
#: Preference files: ours are JSONL (with or without the suffix); the rest is what datasets reads too.
FILE_SUFFIXES = ("", ".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class PreferencePair:
    key: str
    prompt: Conversation
    chosen: str
    rejected: str
    p: float = 1.0  # P(chosen is better): a soft AI label, or 1.0 for a human label
    source: str = ""


@dataclass
class SourceReport:
    """What one source gave: rows read, pairs kept, and why the others were dropped."""

    source: str
    weight: float
    read: int = 0
    kept: int = 0
    in_mix: int = 0
    dropped: Counter = field(default_factory=Counter)
    constitution_hashes: set[str] = field(default_factory=set)  # of AI-labelled rows, for traceability

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "weight": self.weight, "read": self.read, "kept": self.kept,
                "in_mix": self.in_mix, "dropped": dict(self.dropped),
                "constitution_hashes": sorted(self.constitution_hashes)}


def _text(value: Any) -> str | None:
    """A response given as a string or as TRL's one-message conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return value[-1].get("content")
    return None


def _messages(value: Any) -> Conversation | None:
    if isinstance(value, str):
        parsed = parse_raw(value) if "Human:" in value else []
        return parsed or [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def _answer_list(value: Any) -> list[str]:
    """A list of answer strings, also when the paper's files hold it as the text of a list."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return []
    return [v.strip() for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) else []


def parse_row(row: Any, fmt: str = "auto") -> tuple[Conversation, str, str, float] | str:
    """``(prompt, chosen, rejected, p)`` from one row, or the reason it is not a preference pair.

    Understood: ``prompt``/``chosen``/``rejected`` (TRL's standard and conversational formats, and
    ours with ``p_chosen``); ``chosen``/``rejected`` hh-rlhf transcripts or TRL implicit-prompt
    conversations; the paper's multiple-choice records through ``text_correct``/``text_incorrect``.
    """
    if not isinstance(row, dict):
        return "not a JSON object"
    if fmt in ("auto", "preferences") and "prompt" in row and "chosen" in row and "rejected" in row:
        prompt, chosen, rejected = _messages(row["prompt"]), _text(row["chosen"]), _text(row["rejected"])
        if prompt is None or chosen is None or rejected is None:
            return "prompt/chosen/rejected of an unknown shape"
        p = row.get("p_chosen", 1.0)
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            return "p_chosen is not a probability"
        return prompt, chosen, rejected, float(p)
    for good, bad in (("chosen", "rejected"), ("text_correct", "text_incorrect")):
        if isinstance(row.get(good), str) and isinstance(row.get(bad), str) and fmt in ("auto", "hh"):
            return (*hh_pair(row[good], row[bad]), 1.0)
    if fmt in ("auto", "preferences") and isinstance(row.get("prompt"), str) and "corrects" in row \
            and "incorrects" in row:
        # the paper's feedback few-shot records: a raw conversation, correct/incorrect responses
        good, bad = _answer_list(row["corrects"]), _answer_list(row["incorrects"])
        if good and bad:
            return parse_raw(row["prompt"]), good[0], bad[0], 1.0
    if fmt in ("auto", "preferences") and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        chosen_conv, rejected_conv = _messages(row["chosen"]), _messages(row["rejected"])
        if chosen_conv and rejected_conv and chosen_conv[:-1] == rejected_conv[:-1] \
                and chosen_conv[-1]["role"] == "assistant":
            return chosen_conv[:-1], chosen_conv[-1]["content"], rejected_conv[-1]["content"], 1.0
    return "no prompt/chosen/rejected, chosen/rejected or text_correct/text_incorrect fields"


def _rows(source: PreferenceSourceConfig, run_dir: Path | None) -> tuple[str, Iterator[Row]]:
    """``(name, rows)`` of one source, offset and limit applied."""
    path = source.path
    if path == RUN_PREFERENCES or path.startswith(RUN_PREFERENCES + "@"):
        if run_dir is None:
            raise DataError("run:preferences needs a run directory; pass --output-dir of a run that ran `cai label`")
        resolved = RunLayout(run_dir).run_data(path)
        if resolved is None:
            raise DataError(f"{path}: not a run data name; use run:preferences or run:preferences@K (iteration K)")
        path = str(resolved)
        if not Path(path).is_file():
            raise DataError(f"{path}: no AI preference labels yet; run `cai label` (or `cai run`) with this "
                            "--output-dir first, or pass --pm-data FILE")
    file = Path(path).expanduser()
    if file.is_file() and file.suffix not in FILE_SUFFIXES:
        raise DataError(f"{file}: unknown preference file type; use .jsonl, .json, .parquet or .csv")
    hub = is_hub_id(path)
    name = path + (f"/{source.data_dir}" if source.data_dir else "") if hub else str(file)
    fmt = "jsonl" if not hub and file.suffix == "" else "auto"  # our own files may have no suffix
    return name, read_rows(path, fmt, name=name, split=source.split, subset=source.subset, data_dir=source.data_dir,
                           offset=source.offset, limit=source.limit,
                           missing_hint="; check the path in --pm-data / pm.sources")


def read_source(source: PreferenceSourceConfig, run_dir: Path | None = None,
                ) -> tuple[list[PreferencePair], SourceReport]:
    """Every usable pair of one source. Rows that are not preference pairs at all are an error
    naming the line; pairs with an empty or identical side are dropped and counted."""
    name, rows = _rows(source, run_dir)
    report = SourceReport(name, source.weight)
    pairs = []
    for _, where, row in rows:
        report.read += 1
        parsed = parse_row(row, source.format)
        if isinstance(parsed, str):
            raise DataError(f"{where}: {parsed}; fix the row or pick another --pm-data format")
        prompt, chosen, rejected, p = parsed
        if isinstance(row, dict) and isinstance(row.get("constitution_hash"), str):
            report.constitution_hashes.add(row["constitution_hash"])
        chosen, rejected = chosen.strip(), rejected.strip()
        if not chosen or not rejected:
            report.dropped["empty response"] += 1
            continue
        if chosen == rejected:
            report.dropped["identical responses"] += 1
            continue
        key = f"{conversation_key([*prompt, {'role': 'assistant', 'content': chosen}])[:12]}-{report.read}"
        pairs.append(PreferencePair(key, prompt, chosen, rejected, p, name))
    report.kept = len(pairs)
    if not pairs:
        raise DataError(f"{name}: no usable preference pairs ({report.read} rows read, dropped: "
                        f"{dict(report.dropped) or 'none'})")
    return pairs, report


def mix_sources(sources: list[PreferenceSourceConfig], seed: int, run_dir: Path | None = None,
                ) -> tuple[list[PreferencePair], list[SourceReport]]:
    """All sources in one shuffled list, each sampled by its weight: the integer part of a weight
    repeats every pair, the fractional part adds a seeded random subset."""
    mixed: list[PreferencePair] = []
    reports = []
    for index, source in enumerate(sources):
        pairs, report = read_source(source, run_dir)
        rng = random.Random(derive_seed(seed, "pm-mix", index, source.path))
        whole, frac = int(source.weight), source.weight - int(source.weight)
        chosen = pairs * whole + rng.sample(pairs, round(frac * len(pairs)))
        report.in_mix = len(chosen)
        mixed += chosen
        reports.append(report)
    random.Random(derive_seed(seed, "pm-shuffle")).shuffle(mixed)
    return mixed, reports


@dataclass
class IterationMix:
    """What iteration ``k`` of iterated online RL-CAI trains and measures its PM on."""

    train: list[PreferencePair]
    heldout: list[PreferencePair]  # fixed across iterations: iteration 1's held-out prompts
    newest: list[PreferencePair]  # the newest policy's pairs on held-out prompts (never trained on)
    reports: list[SourceReport]
    eval_reports: list[SourceReport]


def iteration_mix(sources: list[PreferenceSourceConfig], eval_sources: list[PreferenceSourceConfig],
                  eval_fraction: float, seed: int, run_dir: Path, iteration: int,
                  new_weight: float) -> IterationMix:
    """The PM's data at ``iteration``: iteration 1's mix exactly as a one-iteration run has it (its
    sources, ``run:preferences`` being iteration 1's labels), plus every later iteration's AI labels
    (``run:preferences@j``), the newest weighted ``new_weight`` and the older ones 1, so the PM
    follows the policy without forgetting where it started. The held-out set is iteration 1's and
    stays fixed; the newest policy's pairs on its prompts are a second, moving, held-out set. No
    prompt is both trained and evaluated on, except where the held-out set comes from
    ``eval_sources``: then the newest set is a share of the newest pairs, whose prompts iteration 1
    trained on (with other responses); with nothing held out at all there is no newest set either."""
    train, reports = mix_sources(sources, seed, run_dir)
    if eval_sources:
        heldout, eval_reports = mix_sources(eval_sources, seed, run_dir)
    else:
        train, heldout = split_heldout(train, eval_fraction)
        eval_reports = []
    if iteration == 1:
        return IterationMix(train, heldout, heldout, reports, eval_reports)
    held = {conversation_key(p.prompt) for p in heldout}
    newest_source = PreferenceSourceConfig(path=f"{RUN_PREFERENCES}@{iteration}")
    newest_all, _ = read_source(newest_source, run_dir)
    newest = [p for p in newest_all if conversation_key(p.prompt) in held]
    if not newest and eval_sources:  # held-out prompts from elsewhere: hold out part of the newest pairs
        _, newest = split_heldout(newest_all, eval_fraction or 0.1)
        held |= {conversation_key(p.prompt) for p in newest}
    later = [PreferenceSourceConfig(path=f"{RUN_PREFERENCES}@{j}", weight=new_weight if j == iteration else 1.0)
             for j in range(2, iteration + 1)]
    added, added_reports = mix_sources(later, derive_seed(seed, "pm-iteration", iteration), run_dir)
    train = [p for p in train if conversation_key(p.prompt) not in held]
    train += [p for p in added if conversation_key(p.prompt) not in held]
    random.Random(derive_seed(seed, "pm-iteration-shuffle", iteration)).shuffle(train)
    return IterationMix(train, heldout, newest, reports + added_reports, eval_reports)


def split_heldout(pairs: list[PreferencePair], fraction: float) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, eval)``: the last ``fraction`` of the (already shuffled) mix is held out, by
    conversation, so that no prompt is both trained and evaluated on."""
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    prompts = list(dict.fromkeys(conversation_key(p.prompt) for p in pairs))
    held = set(prompts[len(prompts) - max(1, round(fraction * len(prompts))):])
    train = [p for p in pairs if conversation_key(p.prompt) not in held]
    heldout = [p for p in pairs if conversation_key(p.prompt) in held]
    return (train, heldout) if train else (pairs, [])
