"""What every stage shares: open the record store before the model, then stream batches into it
with a progress bar. A stage only says how to turn one batch of inputs into records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from constitutional_ai.backends import load_backend
from constitutional_ai.constitution.model import Constitution
from constitutional_ai.data.store import RecordStore
from constitutional_ai.errors import ConfigError
from constitutional_ai.progress import StageProgress

if TYPE_CHECKING:
    from constitutional_ai.backends.base import LanguageModel
    from constitutional_ai.config import ModelConfig, RunConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Skip:
    """An input a stage leaves out (a prompt too long for the context): reported, never written,
    and tried again on resume."""

    reason: str
    detail: str


#: What a stage makes of one input: its record, a reported skip, or None (left out silently).
Output = dict[str, Any] | Skip | None
#: ``process(batch, on_step)``: one output per input, in order.
Processor = Callable[[list[Any], Callable[[str, int], None]], list[Output]]


class Streamed(NamedTuple):
    """What streaming a stage's inputs did."""

    written: int
    done_before: int
    skipped: list[Skip]


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


def pending(store: RecordStore, items: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], int]:
    """The items not yet in ``store`` (resume skips the rest), and how many were done before."""
    todo = [it for it in items if key(it) not in store]
    return todo, len(items) - len(todo)


def write_outputs(store: RecordStore, outputs: Sequence[Output], skipped: list[Skip]) -> int:
    """Write a batch's records durably and collect its skips; returns the records written."""
    skipped += [o for o in outputs if isinstance(o, Skip)]
    return store.write([o for o in outputs if isinstance(o, dict)])


def stream_batches(store: RecordStore, items: Sequence[T], key: Callable[[T], str], batch_size: int,
                   process: Processor, description: str, unit: str, progress: bool) -> Streamed:
    """Process the items not yet in ``store`` a batch at a time, writing each batch durably."""
    todo, done_before = pending(store, items, key)
    written = 0
    skipped: list[Skip] = []
    with StageProgress(description, total=len(items), completed=done_before, enabled=progress, unit=unit) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            written += write_outputs(store, process(batch, bar.step), skipped)
            bar.advance(len(batch))
    return Streamed(written, done_before, skipped)


def run_with_backend(store: RecordStore, items: Sequence[T], key: Callable[[T], str], batch_size: int,
                     processor: Callable[..., Processor], config: RunConfig, model: ModelConfig,
                     backend: LanguageModel | None, manifest_key: str, description: str, unit: str) -> Streamed:
    """Stream a generation stage in this process, or over Ray actors when ``config.ray.workers`` is set.

    ``processor(config, backend=None)`` is a module-level function that builds the batch processor
    (loading ``model`` itself when no backend is given): under Ray each actor calls it once, so the
    driver never loads a model and only writes the store.
    """
    if config.ray.workers:
        from constitutional_ai.ray_runner import stream_batches_ray

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
