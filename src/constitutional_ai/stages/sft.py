"""``cai sft``: SL-CAI fine-tuning on the exported revisions (TRL SFTTrainer); the model is the RL policy."""
from __future__ import annotations

import json
from pathlib import Path

from constitutional_ai.common.errors import DataError
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import read_records, write_atomic
from constitutional_ai.models import model_path
from constitutional_ai.stages.runner import StageResult
from constitutional_ai.training.common import (
    fresh_checkpoints,
    is_main_process,
    load_causal_lm,
    metrics_callback,
    peft_config,
    save_trained,
    stage_store,
    train,
    training_arguments,
)
from constitutional_ai.training.sft import prompt_completion

SFT = "sft"


def sft_model_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / SFT / "model"


def policy_path(config: RunConfig, explicit: str) -> str:
    """The policy an RL stage starts from: the one named, else this run's SFT model, else the
    configured policy model (the initial helpful model)."""
    if explicit:
        return model_path(explicit)
    if sft_model_dir(config).is_dir():
        return str(sft_model_dir(config))
    return model_path(config.policy.model_name_or_path)


def _conversations(config: RunConfig) -> list[list[dict[str, str]]]:
    out = []
    for spec in config.sft.data:
        path = Path(config.output_dir) / SFT / "train.jsonl" if spec == "run:sft" else Path(spec)
        if not path.is_file():
            raise DataError(f"{path}: no SFT data; run `cai critique` and `cai export-sft` first, or pass "
                            "--sft-data FILE.jsonl (TRL messages format)")
        for n, row in enumerate(read_records(path), 1):
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{path}:{n}: expected {{\"messages\": [...]}} ending with an assistant turn")
            out.append(messages)
    return out


def run_sft(config: RunConfig) -> StageResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = config.sft
    directory = Path(config.output_dir) / SFT / "trainer"
    conversations = _conversations(config)
    store = stage_store(directory, {"stage": SFT, "config": config.fingerprint(("seed", SFT))},
                        resume=config.resume, overwrite=config.overwrite)
    try:
        model, tokenizer = load_causal_lm(model_path(cfg.model_name_or_path))
        dataset = Dataset.from_list([prompt_completion(m, tokenizer) for m in conversations])
        checkpoints = directory / "checkpoints"
        fresh_checkpoints(checkpoints, config.overwrite)
        args = training_arguments(cfg, SFTConfig, checkpoints, config.seed, config.progress,
                                  completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(cfg, "CAUSAL_LM"), callbacks=[metrics_callback(store)])
        output, seconds = train(trainer, checkpoints, config.resume)
        out = sft_model_dir(config)
        save_trained(trainer.model_wrapped, tokenizer, out, cfg.lora is not None, trainer.accelerator)
        info = {"base_model": cfg.model_name_or_path, "examples": len(conversations),
                "train_seconds": round(seconds, 1), "global_step": output.global_step,
                "train_loss": output.training_loss, "world_size": trainer.accelerator.num_processes}
        if is_main_process():
            write_atomic(out / "sft_info.json", json.dumps(info, indent=2))
        store.close(complete=True, **info)
    except BaseException:
        store.close(complete=False)
        raise
    return StageResult(SFT, out, written=len(conversations), total=len(conversations), seconds=seconds,
                       prompt_report={}, extra={"model": str(out), **info})
