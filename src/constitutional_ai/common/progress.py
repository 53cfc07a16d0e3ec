"""Progress bars for long stages: items done, items/s, generated tokens/s and ETA (rich)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
)
from rich.text import Text

console = Console(stderr=True)


def _average_rate(task: Task) -> float | None:
    """Items per second since this run started. Items arrive a whole batch at a time, too rarely
    for rich's sampled speed, so rate and ETA come from the run's average."""
    elapsed = time.monotonic() - task.fields.get("t0", time.monotonic())
    done = task.completed - task.fields.get("start", 0)
    return done / elapsed if elapsed > 0 and done > 0 else None


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        rate = _average_rate(task)
        return Text(f"{rate:.2f} {self.unit}/s" if rate else f"- {self.unit}/s", style="progress.data.speed")


class _TokensColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = max(time.monotonic() - task.fields.get("t0", time.monotonic()), 1e-9)
        tokens = task.fields.get("tokens", 0)
        return Text(f"{tokens / elapsed:,.0f} tok/s" if tokens else "", style="progress.data.speed")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _TimeColumn(ProgressColumn):
    """Elapsed time and the ETA at the run's average rate."""

    def render(self, task: Task) -> Text:
        elapsed = time.monotonic() - task.fields.get("t0", time.monotonic())
        rate = _average_rate(task)
        eta = f"ETA {_clock((task.total - task.completed) / rate)}" if rate and task.total is not None else "ETA -:--"
        return Text(f"{_clock(elapsed)} {eta}", style="progress.remaining")


class StageProgress:
    """``with StageProgress("critique", total) as bar: bar.advance(n, tokens=t)``."""

    def __init__(self, description: str, total: int, unit: str = "prompts", enabled: bool = True,
                 completed: int = 0):
        self._progress = Progress(
            TextColumn("[bold]{task.description}[/] [dim]{task.fields[status]}"), BarColumn(bar_width=8),
            MofNCompleteColumn(), _RateColumn(unit), _TokensColumn(), _TimeColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed,
                                             tokens=0, t0=time.monotonic(), status="",
                                             start=completed)

    def advance(self, n: int, tokens: int = 0) -> None:
        task = self._progress.tasks[0]
        self._progress.update(self._task, advance=n, tokens=task.fields["tokens"] + tokens)

    def step(self, status: str, tokens: int) -> None:
        """Count tokens and show the current step before a whole batch of items completes."""
        task = self._progress.tasks[0]
        self._progress.update(self._task, tokens=task.fields["tokens"] + tokens, status=status)

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()
