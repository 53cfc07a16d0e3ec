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
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


class _TokensColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = max(time.monotonic() - task.fields.get("t0", time.monotonic()), 1e-9)
        tokens = task.fields.get("tokens", 0)
        return Text(f"{tokens / elapsed:,.0f} tok/s", style="progress.data.speed")


class StageProgress:
    """``with StageProgress("critique", total) as bar: bar.advance(n, tokens=t)``."""

    def __init__(self, description: str, total: int, unit: str = "prompts", enabled: bool = True,
                 completed: int = 0):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), TextColumn("{task.fields[status]}", style="dim"),
            BarColumn(), MofNCompleteColumn(),
            TextColumn(unit), _RateColumn(unit), _TokensColumn(), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed,
                                             tokens=0, t0=time.monotonic(), status="")

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
