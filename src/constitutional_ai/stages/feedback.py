"""``cai sample-pairs`` and ``cai label``: response pairs from the policy, then AI soft labels."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from constitutional_ai.backends import LanguageModel, load_backend
from constitutional_ai.common.errors import DataError
from constitutional_ai.common.seeding import derive_seed
from constitutional_ai.common.text import clean_completion
from constitutional_ai.config import RunConfig
from constitutional_ai.data.prompts import PromptItem, load_prompts
from constitutional_ai.data.store import MANIFEST, RecordStore, read_records, write_atomic
from constitutional_ai.evaluation.calibration import position_bias_rate
from constitutional_ai.feedback.labeler import Comparison, FeedbackLabeler, position_pairs
from constitutional_ai.layout import STAGE_CONFIG, STAGE_CONSTITUTION, RunLayout
from constitutional_ai.report.spec import ReportSpec
from constitutional_ai.stages.registry import Stage, inputs_identity, register
from constitutional_ai.stages.runner import StageResult, load_stage_constitution, run_with_backend
from constitutional_ai.stages.streaming import Output, Processor, Skip

PAIRS, LABELS = "pairs", "labels"
PAIRS_SECTIONS = ("seed", "policy", "prompts", "pairs")
LABEL_SECTIONS = (*PAIRS_SECTIONS, "constitution", "feedback")


# -- sample-pairs ---------------------------------------------------------------------------------------
def sample_responses(backend: LanguageModel, items: list[PromptItem], config: RunConfig,
                     on_step: Any = None) -> list[dict[str, Any]]:
    """K responses per prompt, each from its own seed, in one batched ``generate``."""
    k = config.pairs.n_responses
    prompts = [it.messages for it in items for _ in range(k)]
    seeds = [derive_seed(config.seed, "pairs", it.key, j) for it in items for j in range(k)]
    params = config.pairs.generation
    if backend.style == "raw":
        from constitutional_ai.common.chat_format import RAW_STOP

        params = params.model_copy(update={"stop": [*params.stop, *(s for s in RAW_STOP if s not in params.stop)]})
    outs = backend.generate(prompts, params, seeds=seeds)
    if on_step is not None:
        on_step("sample", sum(g.completion_tokens for g in outs))
    records = []
    for n, item in enumerate(items):
        gens = outs[n * k:(n + 1) * k]
        responses = [clean_completion(g.text, backend.style) for g in gens]
        records.append({
            "key": item.key, "prompt": item.messages, "responses": responses,
            "finish_reasons": [g.finish_reason for g in gens],
            "pairs": [list(p) for p in itertools.combinations(range(k), 2)],
            "policy_id": backend.model_id, "sampling": params.model_dump(), "seed": config.seed,
        })
    return records


def pairs_processor(config: RunConfig, backend: LanguageModel | None = None) -> Processor:
    """The batch processor of sample-pairs (loads the policy when no backend is given, as in a Ray actor)."""
    backend = backend or load_backend(config.policy)
    return lambda batch, on_step: sample_responses(backend, batch, config, on_step)  # type: ignore[return-value]


def run_sample_pairs(config: RunConfig, backend: LanguageModel | None = None) -> StageResult:
    start = time.perf_counter()
    items, report = load_prompts(config.prompts)
    identity = {"stage": PAIRS, "config": config.fingerprint(PAIRS_SECTIONS), **inputs_identity(PAIRS, config)}
    directory = RunLayout.of(config).pairs
    with RecordStore(directory, identity, resume=config.resume, overwrite=config.overwrite,
                     fields=config.fingerprint_fields(PAIRS_SECTIONS)) as store:
        config.to_yaml(directory / STAGE_CONFIG)
        streamed = run_with_backend(store, items, lambda it: it.key, config.pairs.batch_size, pairs_processor, config,
                                    config.policy, backend, "policy_id", PAIRS, "prompts")
        store.close(complete=True, prompts=report.as_dict())
    return StageResult(PAIRS, store.path, streamed.written, len(items), time.perf_counter() - start,
                       report.as_dict(), {"resumed_from": streamed.done_before})


# -- label ----------------------------------------------------------------------------------------------
def comparisons_from_pairs(path: Path) -> list[Comparison]:
    if not path.exists():
        raise DataError(f"{path}: no response pairs; run `cai sample-pairs` with the same --output-dir first")
    manifest = path.parent / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text(encoding="utf-8")).get("status") != "complete":
        raise DataError(f"{path.parent}: sampling is not finished; run the same `cai sample-pairs` again first")
    out = []
    for record in read_records(path):
        for i, j in record["pairs"]:
            a, b = record["responses"][i], record["responses"][j]
            if a.strip() == b.strip():
                continue  # identical responses carry no preference
            out.append(Comparison(f"{record['key']}:{i}-{j}", record["prompt"], a, b))
    return out


def label_processor(config: RunConfig, backend: LanguageModel | None = None) -> Processor:
    """The batch processor of label: one record per comparison, a skip for one too long to fit."""
    constitution = load_stage_constitution(config.constitution, "comparison", "feedback_examples",
                                           config.feedback.few_shot, "--feedback.few_shot")
    backend = backend or load_backend(config.feedback.model or config.policy)
    labeler = FeedbackLabeler(backend, constitution, config.feedback, seed=config.seed)

    def process(batch: list[Comparison], _: Any) -> list[Output]:
        records = labeler.label(batch)
        return [r if r is not None else Skip("too_long", c.key) for r, c in zip(records, batch, strict=True)]

    return process


def run_label(config: RunConfig, backend: LanguageModel | None = None,
              comparisons: list[Comparison] | None = None) -> StageResult:
    """Label every comparison (by default, the pairs stage's output) with the feedback model."""
    start = time.perf_counter()
    constitution = load_stage_constitution(config.constitution, "comparison", "feedback_examples",
                                           config.feedback.few_shot, "--feedback.few_shot")
    layout = RunLayout.of(config)
    comparisons = comparisons if comparisons is not None else comparisons_from_pairs(layout.pairs_records)
    identity = {"stage": LABELS, "config": config.fingerprint(LABEL_SECTIONS), "constitution": constitution.hash}
    directory = layout.labels
    with RecordStore(directory, identity, resume=config.resume, overwrite=config.overwrite,
                     fields=config.fingerprint_fields(LABEL_SECTIONS)) as store:
        config.to_yaml(directory / STAGE_CONFIG)
        constitution.save(str(directory / STAGE_CONSTITUTION))
        streamed = run_with_backend(store, comparisons, lambda c: c.key, config.feedback.batch_size,
                                    label_processor, config, config.feedback.model or config.policy, backend,
                                    "labeler_id", LABELS, "pairs")
        summary = label_summary(list(store.records()), skipped_too_long=len(streamed.skipped))
        store.close(complete=True, summary=summary)
    labels_to_preferences(layout.labels_records, layout.preferences)  # what train-pm and dpo read (run:preferences)
    return StageResult(LABELS, store.path, streamed.written, len(comparisons), time.perf_counter() - start, {},
                       {"resumed_from": streamed.done_before, **summary})


def label_summary(records: list[dict[str, Any]], skipped_too_long: int) -> dict[str, Any]:
    """Run figures: label count, mean confidence, position-bias rate, truncations."""
    first, second = position_pairs(records)
    return {
        "labels": len(records),
        "mean_p_chosen": round(sum(r["p_chosen"] for r in records) / len(records), 4) if records else None,
        "position_bias_rate": round(position_bias_rate(first, second), 4) if first else None,
        "truncated_conversations": sum(1 for r in records if r.get("truncated")),
        "skipped_too_long": skipped_too_long,
    }


# -- export ---------------------------------------------------------------------------------------------
def labels_to_preferences(records_path: Path, output_path: Path) -> int:
    """TRL's conversational preference format: ``prompt``, ``chosen``, ``rejected`` as message
    lists, plus our ``p_chosen`` soft label and the constitution hash for traceability."""
    if not records_path.exists():
        raise DataError(f"{records_path}: no labels; run `cai label` with the same --output-dir first")
    rows = []
    for r in read_records(records_path):
        rows.append({
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "p_chosen": r["p_chosen"], "key": r["key"], "labeler_id": r["labeler_id"],
            "constitution_hash": r["constitution_hash"],
        })
    write_atomic(output_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)


def export_preferences(config: RunConfig) -> dict[str, Any]:
    """Rewrite this run's preference file from its labels (``cai label`` already writes it)."""
    layout = RunLayout.of(config)
    return {"output": str(layout.preferences), "pairs": labels_to_preferences(layout.labels_records,
                                                                              layout.preferences)}


def sft_policy(config: RunConfig, layout: RunLayout) -> RunConfig:
    """In the pipeline, response pairs are sampled (and, with no feedback model set, labelled) by the
    SL-CAI model, as in the paper."""
    return _policy_from(config, layout.sft_model)


def _policy_from(config: RunConfig, model: Path) -> RunConfig:
    if not model.is_dir():
        return config
    policy = config.policy.model_copy(update={"model_name_or_path": str(model)})
    return config.model_copy(update={"policy": policy})


def current_policy(config: RunConfig, layout: RunLayout) -> RunConfig:
    """Pairs come from the policy being trained: the SL-CAI model in iteration 1, the RL policy the
    previous iteration left from iteration 2 (iterated online RL-CAI: the PM learns the
    distribution the policy has moved to)."""
    if config.iteration == 1:
        return sft_policy(config, layout)
    return _policy_from(config, layout.at(config.iteration - 1).rl_model)


def pm_loop(config: RunConfig) -> bool:
    """Pairs, labels and the PM exist to reward RL; direct RLAIF (``rl.reward: feedback``) needs none."""
    return config.rl.reward == "pm"


register(Stage(
    name=PAIRS, command="sample-pairs", run=run_sample_pairs, sections=("seed", "prompts", "pairs"),
    options=("policy", "ray"),
    help="RL-CAI: sample K responses per prompt from the policy and pair them, resumable.",
    inputs=("prompts.path",), consumes=("sft_model",), produces=("pairs", "pairs_records"),
    wire=current_policy, iterated=True, from_previous=("rl_model",), when=pm_loop,
    report=ReportSpec(store="pairs", unit="prompts"), produced=lambda r: f"{r.total} prompts",
))
register(Stage(
    name=LABELS, command="label", run=run_label, sections=("seed", "constitution", "feedback"),
    options=("policy", "prompts", "pairs", "ray"),
    help="RL-CAI: soft preference labels from the feedback model under the constitution, resumable.",
    consumes=("pairs_records",), produces=("labels", "labels_records", "preferences"),
    wire=sft_policy, iterated=True, when=pm_loop,
    report=ReportSpec(store="labels", unit="comparisons"), produced=lambda r: f"{r.total} comparisons",
))
register(Stage(
    name="export_preferences", command="export-preferences", run=export_preferences, sections=(), pipeline=False,
    help="Export labels as a TRL preference dataset (prompt/chosen/rejected messages + p_chosen).",
    consumes=("labels_records",), produces=("preferences",), summary=lambda result: result,
))
