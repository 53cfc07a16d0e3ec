"""The one template every training stage (SFT, PM, PPO/RLOO/GRPO, DPO) runs in: its record store,
fresh or resumed checkpoints, the trainer's run, and the final save.

Each stage only says what differs: how to build its model, data and trainer. The template owns
the order that makes training stages safe to kill and to run under ``accelerate launch``: the
store is opened and stale checkpoints discarded before any process starts work, every logged
step streams to the store, a failure marks the stage incomplete, and only a saved model marks it
complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from constitutional_ai.common.progress import phase_of
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import write_atomic
from constitutional_ai.layout import RunLayout
from constitutional_ai.stages.registry import inputs_identity
from constitutional_ai.training.common import (
    fresh_checkpoints,
    is_main_process,
    last_checkpoint,
    metrics_callback,
    quiet_trainer,
    save_trained,
    stage_store,
)


class TrainingRun:
    """``with TrainingRun(config, "sft", directory) as run: ...; run.fit(trainer); run.save(...)``."""

    def __init__(self, config: RunConfig, stage: str, directory: Path, sections: tuple[str, ...] | None = None,
                 **identity: Any):
        self.config = config
        self.stage = stage
        self.directory = directory
        self.checkpoints = RunLayout.checkpoints(directory)
        self.sections = sections or ("seed", stage)
        self.identity = {"stage": stage, "config": config.fingerprint(self.sections), **inputs_identity(stage, config),
                         **identity}
        self.seconds = 0.0
        self.resumed_from: str | None = None

    def __enter__(self) -> TrainingRun:
        self.store = stage_store(self.directory, self.identity, resume=self.config.resume,
                                 overwrite=self.config.overwrite, fields=self.config.fingerprint_fields(self.sections))
        fresh_checkpoints(self.checkpoints, self.config.overwrite)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.store.close(complete=False)

    def callbacks(self) -> list[Any]:
        """The transformers callbacks that stream each logged step to the store."""
        return [metrics_callback(self.store)]

    def log(self, metrics: dict[str, Any]) -> None:
        """One step's metrics, for trainers of our own (PPO) that do not take callbacks."""
        self.store.write([{"key": f"step-{metrics['step']}", **metrics}])

    def fit(self, trainer: Any) -> Any:
        """``trainer.train()``, from the last checkpoint when resuming; the output, timed."""
        self.resumed_from = last_checkpoint(self.checkpoints, self.config.resume)
        quiet_trainer(trainer, self.stage, self.config.progress)
        start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=self.resumed_from)
        self.seconds = time.perf_counter() - start
        return output

    def save(self, model: Any, tokenizer: Any, model_dir: Path, lora: bool, accelerator: Any = None,
             info_file: str | None = None, info: dict[str, Any] | None = None) -> Any:
        """Save the model (LoRA merged, gathered from shards) and write ``info`` as ``info_file`` beside
        it; returns the whole saved model where this process holds it (see ``save_trained``)."""
        with phase_of("saving the model"):
            final = save_trained(model, tokenizer, model_dir, lora, accelerator)
        if info_file and info is not None and is_main_process():
            write_atomic(model_dir / info_file, json.dumps(info, indent=2, ensure_ascii=False))
        return final

    def complete(self, **fields: Any) -> None:
        """Mark the stage complete; its scalar figures go into the manifest (lists stay in info files)."""
        self.store.close(complete=True, **{k: v for k, v in fields.items() if not isinstance(v, (list, dict))})
