"""What every stage shares: open the record store before the model, then stream batches into it
with a progress bar. A stage only says how to turn one batch of inputs into records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from constitutional_ai.constitution.model import Constitution
from constitutional_ai.data.store import RecordStore
from constitutional_ai.errors import ConfigError
from constitutional_ai.progress import StageProgress

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


def stream_batches(store: RecordStore, items: Sequence[T], key: Callable[[T], str], batch_size: int,
                   process: Callable[[list[T], Callable[[str, int], None]], list[dict[str, Any] | None]],
                   description: str, unit: str, progress: bool) -> tuple[int, int]:
    """Process the items not yet in ``store`` a batch at a time, writing each batch durably.

    ``process(batch, on_step)`` returns one record (or None to skip) per item. Returns
    ``(written, already done before this run)``.
    """
    todo = [it for it in items if key(it) not in store]
    done_before = len(items) - len(todo)
    written = 0
    with StageProgress(description, total=len(items), completed=done_before, enabled=progress, unit=unit) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            records = [r for r in process(batch, bar.step) if r is not None]
            written += store.write(records)
            bar.advance(len(batch))
    return written, done_before
