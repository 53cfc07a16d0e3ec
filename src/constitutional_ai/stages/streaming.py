"""Streaming a stage's inputs into its record store, a batch at a time, with a progress bar.

Shared by the in-process loop and the Ray runner: what to skip on resume, and how a batch's
outputs are written, are decided here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from constitutional_ai.common.progress import StageProgress
from constitutional_ai.data.store import RecordStore

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
