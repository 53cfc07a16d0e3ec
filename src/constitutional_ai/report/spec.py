"""What a stage asks the report to show: declared by stages, read by the report, so the report needs
no knowledge of the stages themselves (and never imports them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plot:
    """A figure the report embeds when the run has made it."""

    entry: str  # a RunLayout entry
    caption: str


@dataclass(frozen=True)
class ReportSpec:
    """What the report shows for a stage: the record store whose manifest gives status and count,
    what one record is (``prompts``, ``pairs``, ``steps``), and its figures."""

    store: str  # RunLayout entry of the stage's record store directory
    unit: str = "records"
    plots: tuple[Plot, ...] = ()
