"""``cai train-pm`` and ``cai eval-pm``: the preference model, trained and measured.

Training writes ``<output_dir>/pm/``: ``checkpoints/`` (resumable; a killed run continues from
the last one), ``records.jsonl`` (every logged step's metrics, whatever ``report_to`` also gets),
``manifest.json``, and ``model/``, the final PM with ``pm_info.json`` and, when pairs were held
out, ``eval_results.json`` and ``reliability.png`` beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import write_atomic
from constitutional_ai.evaluation.pm import EVAL_RESULTS, evaluate_pm
from constitutional_ai.preference_model.data import mix_sources, split_heldout
from constitutional_ai.preference_model.encoding import PairEncoder
from constitutional_ai.preference_model.reward_model import PM_INFO, RewardModel, load_sequence_classifier
from constitutional_ai.preference_model.training import encode_pairs, pm_training_arguments
from constitutional_ai.stages.runner import StageResult
from constitutional_ai.training.common import (
    fresh_checkpoints,
    is_main_process,
    last_checkpoint,
    metrics_callback,
    peft_config,
    save_trained,
    stage_store,
    train,
)

PM = "pm"


def pm_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / PM


def pm_model_dir(config: RunConfig, explicit: str, flag: str) -> Path:
    """The PM a stage uses: the one named, else this run's trained PM; a one-line error when absent."""
    directory = Path(explicit) if explicit else pm_dir(config) / "model"
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no preference model; run `cai train-pm` first or pass {flag} DIR")
    return directory


def trained_pm(config: RunConfig, explicit: str, flag: str, device: str = "auto") -> RewardModel:
    """:func:`pm_model_dir`, loaded for scoring."""
    return RewardModel.from_pretrained(str(pm_model_dir(config, explicit, flag)), device=device,
                                       batch_size=config.pm.batch_size)


def run_train_pm(config: RunConfig) -> StageResult:
    """Mix the sources, train with the soft-label loss, save the PM and evaluate it on held-out pairs."""
    import torch

    from constitutional_ai.preference_model.trainer import SoftLabelCollator, SoftLabelRewardTrainer

    cfg = config.pm
    directory = pm_dir(config)
    run_dir = Path(config.output_dir)
    train_pairs, reports = mix_sources(cfg.sources, config.seed, run_dir)
    if cfg.eval_sources:
        eval_pairs, eval_reports = mix_sources(cfg.eval_sources, config.seed, run_dir)
    else:
        train_pairs, eval_pairs = split_heldout(train_pairs, cfg.eval_fraction)
        eval_reports = []
    identity = {"stage": PM, "config": config.fingerprint(("seed", PM))}
    store = stage_store(directory, identity, resume=config.resume, overwrite=config.overwrite)
    try:
        model, tokenizer = load_sequence_classifier(cfg.model_name_or_path, cfg.revision, cfg.trust_remote_code)
        encoder = PairEncoder(tokenizer, cfg.max_length)
        train_set, truncated = encode_pairs(train_pairs, encoder)
        checkpoints = directory / "checkpoints"
        fresh_checkpoints(checkpoints, config.overwrite)
        args = pm_training_arguments(cfg, checkpoints, config.seed, config.progress)
        trainer = SoftLabelRewardTrainer(
            model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
            data_collator=SoftLabelCollator(pad_token_id=tokenizer.pad_token_id,
                                            pad_to_multiple_of=cfg.pad_to_multiple_of),
            peft_config=peft_config(cfg, "SEQ_CLS"), callbacks=[metrics_callback(store)])
        last = last_checkpoint(checkpoints, config.resume)
        output, seconds = train(trainer, checkpoints, config.resume)
        model_dir = directory / "model"
        final = save_trained(trainer.model_wrapped, tokenizer, model_dir, cfg.lora is not None, trainer.accelerator)
        steps_run = output.global_step - (int(Path(last).name.split("-")[-1]) if last else 0)
        pairs_per_s = steps_run * args.per_device_train_batch_size * args.gradient_accumulation_steps \
            * trainer.accelerator.num_processes / seconds
        info = {
            "base_model": cfg.model_name_or_path, "max_length": cfg.max_length, "layout": encoder.layout,
            "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "truncated_pairs": truncated,
            "sources": [r.as_dict() for r in reports], "eval_sources": [r.as_dict() for r in eval_reports],
            "constitution_hashes": sorted({h for r in reports for h in r.constitution_hashes}),
            "config_fingerprint": identity["config"], "train_seconds": round(seconds, 1),
            "train_pairs_per_s": round(pairs_per_s, 2), "global_step": output.global_step,
            "resumed_from": last, "train_loss": output.training_loss, "world_size": trainer.accelerator.num_processes,
        }
        if is_main_process():
            write_atomic(model_dir / PM_INFO, json.dumps(info, indent=2, ensure_ascii=False))
        extra: dict[str, Any] = {"model": str(model_dir), **{k: info[k] for k in (
            "train_pairs", "eval_pairs", "truncated_pairs", "train_seconds", "train_pairs_per_s", "global_step")}}
        if eval_pairs and final is None and is_main_process():  # FSDP/ZeRO-3: no whole model in this process
            extra["eval"] = "skipped under sharded training; run `cai eval-pm`"
        elif eval_pairs and final is not None:  # the main process only: one writer of the results
            device = "cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "auto"
            scorer = RewardModel(final.to(trainer.args.device if device == "auto" else "cpu"), tokenizer,
                                 cfg.max_length, cfg.batch_size, str(model_dir))
            summary = evaluate_pm(scorer, eval_pairs, model_dir, n_bins=10, title="held-out pairs")
            extra.update({"eval_accuracy": summary["accuracy"], "eval_ece": summary["ece"]})
        store.close(complete=True, **{k: v for k, v in extra.items() if k != "model"})
    except BaseException:
        store.close(complete=False)
        raise
    return StageResult(PM, directory / "model", written=len(train_pairs), total=len(train_pairs), seconds=seconds,
                       prompt_report={"sources": info["sources"]}, extra=extra)


def run_eval_pm(config: RunConfig) -> StageResult:
    """``cai eval-pm``: a PM (this run's, or ``--pm``) on held-out pairs, results next to the model."""
    model_dir = pm_model_dir(config, config.eval_pm.model, "--pm")
    sources = config.eval_pm.data or config.pm.eval_sources
    if sources:
        pairs, _ = mix_sources(sources, config.seed, Path(config.output_dir))
    else:
        mixed, _ = mix_sources(config.pm.sources, config.seed, Path(config.output_dir))
        pairs = split_heldout(mixed, config.pm.eval_fraction)[1]
    scorer = trained_pm(config, config.eval_pm.model, "--pm", config.pm.device)
    start = time.perf_counter()
    summary = evaluate_pm(scorer, pairs, model_dir, n_bins=config.eval_pm.n_bins)
    seconds = time.perf_counter() - start
    return StageResult("eval_pm", model_dir / EVAL_RESULTS, written=len(pairs), total=len(pairs), seconds=seconds,
                       prompt_report={}, extra={k: summary[k] for k in (
                           "pairs", "accuracy", "mean_margin", "ece", "soft_label_mae", "reliability_diagram")})
