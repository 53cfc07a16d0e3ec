"""What every generation stage shares: open the record store before the model, then stream batches
into it (here or over Ray). A stage only says how to turn one batch of inputs into records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from constitutional_ai.backends import load_backend
from constitutional_ai.common.errors import ConfigError
from constitutional_ai.constitution.model import Constitution
from constitutional_ai.data.store import RecordStore
from constitutional_ai.stages.streaming import Processor, Streamed, stream_batches

if TYPE_CHECKING:
    from constitutional_ai.backends.base import LanguageModel
    from constitutional_ai.config import ModelConfig, RunConfig

T = TypeVar("T")


def load_stage_constitution(spec: str, principles: str, examples: str, few_shot: int, flag: str) -> Constitution:
    """The run's constitution, checked for what a stage needs: at least one principle of the kind
    it samples, and as many worked examples as the run asks to prepend."""
    constitution = Constitution.load(spec)
    if not getattr(constitution, principles):
        raise ConfigError(f"constitution {spec!r} has no {principles} principles; this stage needs at least one")
    available = len(getattr(constitution, examples))
    if few_shot > available:
        raise ConfigError(f"{flag.lstrip('-').replace('-', '_')}={few_shot} but constitution {spec!r} has "
                          f"{available} {examples}; lower {flag}")
    return constitution


@dataclass
class StageResult:
    """What a stage did, for the CLI summary and for callers chaining stages."""

    stage: str
    output: Path
    written: int
    total: int
    seconds: float
    prompt_report: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "output": str(self.output), "written": self.written, "total": self.total,
                "seconds": round(self.seconds, 3), "prompts": self.prompt_report, **self.extra}


def run_with_backend(store: RecordStore, items: Sequence[T], key: Callable[[T], str], batch_size: int,
                     processor: Callable[..., Processor], config: RunConfig, model: ModelConfig,
                     backend: LanguageModel | None, manifest_key: str, description: str, unit: str) -> Streamed:
    """Stream a generation stage in this process, or over Ray actors when ``config.ray.workers`` is set.

    ``processor(config, backend=None)`` is a module-level function that builds the batch processor
    (loading ``model`` itself when no backend is given): under Ray each actor calls it once, so the
    driver never loads a model and only writes the store.
    """
    if config.ray.workers:
        from constitutional_ai.stages.ray_runner import stream_batches_ray

        if backend is not None:
            raise ConfigError("ray.workers > 0 loads a backend in every Ray actor; do not also pass one")
        store.update_manifest(**{manifest_key: model.model_name_or_path, "ray_workers": config.ray.workers})
        return stream_batches_ray(store, items, key, partial(processor, config), config.ray, description, unit,
                                  config.progress)
    owns = backend is None
    backend = backend or load_backend(model)
    try:
        store.update_manifest(**{manifest_key: backend.model_id,
                                 "model_revision": getattr(backend, "revision", None), "prompt_style": backend.style})
        return stream_batches(store, items, key, batch_size, processor(config, backend), description, unit,
                              config.progress)
    finally:
        if owns:
            backend.close()
