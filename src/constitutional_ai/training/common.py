"""What every training stage shares: our config turned into TRL/transformers arguments, LoRA,
and a callback that streams every logged step to the stage's record store.

Under ``accelerate launch`` (see docs/distributed-training.md) every process runs the whole stage;
only the main process (global rank 0) writes records, manifests and models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import TrainingConfig
from constitutional_ai.data.store import RecordStore

#: Where launchers put a process's global rank (torchrun and ``accelerate launch``, then MPI), as accelerate reads it.
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")


def is_main_process() -> bool:
    """Whether this process writes the stage's files: global rank 0 under a distributed launcher, or
    the only process. Read from the launcher's environment, so it holds before any Accelerator exists."""
    rank = next((os.environ[name] for name in _RANK_VARIABLES if os.environ.get(name)), "0")
    return int(rank) == 0


def sharded_launch() -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when ``accelerate launch`` shards the weights themselves
    (from the environment it sets), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


class _NoStore:
    """A non-main process's stand-in for a stage's record store: rank 0 records the run, so the
    log has each step once (and the store's one-writer lock is not fought over)."""

    def write(self, records: Any) -> int:
        return 0

    def update_manifest(self, **fields: Any) -> None:
        pass

    def close(self, complete: bool = False, **fields: Any) -> None:
        pass


def stage_store(directory: str | Path, identity: dict[str, Any], **kwargs: Any) -> RecordStore:
    """A training stage's :class:`RecordStore`, opened by the main process only (see :class:`_NoStore`)."""
    return RecordStore(directory, identity, **kwargs) if is_main_process() else _NoStore()  # type: ignore[return-value]


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
    if sharded_launch():  # fail now, not after training: merging needs every weight in one process
        raise ConfigError(f"LoRA under {sharded_launch()}: the adapters are merged into a plain checkpoint at the "
                          "end, which needs unsharded weights; launch LoRA runs with configs/accelerate/ddp.yaml or "
                          "zero2.yaml (LoRA keeps the optimizer state small anyway)")
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


def progress_callback(description: str, enabled: bool) -> Any:
    """A ``TrainerCallback`` that drives our progress bar (steps, steps/s, ETA, the latest loss) in
    place of transformers' tqdm bar and its raw printed log dicts."""
    from transformers import TrainerCallback

    from constitutional_ai.common.progress import StageProgress

    class RichProgress(TrainerCallback):
        bar: StageProgress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.bar = StageProgress(description, total=state.max_steps, unit="steps", enabled=enabled,
                                         completed=state.global_step).__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            loss = (logs or {}).get("loss")
            if self.bar is not None and isinstance(loss, (int, float)):
                self.bar.update(state.global_step, status=f"loss {loss:.3f}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.__exit__(None, None, None)
                self.bar = None

    return RichProgress()


def quiet_trainer(trainer: Any, description: str, enabled: bool) -> Any:
    """Swap transformers' console callbacks (its tqdm bar, or the raw dict printer it uses when
    tqdm is off) for :func:`progress_callback`; the logs still reach the record store."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress_callback(description, enabled))
    return trainer


def fresh_checkpoints(directory: Path, overwrite: bool) -> None:
    """``--overwrite`` discards a stage's old checkpoints too: resuming another config's would be wrong.

    The main process deletes them. Every stage calls this before its first collective operation
    (the process group's start-up, or wrapping the model), which the other processes cannot pass
    until the main process gets there: none of them looks for a checkpoint before they are gone."""
    if overwrite and directory.is_dir() and is_main_process():
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


def save_trained(model: Any, tokenizer: Any, directory: Path, lora: bool, accelerator: Any = None) -> Any:
    """Save a trained model as a plain ``from_pretrained`` checkpoint (LoRA adapters merged in).

    Under ``accelerate launch`` every process calls this with the wrapped model and its
    ``accelerator``: FSDP and ZeRO-3 keep the weights in shards, and gathering them is collective.
    Only the main process writes. Returns the saved model where this process holds it whole (the
    main process, weights not sharded), else None.
    """
    state_dict = None
    if accelerator is not None:
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and
                                            accelerator.state.deepspeed_plugin.zero_stage == 3):
            state_dict = accelerator.get_state_dict(model)  # the whole model, gathered on the main process
        model = accelerator.unwrap_model(model)
    final = None
    if is_main_process():
        final = model.merge_and_unload() if lora else model
        final.save_pretrained(str(directory), safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(str(directory))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the model is on disk before any process goes on
    return final if state_dict is None else None
