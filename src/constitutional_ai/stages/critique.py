"""``cai critique``: run the critique-revision engine over a prompt set, resumably."""

from __future__ import annotations

import time
from collections.abc import Callable

from constitutional_ai.backends import LanguageModel, load_backend
from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import RunConfig
from constitutional_ai.critique.engine import CritiqueRevisionEngine
from constitutional_ai.data.prompts import PromptItem, load_prompts
from constitutional_ai.data.store import RecordStore
from constitutional_ai.layout import STAGE_CONFIG, STAGE_CONSTITUTION, RunLayout
from constitutional_ai.report.spec import ReportSpec
from constitutional_ai.stages.registry import Stage, inputs_identity, register
from constitutional_ai.stages.runner import StageResult, load_stage_constitution, run_with_backend
from constitutional_ai.stages.streaming import Output, Processor, Skip

STAGE = "critique"
#: The config sections whose values change what the critique stage writes.
SECTIONS = ("seed", "constitution", "policy", "prompts", "critique")


def split_too_long(items: list[PromptItem], backend: LanguageModel,
                   engine: CritiqueRevisionEngine) -> tuple[list[PromptItem], dict[int, Skip]]:
    """Set aside prompts whose longest request (the last revision prompt, with response and critique
    at full length) would not fit the model's context; a long prompt is reported, never a crash."""
    params = engine.params
    probe = engine.constitution.critique_revision
    longest_request = max(probe, key=lambda p: len(p.critique_request) + len(p.revision_request))
    from constitutional_ai.constitution.prompts import CritiqueStep

    step = CritiqueStep(longest_request.critique_request, longest_request.revision_request, critique="")
    worst = [engine.builder.revision(it.messages, "", step) for it in items]
    lengths = backend.count_tokens(worst)
    budget = backend.context_length - params.max_new_tokens * (3 if not engine.config.skip_critique else 2)
    if budget <= 0:
        raise ConfigError(f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the model's "
                          f"{backend.context_length}-token context (a critique chain holds up to 3 completions); "
                          "lower --max-new-tokens")
    kept, skipped = [], {}
    for i, (item, n) in enumerate(zip(items, lengths, strict=True)):
        if n > budget:
            skipped[i] = Skip("too_long", f"{item.index} ({n} tokens > {budget})")
        else:
            kept.append(item)
    return kept, skipped


def critique_processor(config: RunConfig, backend: LanguageModel | None = None) -> Processor:
    """The batch processor of this stage: too-long prompts set aside, the rest critiqued and revised."""
    constitution = load_stage_constitution(config.constitution, "critique_revision", "critique_examples",
                                           config.critique.few_shot, "--few-shot")
    backend = backend or load_backend(config.policy)
    engine = CritiqueRevisionEngine(backend, constitution, config.critique, seed=config.seed)

    def process(batch: list[PromptItem], on_step: Callable[[str, int], None]) -> list[Output]:
        kept, skipped = split_too_long(batch, backend, engine)
        records = iter(engine.run(kept, on_step=on_step))
        return [skipped[i] if i in skipped else next(records) for i in range(len(batch))]

    return process


def run_critique(config: RunConfig, backend: LanguageModel | None = None) -> StageResult:
    """Generate (or finish generating) the SL-CAI dataset described by ``config``."""
    start = time.perf_counter()
    constitution = load_stage_constitution(config.constitution, "critique_revision", "critique_examples",
                                           config.critique.few_shot, "--few-shot")
    items, report = load_prompts(config.prompts)
    directory = RunLayout.of(config).critique
    identity = {"stage": STAGE, "config": config.fingerprint(SECTIONS), "constitution": constitution.hash,
                **inputs_identity(STAGE, config)}
    info = {"constitution": {"name": constitution.name, "version": constitution.version, "hash": constitution.hash}}
    # The store is opened (and a changed config refused) before the model is loaded: a refusal
    # should cost a second, not a model load.
    with RecordStore(directory, identity, resume=config.resume, overwrite=config.overwrite, info=info,
                     fields=config.fingerprint_fields(SECTIONS)) as store:
        config.to_yaml(directory / STAGE_CONFIG)
        constitution.save(str(directory / STAGE_CONSTITUTION))
        streamed = run_with_backend(store, items, lambda it: it.key, config.critique.batch_size,
                                    critique_processor, config, config.policy, backend, "model_id", STAGE,
                                    "prompts")
        for skip in streamed.skipped:
            report.skip(skip.reason, f"{report.source}:{skip.detail}")
        report.kept = len(items) - len(streamed.skipped)
        store.close(complete=True, prompts=report.as_dict())
    return StageResult(STAGE, store.path, streamed.written, report.kept, time.perf_counter() - start,
                       report.as_dict(), {"resumed_from": streamed.done_before,
                                          "constitution_hash": constitution.hash})


register(Stage(
    name=STAGE, command="critique", run=run_critique, sections=SECTIONS, options=("ray",),
    help="SL-CAI data: initial responses, then rounds of critique and revision, resumable.",
    inputs=("prompts.path",), produces=("critique", "critique_records"),
    report=ReportSpec(store="critique", unit="prompts"), produced=lambda r: f"{r.total} prompts",
))
