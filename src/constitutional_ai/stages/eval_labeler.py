"""``cai eval-labeler``: a feedback configuration measured on data with known answers: accuracy,
calibration (a reliability diagram) and position bias."""

from __future__ import annotations

import json
import time
from pathlib import Path

from constitutional_ai.backends import LanguageModel, load_backend
from constitutional_ai.config import RunConfig
from constitutional_ai.data.prompts import EMBEDDED
from constitutional_ai.data.store import RecordStore, write_atomic
from constitutional_ai.evaluation.labeler import evaluate_batch, load_eval_items, summarise
from constitutional_ai.feedback.labeler import FeedbackLabeler
from constitutional_ai.layout import RunLayout
from constitutional_ai.report.spec import Plot, ReportSpec
from constitutional_ai.stages.feedback import sft_policy
from constitutional_ai.stages.registry import Stage, inputs_identity, register
from constitutional_ai.stages.runner import StageResult, load_stage_constitution
from constitutional_ai.stages.streaming import stream_batches

STAGE = "eval_labeler"
SECTIONS = ("seed", "policy", "constitution", "feedback", "eval_labeler")


def run_eval_labeler(config: RunConfig, backend: LanguageModel | None = None) -> StageResult:
    start = time.perf_counter()
    constitution = load_stage_constitution(config.constitution, "comparison", "feedback_examples",
                                           config.feedback.few_shot, "--feedback.few_shot")
    data = config.eval_labeler.data
    items = load_eval_items(data, config.eval_labeler.format, config.eval_labeler.limit)
    identity = {"stage": STAGE, "config": config.fingerprint(SECTIONS), "constitution": constitution.hash,
                "data": data if data.startswith(EMBEDDED) else str(Path(data).resolve()),
                **inputs_identity(STAGE, config)}
    layout = RunLayout.of(config)
    directory = layout.eval_labeler
    with RecordStore(directory, identity, resume=config.resume, overwrite=config.overwrite,
                     fields=config.fingerprint_fields(SECTIONS)) as store:
        owns = backend is None
        backend = backend or load_backend(config.feedback.model or config.policy)
        try:
            feedback = config.feedback.model_copy(update={"both_orders": True}) \
                if config.eval_labeler.both_orders else config.feedback
            labeler = FeedbackLabeler(backend, constitution, feedback, seed=config.seed)
            written = stream_batches(store, items, lambda it: it.key, config.feedback.batch_size,
                                        lambda batch, _: evaluate_batch(batch, backend, labeler, config.seed),
                                        "eval-labeler", "items", config.progress).written
            results = summarise(list(store.records()), layout.labeler_plot, config.eval_labeler.n_bins,
                                labeler_id=backend.model_id, constitution_hash=constitution.hash)
            results["skipped_too_long"] = labeler.too_long
            write_atomic(layout.labeler_results, json.dumps(results, indent=2))
            store.close(complete=True)
        finally:
            if owns:
                backend.close()
    return StageResult(STAGE, layout.labeler_results, written, len(items), time.perf_counter() - start, {},
                       {k: v for k, v in results.items() if k != "bins"})


register(Stage(
    # the judge is the policy (or feedback.model): its identity comes from the SFT stage it consumes
    # in the pipeline, as for `cai label`; the record store's own identity still names the model
    name=STAGE, command="eval-labeler", run=run_eval_labeler, sections=tuple(s for s in SECTIONS if s != "policy"),
    options=("policy",), consumes=("sft_model",),
    wire=sft_policy,  # in the pipeline: the labeler `cai label` uses, on pairs with known answers
    help="Measure a feedback configuration on data with known answers: accuracy, ECE, reliability, bias.",
    inputs=("eval_labeler.data",), produces=("eval_labeler", "labeler_results"),
    produced=lambda r: f"{r.total} items",
    report=ReportSpec(store="eval_labeler", unit="items",
                      plots=(Plot("labeler_plot", "Feedback labeler calibration"),)),
))
