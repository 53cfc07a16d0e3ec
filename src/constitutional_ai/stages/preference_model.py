"""``cai train-pm``, ``cai eval-pm`` and ``cai serve-pm``: the preference model, trained, measured
and served.

Training writes the ``pm`` record store (every logged step, the manifest, resumable
``checkpoints/``) and ``pm/model``, the final PM with ``pm_info.json`` and, when pairs were held
out, ``eval_results.json`` and its reliability diagram beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import write_atomic
from constitutional_ai.layout import PM_EVAL_NEWEST, PM_EVAL_RESULTS, PM_INFO, RunLayout
from constitutional_ai.preference_model.data import iteration_mix, mix_sources, split_heldout
from constitutional_ai.report.spec import Plot, ReportSpec
from constitutional_ai.stages.feedback import pm_loop
from constitutional_ai.stages.registry import Stage, register
from constitutional_ai.stages.runner import StageResult
from constitutional_ai.stages.training import TrainingRun
from constitutional_ai.training.common import is_main_process, peft_config

if TYPE_CHECKING:
    from constitutional_ai.preference_model.reward_model import RewardModel

PM = "pm"


def pm_model_dir(config: RunConfig, explicit: str, flag: str, final: bool = False) -> Path:
    """The PM a stage uses: the one named, else this run's trained PM (its iteration's, or with
    ``final`` the last one the run trained: what eval, eval-pm and serve-pm mean by "this run's
    PM"); a one-line error when absent."""
    layout = RunLayout.of(config)
    if explicit:
        directory = Path(explicit)
    elif final:
        directory = layout.latest("pm_model").pm_model
    else:
        directory = layout.pm_model
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no preference model; run `cai train-pm` first or pass {flag} DIR")
    return directory


def trained_pm(config: RunConfig, explicit: str, flag: str, device: str = "auto", final: bool = False) -> RewardModel:
    """:func:`pm_model_dir`, loaded for scoring."""
    from constitutional_ai.preference_model.reward_model import RewardModel

    return RewardModel.from_pretrained(str(pm_model_dir(config, explicit, flag, final)), device=device,
                                       batch_size=config.pm.batch_size)


def run_train_pm(config: RunConfig) -> StageResult:
    """Mix the sources, train with the soft-label loss, save the PM and evaluate it on held-out pairs."""
    import torch

    from constitutional_ai.evaluation.pm import evaluate_pm
    from constitutional_ai.preference_model.encoding import PairEncoder
    from constitutional_ai.preference_model.reward_model import RewardModel, load_sequence_classifier
    from constitutional_ai.preference_model.trainer import SoftLabelCollator, SoftLabelRewardTrainer
    from constitutional_ai.preference_model.training import encode_pairs, pm_training_arguments

    cfg = config.pm
    layout = RunLayout.of(config)
    mix = iteration_mix(cfg.sources, cfg.eval_sources, cfg.eval_fraction, config.seed, layout.root,
                        config.iteration, cfg.new_data_weight)
    train_pairs, eval_pairs, reports, eval_reports = mix.train, mix.heldout, mix.reports, mix.eval_reports
    with TrainingRun(config, PM, layout.pm) as run:
        model, tokenizer = load_sequence_classifier(layout.resolve_model(cfg.model_name_or_path), cfg.revision,
                                                    cfg.trust_remote_code)
        encoder = PairEncoder(tokenizer, cfg.max_length)
        train_set, truncated = encode_pairs(train_pairs, encoder)
        args = pm_training_arguments(cfg, run.checkpoints, config.seed, config.progress)
        trainer = SoftLabelRewardTrainer(
            model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
            data_collator=SoftLabelCollator(pad_token_id=tokenizer.pad_token_id,
                                            pad_to_multiple_of=cfg.pad_to_multiple_of),
            peft_config=peft_config(cfg, "SEQ_CLS"), callbacks=run.callbacks(), padding_free=cfg.padding_free)
        output = run.fit(trainer)
        last = run.resumed_from
        steps_run = output.global_step - (int(Path(last).name.split("-")[-1]) if last else 0)
        pairs_per_s = steps_run * args.per_device_train_batch_size * args.gradient_accumulation_steps \
            * trainer.accelerator.num_processes / run.seconds
        info = {
            "base_model": cfg.model_name_or_path, "max_length": cfg.max_length, "layout": encoder.layout,
            "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "truncated_pairs": truncated,
            "sources": [r.as_dict() for r in reports], "eval_sources": [r.as_dict() for r in eval_reports],
            "constitution_hashes": sorted({h for r in reports for h in r.constitution_hashes}),
            "config_fingerprint": run.identity["config"], "train_seconds": round(run.seconds, 1),
            "train_pairs_per_s": round(pairs_per_s, 2), "global_step": output.global_step,
            "resumed_from": last, "train_loss": output.training_loss, "world_size": trainer.accelerator.num_processes,
            "padding_free": trainer.padding_free_used,
            "pooled_only_last_layer": trainer.pooled_only_used,
        }
        final = run.save(trainer.model_wrapped, tokenizer, layout.pm_model, cfg.lora is not None,
                         trainer.accelerator, PM_INFO, info)
        extra: dict[str, Any] = {"model": str(layout.pm_model), **{k: info[k] for k in (
            "train_pairs", "eval_pairs", "truncated_pairs", "train_seconds", "train_pairs_per_s", "global_step")}}
        if eval_pairs and final is None and is_main_process():  # FSDP/ZeRO-3: no whole model in this process
            extra["eval"] = "skipped under sharded training; run `cai eval-pm`"
        elif eval_pairs and final is not None:  # the main process only: one writer of the results
            device = "cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "auto"
            scorer = RewardModel(final.to(trainer.args.device if device == "auto" else "cpu"), tokenizer,
                                 cfg.max_length, cfg.batch_size, str(layout.pm_model))
            summary = evaluate_pm(scorer, eval_pairs, layout.pm_model, n_bins=10, title="held-out pairs")
            extra.update({"eval_accuracy": summary["accuracy"], "eval_ece": summary["ece"]})
            if config.iteration > 1 and mix.newest:
                extra.update(evaluate_newest(config, scorer, mix.newest, layout))
        run.complete(**{k: v for k, v in extra.items() if k != "model"})
    return StageResult(PM, layout.pm_model, written=len(train_pairs), total=len(train_pairs), seconds=run.seconds,
                       prompt_report={"sources": info["sources"]}, extra=extra)


def evaluate_newest(config: RunConfig, scorer: RewardModel, pairs: list[Any], layout: RunLayout) -> dict[str, Any]:
    """Iteration k's PM, and the PM it started from, on the newest policy's pairs (held-out
    prompts): how stale the previous PM had grown, and how much continuing on new data won back."""
    from constitutional_ai.evaluation.pm import evaluate_pm
    from constitutional_ai.preference_model.reward_model import RewardModel

    summary = evaluate_pm(scorer, pairs, layout.pm_model, n_bins=10, title="the newest policy's pairs",
                          name=PM_EVAL_NEWEST)
    previous = layout.at(config.iteration - 1).pm_model
    if previous.is_dir():
        old = RewardModel.from_pretrained(str(previous), device=str(scorer.device),
                                          batch_size=config.pm.batch_size)
        margins = [w - lo for w, lo in zip(old.score_responses([p.prompt for p in pairs], [p.chosen for p in pairs]),
                                           old.score_responses([p.prompt for p in pairs], [p.rejected for p in pairs]),
                                           strict=True)]
        summary["previous_pm"] = {"model": str(previous), "pairs": len(margins),
                                  "accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
                                  / len(margins)}
        write_atomic(layout.pm_eval_newest, json.dumps(summary, indent=2))
    return {"newest_accuracy": summary["accuracy"], "newest_pairs": summary["pairs"],
            **({"previous_pm_newest_accuracy": summary["previous_pm"]["accuracy"]} if "previous_pm" in summary else {})}


def previous_pm(config: RunConfig, layout: RunLayout) -> RunConfig:
    """From iteration 2 the PM continues from the one the iteration before trained (``run:pm@K-1``,
    on the accumulated mix, see ``iteration_mix``) instead of starting again from its base model.
    In iteration 1 ``pm.new_data_weight`` is unused, so it is left out of that PM's identity."""
    if config.iteration == 1:
        default = type(config.pm).model_fields["new_data_weight"].default
        return config.model_copy(update={"pm": config.pm.model_copy(update={"new_data_weight": default})})
    previous = f"run:pm@{config.iteration - 1}"  # with its iteration: a bare run:pm would be this one's
    return config.model_copy(update={"pm": config.pm.model_copy(update={"model_name_or_path": previous})})


def run_eval_pm(config: RunConfig) -> StageResult:
    """``cai eval-pm``: a PM (this run's, or ``--pm``) on held-out pairs, results next to the model."""
    from constitutional_ai.evaluation.pm import evaluate_pm

    model_dir = pm_model_dir(config, config.eval_pm.model, "--pm", final=True)
    sources = config.eval_pm.data or config.pm.eval_sources
    run_dir = Path(config.output_dir)
    if sources:
        pairs, _ = mix_sources(sources, config.seed, run_dir)
    else:
        mixed, _ = mix_sources(config.pm.sources, config.seed, run_dir)
        pairs = split_heldout(mixed, config.pm.eval_fraction)[1]
    scorer = trained_pm(config, config.eval_pm.model, "--pm", config.pm.device, final=True)
    start = time.perf_counter()
    summary = evaluate_pm(scorer, pairs, model_dir, n_bins=config.eval_pm.n_bins)
    seconds = time.perf_counter() - start
    return StageResult("eval_pm", model_dir / PM_EVAL_RESULTS, written=len(pairs), total=len(pairs),
                       seconds=seconds, prompt_report={}, extra={k: summary[k] for k in (
                           "pairs", "accuracy", "mean_margin", "ece", "soft_label_mae", "reliability_diagram")})


def serve_pm(config: RunConfig) -> None:
    """Serve until interrupted; the endpoint is printed for OpenRLHF's ``--remote_rm_url``."""
    from constitutional_ai.common.progress import console
    from constitutional_ai.preference_model.server import RewardServer, bearer_token

    bearer_token(config.serve_pm)  # a refusal costs nothing: checked before the PM loads
    scorer = trained_pm(config, config.serve_pm.model, "--pm", config.pm.device, final=True)
    server = RewardServer(scorer, config.serve_pm)
    console.print(f"serving {scorer.name} at {server.url} (OpenRLHF: --remote_rm_url {server.url})", highlight=False)
    server.serve_forever()


register(Stage(
    name=PM, command="train-pm", run=run_train_pm, sections=("seed", "pm"),
    help="Train a preference model (Bradley-Terry, soft labels) on mixed preference sources.",
    inputs=("pm.sources", "pm.eval_sources"), consumes=("preferences",),
    produces=("pm", "pm_model"), summary=lambda result: result.extra,
    iterated=True, from_previous=("pm_model",), wire=previous_pm, when=pm_loop,
    produced=lambda r: f"{r.extra['global_step']} steps on {r.written} pairs",
    report=ReportSpec(store="pm", unit="log entries", plots=(
        Plot("pm_plot", "Preference model calibration on held-out pairs"),)),
))
register(Stage(
    name="eval_pm", command="eval-pm", run=run_eval_pm, sections=("seed", "eval_pm"), options=("pm",),
    pipeline=False, consumes=("pm_model",),
    help="Measure a preference model on held-out pairs: accuracy, margin, calibration (JSON + PNG).",
    summary=lambda result: {"output": str(result.output), **result.extra},
))
register(Stage(
    name="serve_pm", command="serve-pm", run=serve_pm, sections=("serve_pm",), options=("pm",), pipeline=False,
    consumes=("pm_model",),
    help="Serve a preference model over HTTP for OpenRLHF's --remote_rm_url (POST /get_reward).",
))
