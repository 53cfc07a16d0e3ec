"""``cai dpo``: TRL DPOTrainer on the AI preference pairs, the alternative to a PM plus RL."""
from __future__ import annotations

from pathlib import Path

from constitutional_ai.config import RunConfig
from constitutional_ai.preference_model.data import mix_sources
from constitutional_ai.stages.runner import StageResult
from constitutional_ai.stages.sft import policy_path
from constitutional_ai.training.common import (
    fresh_checkpoints,
    load_causal_lm,
    metrics_callback,
    peft_config,
    save_trained,
    stage_store,
    train,
    training_arguments,
)
from constitutional_ai.training.dpo import dpo_row

DPO = "dpo"


def run_dpo(config: RunConfig) -> StageResult:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = config.dpo
    directory = Path(config.output_dir) / DPO
    pairs, reports = mix_sources(cfg.data, config.seed, Path(config.output_dir))
    model, tokenizer = load_causal_lm(policy_path(config, cfg.policy))
    dataset = Dataset.from_list([dpo_row(p, tokenizer) for p in pairs])
    checkpoints = directory / "checkpoints"
    fresh_checkpoints(checkpoints, config.overwrite)
    args = training_arguments(cfg, DPOConfig, checkpoints, config.seed, config.progress, beta=cfg.beta)
    store = stage_store(directory, {"stage": DPO, "config": config.fingerprint(("seed", DPO))},
                        resume=config.resume, overwrite=config.overwrite)
    try:
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(cfg, "CAUSAL_LM"), callbacks=[metrics_callback(store)])
        output, seconds = train(trainer, checkpoints, config.resume)
        save_trained(trainer.model_wrapped, tokenizer, directory / "model", cfg.lora is not None, trainer.accelerator)
        summary = {"pairs": len(pairs), "steps": output.global_step, "seconds": round(seconds, 1),
                   "train_loss": output.training_loss, "sources": [r.as_dict() for r in reports]}
        store.close(complete=True, **{k: v for k, v in summary.items() if k != "sources"})
    except BaseException:
        store.close(complete=False)
        raise
    return StageResult(DPO, directory / "model", written=len(pairs), total=len(pairs), seconds=seconds,
                       prompt_report={"sources": summary["sources"]},
                       extra={"model": str(directory / "model"), **{k: v for k, v in summary.items()
                                                                    if k != "sources"}})
