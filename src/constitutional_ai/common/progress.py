"""Progress for long work: one live display per command (rich), every phase in it.

A stage's bar shows items done, items/s, generated tokens/s and ETA. Under ``cai run`` every bar
joins one :class:`RunDisplay`: a header line (stage k of n, the stage's current phase, total
elapsed) over the bar of whatever runs now (building the demo model, sampling, a training loop,
saving), so a run never goes quiet for minutes. Outside a run a bar is its own display.

The display is built on stderr and never redirects stdout or stderr itself: the quiet console
(``common/console_log.py``) decides where library output goes, and stdout stays for results.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

console = Console(stderr=True)
#: Results (the end-of-run summary) go to stdout, where a script or a pipe expects them.
results = Console(highlight=False)

_ACTIVE: RunDisplay | None = None


def _average_rate(task: Task) -> float | None:
    """Items per second since this bar started. Items arrive a whole batch at a time, too rarely
    for rich's sampled speed, so rate and ETA come from the bar's average."""
    elapsed = time.monotonic() - task.fields.get("t0", time.monotonic())
    done = task.completed - task.fields.get("start", 0)
    return done / elapsed if elapsed > 0 and done > 0 else None


def clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")


class _RateColumn(ProgressColumn):
    """``1.33 prompts/s 1,274 tok/s``; nothing for the run's header line."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        if not unit:
            return Text("")
        rate = _average_rate(task)
        text = f"{rate:.2f} {unit}/s" if rate else f"- {unit}/s"
        tokens = task.fields.get("tokens", 0)
        if tokens:
            elapsed = max(time.monotonic() - task.fields.get("t0", time.monotonic()), 1e-9)
            text += f" {tokens / elapsed:,.0f} tok/s"
        return Text(text, style="progress.data.speed")


class _TimeColumn(ProgressColumn):
    """Elapsed time, and the ETA at the bar's average rate (the header has no ETA: stages differ)."""

    def render(self, task: Task) -> Text:
        elapsed = time.monotonic() - task.fields.get("t0", time.monotonic())
        if not task.fields.get("unit"):
            return Text(f"{clock(elapsed)} elapsed", style="progress.elapsed")
        rate = _average_rate(task)
        eta = f"ETA {clock((task.total - task.completed) / rate)}" if rate and task.total is not None else "ETA -:--"
        return Text(f"{clock(elapsed)} {eta}", style="progress.remaining")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}[/] [dim]{task.fields[status]}"), BarColumn(bar_width=12),
        _CountColumn(), _RateColumn(), _TimeColumn(),
        console=console, disable=not enabled, transient=False, redirect_stdout=False, redirect_stderr=False,
    )


class RunDisplay:
    """The one live display of a ``cai run``: ``with RunDisplay(n, enabled) as d: d.stage(k, name)``."""

    def __init__(self, n_stages: int, enabled: bool = True):
        self.enabled = enabled
        self.progress = _progress(enabled)
        self._header = self.progress.add_task("cai run", total=n_stages, status="", t0=time.monotonic(), unit=None)
        self._stage = ""

    def stage(self, done: int, name: str) -> None:
        """Stage ``done + 1`` of n, called ``name``, starts."""
        self._stage = name
        self.progress.update(self._header, completed=done)
        self.phase("")

    def phase(self, text: str) -> None:
        """What the current stage is doing between bars (loading a model, saving one)."""
        header = self.progress.tasks[0]
        status = f"stage {int(header.completed) + 1}/{int(header.total or 0)}: {self._stage}"
        self.progress.update(self._header, status=f"{status} - {text}" if text else status)

    def finish(self, done: int) -> None:
        self.progress.update(self._header, completed=done, status="done")

    def print(self, text: str) -> None:
        """A line above the live display (a stage finished, a stage skipped)."""
        self.progress.console.print(text, highlight=False)

    def __enter__(self) -> RunDisplay:
        global _ACTIVE
        self.progress.start()
        _ACTIVE = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        _ACTIVE = None
        self.progress.stop()


def phase(text: str) -> None:
    """Say what the current stage is doing, on the run's header line (nothing outside ``cai run``)."""
    if _ACTIVE is not None:
        _ACTIVE.phase(text)


@contextmanager
def phase_of(text: str) -> Iterator[None]:
    """``with phase_of("saving model"): ...``: the header says it while it lasts."""
    phase(text)
    try:
        yield
    finally:
        phase("")


class StageProgress:
    """``with StageProgress("critique", total) as bar: bar.advance(n, tokens=t)``.

    Inside a :class:`RunDisplay` the bar is a line of that display (removed when done); alone it
    is a display of its own.
    """

    def __init__(self, description: str, total: int | None, unit: str = "prompts", enabled: bool = True,
                 completed: int = 0):
        self._shared = _ACTIVE if _ACTIVE is not None and _ACTIVE.enabled and enabled else None
        self._progress = self._shared.progress if self._shared is not None else _progress(enabled)
        self._task: TaskID = self._progress.add_task(description, total=total, completed=completed, tokens=0,
                                                     t0=time.monotonic(), status="", start=completed, unit=unit)

    def _fields(self) -> dict[str, Any]:
        return next(t for t in self._progress.tasks if t.id == self._task).fields

    def advance(self, n: int, tokens: int = 0) -> None:
        self._progress.update(self._task, advance=n, tokens=self._fields()["tokens"] + tokens)

    def update(self, completed: int, status: str | None = None) -> None:
        """Set the count outright (a training loop knows its global step)."""
        self._progress.update(self._task, completed=completed, **({"status": status} if status is not None else {}))

    def step(self, status: str, tokens: int) -> None:
        """Count tokens and show the current step before a whole batch of items completes."""
        self._progress.update(self._task, tokens=self._fields()["tokens"] + tokens, status=status)

    def __enter__(self) -> StageProgress:
        if self._shared is None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._shared is None:
            self._progress.stop()
        else:
            self._progress.remove_task(self._task)
