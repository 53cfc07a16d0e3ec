"""What the benchmarks share: the same tiny model, the same quiet, seeded, thread-pinned set-up.

Imported before torch by each benchmark, so that OpenMP's wait policy (passive, as the CLI sets
it) is in place before torch starts its thread pool.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Model size and thread flags every benchmark takes (defaults: 5.25M parameters, 2 threads)."""
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is 2 cores)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)


def setup(args: argparse.Namespace, name: str) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Quiet logs, pin threads, seed, and build the tiny random-weight model in a temporary folder."""
    import torch
    from transformers.utils import logging as hf_logging

    from constitutional_ai.models.tiny import build_tiny_causal_lm

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-{name}-")
    model_dir = build_tiny_causal_lm(Path(tmp.name) / "model", vocab_size=args.vocab_size,
                                     hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads)
    return tmp, model_dir


def time_interleaved(systems: list[Any], repeats: int, measure: Callable[[Any], tuple[float, dict[str, Any]]],
                     ) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]], dict[str, float]]:
    """Time every system ``repeats`` times, taking turns so that a noisy spell on a shared machine
    does not hit a single system; returns all times, the last work counts, and each best time."""
    times: dict[str, list[float]] = {s.name: [] for s in systems}
    counts: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for system in systems:
            seconds, count = measure(system)
            times[system.name].append(seconds)
            counts[system.name] = count
    return times, counts, {name: min(ts) for name, ts in times.items()}
