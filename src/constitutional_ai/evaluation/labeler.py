"""``cai eval-labeler``: how good is a feedback configuration on data with known answers?

Two formats. The paper's multiple-choice eval records (``prompt`` ending in ``The answer is:``,
``corrects``/``incorrects`` answer strings) are scored directly with ``score_choices``; their
optional ``text_correct``/``text_incorrect`` transcripts, and pairwise ``chosen``/``rejected``
transcripts such as hh-rlhf's, are wrapped in the constitution's comparison question and
labelled by :class:`FeedbackLabeler`. Which response sits in slot A is decided by a seeded coin
per item, so a judge that favours a slot cannot score above chance by it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional_ai.backends import LanguageModel
from constitutional_ai.common.chat_format import parse_raw
from constitutional_ai.common.errors import DataError
from constitutional_ai.common.seeding import derive_seed
from constitutional_ai.data.prompts import EMBEDDED, conversation_key, embedded_path, hh_pair, hh_split
from constitutional_ai.data.readers import read_rows
from constitutional_ai.evaluation.calibration import calibration_summary, position_bias_rate, reliability_diagram
from constitutional_ai.feedback.labeler import Comparison, FeedbackLabeler, position_pairs


@dataclass(frozen=True)
class EvalItem:
    key: str
    kind: str  # "multiple_choice" or "pairwise"
    prompt: Any  # raw text (multiple choice) or a conversation (pairwise)
    correct: list[str]
    incorrect: list[str]


def _is_multiple_choice(row: dict[str, Any]) -> bool:
    return (isinstance(row.get("prompt"), str) and row["prompt"].rstrip().endswith("The answer is:")
            and bool(row.get("corrects")) and bool(row.get("incorrects")))


def load_eval_items(path: str, fmt: str = "auto", limit: int | None = None) -> list[EvalItem]:
    """Read eval data; rows that fit neither format are a one-line error naming the line."""
    file = embedded_path(path[len(EMBEDDED):], "eval") if path.startswith(EMBEDDED) else Path(path)
    if not path or not file.is_file():
        raise DataError(f"{path or '(none)'}: eval data not found; pass --data FILE.jsonl")
    # the paper's few-shot files are JSON lists; anything else is JSONL, whatever its suffix
    rows = read_rows(file, "json" if file.suffix == ".json" else "jsonl")
    items: list[EvalItem] = []

    def add_pair(key: str, better: str, worse: str) -> None:
        prompt, good, bad = hh_pair(better, worse)
        if prompt and good.strip() and bad.strip() and good.strip() != bad.strip():  # else nothing to compare
            items.append(EvalItem(key, "pairwise", prompt, [good], [bad]))

    for n, (_, where, row) in enumerate(rows, 1):  # keys count records, as they always have
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        if (fmt in ("auto", "multiple_choice")) and _is_multiple_choice(row):
            answers = (row["corrects"], row["incorrects"])
            if not all(isinstance(a, list) and all(isinstance(x, str) for x in a) for a in answers):
                raise DataError(f"{where}: corrects and incorrects must be lists of answer strings like [\" (A)\"]")
            items.append(EvalItem(f"mc{n}", "multiple_choice", row["prompt"], list(row["corrects"]),
                                  list(row["incorrects"])))
            if isinstance(row.get("text_correct"), str) and isinstance(row.get("text_incorrect"), str):
                add_pair(f"mc{n}-text", row["text_correct"], row["text_incorrect"])
        elif fmt in ("auto", "pairwise") and isinstance(row.get("chosen"), str) \
                and isinstance(row.get("rejected"), str):
            add_pair(f"p{n}-{conversation_key(hh_split(row['chosen'])[0])[:8]}", row["chosen"], row["rejected"])
        elif fmt in ("auto", "pairwise") and isinstance(row.get("prompt"), str) \
                and isinstance(row.get("corrects"), list) and isinstance(row.get("incorrects"), list) \
                and row["corrects"] and row["incorrects"]:
            # the paper's feedback few-shot file: a conversation with correct/incorrect responses
            items.append(EvalItem(f"p{n}", "pairwise", parse_raw(row["prompt"]), [row["corrects"][0].strip()],
                                  [row["incorrects"][0].strip()]))
        else:
            raise DataError(f"{where}: neither a multiple-choice record (prompt ending 'The answer is:', corrects, "
                            "incorrects) nor a chosen/rejected pair; fix the line or pass --data-format")
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{file}: no evaluable records")
    return items[:limit] if limit else items


def _softmax_mass(scores: list[float], n_correct: int) -> float:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return sum(weights[:n_correct]) / sum(weights)


def evaluate_batch(items: list[EvalItem], backend: LanguageModel, labeler: FeedbackLabeler,
                   seed: int) -> list[dict[str, Any] | None]:
    """Per item: the probability the configuration gives the correct answer, and its details."""
    out: dict[str, dict[str, Any] | None] = {}
    mc = [it for it in items if it.kind == "multiple_choice"]
    if mc:  # a question longer than the context cannot be scored honestly: count it, don't crash
        lengths = backend.count_tokens([it.prompt for it in mc])
        fits = [it for it, n in zip(mc, lengths, strict=True) if n + 16 <= backend.context_length]
        for it in mc:
            out[it.key] = None
        labeler.too_long += len(mc) - len(fits)
        mc = fits
    if mc:
        scores = backend.score_choices([it.prompt for it in mc], [it.correct + it.incorrect for it in mc])
        for it, s in zip(mc, scores, strict=True):
            out[it.key] = {"key": it.key, "kind": it.kind, "p_correct": _softmax_mass(s, len(it.correct))}
    pairwise = [it for it in items if it.kind == "pairwise"]
    flips = {it.key: random.Random(derive_seed(seed, "eval-slot", it.key)).random() < 0.5 for it in pairwise}
    comparisons = [Comparison(it.key, it.prompt, it.incorrect[0] if flips[it.key] else it.correct[0],
                              it.correct[0] if flips[it.key] else it.incorrect[0]) for it in pairwise]
    for it, record in zip(pairwise, labeler.label(comparisons), strict=True):
        if record is None:
            out[it.key] = None
            continue
        p_correct = 1.0 - record["p_a"] if flips[it.key] else record["p_a"]
        out[it.key] = {"key": it.key, "kind": it.kind, "p_correct": p_correct, "correct_in_slot": "B" if flips[
            it.key] else "A", "principles": record["principles"], "truncated": record["truncated"]}
    return [out[it.key] for it in items]


def summarise(records: list[dict[str, Any]], plot: Path, n_bins: int, **meta: Any) -> dict[str, Any]:
    """Accuracy, ECE, reliability diagram and position bias over all items and per kind."""
    if not records:
        raise DataError(f"{plot.parent}: no item could be evaluated (all too long for the context?)")
    p = [r["p_correct"] for r in records]
    results: dict[str, Any] = {**meta, **calibration_summary(p, n_bins)}
    for kind in ("multiple_choice", "pairwise"):
        subset = [r["p_correct"] for r in records if r["kind"] == kind]
        if subset and len(subset) != len(p):
            results[kind] = {k: v for k, v in calibration_summary(subset, n_bins).items() if k != "bins"}
    first, second = position_pairs([r for r in records if r["kind"] == "pairwise"])
    results["position_bias_rate"] = position_bias_rate(first, second) if first else None
    results["reliability_diagram"] = str(reliability_diagram(p, plot, n_bins=n_bins,
                                                             title="AI feedback labeler reliability"))
    return results
