"""What every training stage shares: our config turned into TRL/transformers arguments, LoRA,
and a callback that streams every logged step to the stage's record store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from constitutional_ai.config import TrainingConfig
from constitutional_ai.data.store import RecordStore


def training_arguments(cfg: TrainingConfig, args_cls: Any, output: Path, seed: int, progress: bool,
                       **extra: Any) -> Any:
    """A TRL config (``RewardConfig``, ``SFTConfig``, ``DPOConfig``, ``GRPOConfig``...) from ours: the
    one place where our names meet transformers' names."""
    names = args_cls.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs = dict(
        output_dir=str(output), seed=seed, learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, bf16=cfg.bf16,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to=cfg.report_to or "none", use_cpu=cfg.device == "cpu",
        disable_tqdm=not progress, dataloader_num_workers=0, eval_strategy="no",
        **{checkpointing: cfg.gradient_checkpointing})
    if "max_length" in names:
        kwargs["max_length"] = cfg.max_length
    kwargs.update(extra)
    return args_cls(**kwargs)


def peft_config(cfg: TrainingConfig, task_type: str) -> Any:
    """``peft.LoraConfig`` when the stage trains adapters, else None."""
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha,
                      lora_dropout=cfg.lora.lora_dropout, target_modules=cfg.lora.target_modules)


def metrics_callback(store: RecordStore) -> Any:
    """A ``TrainerCallback`` writing each log entry to ``store`` keyed by step: a resumed run neither
    loses nor duplicates a line, whatever ``report_to`` also receives."""
    from transformers import TrainerCallback

    class MetricsToStore(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and state.is_world_process_zero:
                kind = "eval" if any(k.startswith("eval_") for k in logs) else \
                    "summary" if "train_runtime" in logs else "train"
                store.write([{"key": f"{kind}-{state.global_step}", "step": state.global_step,
                              "epoch": state.epoch, **logs}])

    return MetricsToStore()


def fresh_checkpoints(directory: Path, overwrite: bool) -> None:
    """``--overwrite`` discards a stage's old checkpoints too: resuming another config's would be wrong."""
    if overwrite and directory.is_dir():
        import shutil

        shutil.rmtree(directory)


def last_checkpoint(directory: Path, resume: bool) -> str | None:
    """The newest ``checkpoint-N`` a Trainer left in ``directory`` (when resuming), else None."""
    if not resume or not directory.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(directory))


def load_causal_lm(path: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a policy to train, safetensors only, with a padding token set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True), tokenizer


def train(trainer: Any, checkpoints: Path, resume: bool) -> tuple[Any, float]:
    """``trainer.train()``, continuing from the last checkpoint when resuming; ``(output, seconds)``."""
    import time

    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints, resume))
    return output, time.perf_counter() - start


def save_trained(model: Any, tokenizer: Any, directory: Path, lora: bool) -> Any:
    """Save a trained model as a plain ``from_pretrained`` checkpoint (LoRA adapters merged in)."""
    final = model.merge_and_unload() if lora else model
    final.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return final
