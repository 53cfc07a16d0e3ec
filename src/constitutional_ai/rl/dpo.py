"""``cai dpo``: the route the Hugging Face CAI recipe took, TRL's ``DPOTrainer`` on the AI
preference pairs, with no reward model and no sampling during training.

DPO takes hard preferences: each pair's ``chosen`` is the labeler's winner; the soft label is not
used (pairs near 0.5 are as close to noise as DPO can see, which is why PPO on a PM trained with
the soft labels keeps that information). The trained policy is ``<output_dir>/dpo/model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from constitutional_ai.chat_format import render_raw
from constitutional_ai.config import RunConfig
from constitutional_ai.preference_model.data import PreferencePair, mix_sources
from constitutional_ai.rl.sft import policy_path
from constitutional_ai.stage_runner import StageResult
from constitutional_ai.training import (
    fresh_checkpoints,
    load_causal_lm,
    metrics_callback,
    peft_config,
    save_trained,
    stage_store,
    train,
    training_arguments,
)

DPO = "dpo"


def dpo_row(pair: PreferencePair, tokenizer: Any) -> dict[str, Any]:
    """TRL's preference format: conversational for chat models, the paper's raw text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return {"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}]}
    eos = tokenizer.eos_token or ""
    return {"prompt": render_raw(pair.prompt, add_generation_prompt=True), "chosen": f" {pair.chosen}{eos}",
            "rejected": f" {pair.rejected}{eos}"}


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
