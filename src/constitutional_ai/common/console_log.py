"""A quiet console: what libraries say goes to the run's log file, not between our progress bars.

transformers, datasets, TRL, accelerate and torch each talk on their own: tqdm bars for dataset
mapping, training and shard writing, Trainer log dicts printed raw, ``UserWarning``s, model load
reports. On a console that is noise that reads like errors and hides our own display; in a log
file it is exactly what a bug report needs. So by default (``--verbose`` off) every library's
logging, its Python warnings, and anything it prints to stdout or stderr are written to
``OUTPUT_DIR/cai.log``; the console keeps our progress display, our own warnings and errors, and
stdout keeps the results. ``--verbose`` shows everything on the console as well.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from constitutional_ai.common.progress import console, results

OURS = "constitutional_ai"
#: Secrets a library may log (a URL's ``user:password@``, a bearer token, an OpenAI-style key):
#: the log file is an artifact people attach to bug reports, so they never reach it.
_SECRETS = (
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.I), r"\1***@"),
    (re.compile(r"(\bbearer\s+)[^\s\"',]+", re.I), r"\1***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "sk-***"),
)


def scrub(text: str) -> str:
    """``text`` with credentials masked (see :data:`_SECRETS`)."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class _Scrubbed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _LogStream:
    """A stand-in for ``sys.stdout``/``sys.stderr`` that writes into the log file, one line per
    line; carriage-return redraws (tqdm) keep only their last state."""

    def __init__(self, file: IO[str], name: str):
        self._file = file
        self._name = name
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1].rstrip()
            if line:
                self._file.write(f"{time.strftime('%H:%M:%S')} {self._name}: {scrub(line)}\n")
        self._file.flush()
        return len(text)

    def flush(self) -> None:
        self._file.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # for libraries that ask (faulthandler, subprocess): the real file
        return self._file.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


class _OnlyOurs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == OURS or record.name.startswith(OURS + ".")


def _library_switches(quiet: bool) -> list[Any]:
    """Turn the libraries' own progress bars and console handlers off (quiet) and route their
    logging to the root logger; returns what restores them."""
    undo: list[Any] = []
    try:
        from transformers.utils import logging as hf_logging

        if quiet:
            hf_logging.disable_progress_bar()
            hf_logging.disable_default_handler()
            undo += [hf_logging.enable_progress_bar, hf_logging.enable_default_handler]
        hf_logging.enable_propagation()
        undo.append(hf_logging.disable_propagation)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if quiet:
        try:
            import datasets

            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
        except ImportError:  # pragma: no cover
            pass
        try:
            from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

            disable_progress_bars()
            undo.append(enable_progress_bars)
        except ImportError:  # pragma: no cover
            pass
    return undo


@contextmanager
def quiet_console(log_file: Path, verbose: bool = False) -> Iterator[Path]:
    """Send library output to ``log_file`` (appended; see the module docstring) while the block
    runs; with ``verbose`` it also stays on the console. Yields the log file's path."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stream = log_file.open("a", encoding="utf-8")
    stream.write(f"\n{time.strftime('%Y-%m-%d %H:%M:%S')} --- a new command starts\n")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Scrubbed("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    ours = logging.getLogger(OURS)
    saved = {"root_level": root.level, "ours_level": ours.level, "stdout": sys.stdout, "stderr": sys.stderr,
             "console_file": console._file, "results_file": results._file}
    console_handlers = list(root.handlers)
    filters = []
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, logging.WARNING))
    ours.setLevel(logging.INFO)
    logging.captureWarnings(True)
    undo = _library_switches(quiet=not verbose)
    if not verbose:
        for existing in console_handlers:  # the console keeps our own warnings only
            f = _OnlyOurs()
            existing.addFilter(f)
            filters.append((existing, f))
        console.file = sys.stderr  # our display keeps the real stderr, our results the real stdout;
        results.file = sys.stdout  # the libraries get the log
        sys.stdout = _LogStream(stream, "stdout")  # type: ignore[assignment]
        sys.stderr = _LogStream(stream, "stderr")  # type: ignore[assignment]
    try:
        yield log_file
    finally:
        sys.stdout, sys.stderr = saved["stdout"], saved["stderr"]
        console._file = saved["console_file"]
        results._file = saved["results_file"]
        for existing, f in filters:
            existing.removeFilter(f)
        for step in reversed(undo):
            step()
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(saved["root_level"])
        ours.setLevel(saved["ours_level"])
        stream.close()
