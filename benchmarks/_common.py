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


#: The model shapes a benchmark can run at. ``qwen0.5b`` is Qwen2.5-0.5B's layer (hidden 896, 14
#: query heads sharing 2 key-value heads, intermediate 4864) and a 32k vocabulary, with as few layers
#: as keep a benchmark to minutes on 2 cores: per-token costs (matrix products, the LM head, attention
#: over long prompts, grouped-query KV) are those of a real small model, so ratios carry over. ``tiny``
#: is the 5.25M-parameter model earlier figures were measured at.
SHAPES: dict[str, dict[str, int]] = {
    "qwen0.5b": {"vocab_size": 32768, "hidden_size": 896, "heads": 14, "kv_heads": 2, "intermediate_size": 4864},
    "tiny": {"vocab_size": 4096, "hidden_size": 256, "heads": 4, "kv_heads": 4, "intermediate_size": 1024,
             "layers": 4},
}


def add_model_args(ap: argparse.ArgumentParser, layers: int = 2) -> None:
    """Model shape and thread flags every benchmark takes. ``--shape`` picks the layer shape;
    ``layers`` is this benchmark's depth at the realistic shape (the tiny shape keeps its 4)."""
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is 2 cores)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b",
                    help="qwen0.5b: Qwen2.5-0.5B's layer shape (default); tiny: the 5.25M model")
    ap.add_argument("--layers", type=int, default=None, help=f"decoder layers (default: {layers} at qwen0.5b)")
    ap.set_defaults(default_layers=layers)


def shape_of(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's model shape, as the JSON line reports it."""
    shape = dict(SHAPES[args.shape])
    shape["layers"] = args.layers or shape.get("layers") or args.default_layers
    return {"name": args.shape, **shape}


def setup(args: argparse.Namespace, name: str) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Quiet logs, pin threads, seed, and build the random-weight model of ``--shape`` in a
    temporary folder."""
    import torch
    from transformers.utils import logging as hf_logging

    from constitutional_ai.models.tiny import build_tiny_causal_lm

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = shape_of(args)
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-{name}-")
    model_dir = build_tiny_causal_lm(Path(tmp.name) / "model", vocab_size=shape["vocab_size"],
                                     hidden_size=shape["hidden_size"], num_layers=shape["layers"],
                                     num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                                     intermediate_size=shape["intermediate_size"],
                                     model_vocab_size=shape["vocab_size"])
    return tmp, model_dir


def matmul_peak(dtype: Any = None, seconds: float = 1.5, n: int = 1024) -> float:
    """This machine's dense matrix-product rate (FLOP/s) at ``dtype`` with the current thread count,
    measured now: the best of repeated ``n x n`` products. The limit every system's achieved rate
    is a fraction of, taken in the same run so that a busy spell moves both."""
    import time

    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm the kernels and the thread pool
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - start))
    return best


def count_flops(run: Callable[[], Any]) -> tuple[int, Any]:
    """``(FLOPs, result)`` of one untimed call of ``run``, counted by torch's ``FlopCounterMode``
    (every matrix product and attention kernel the call actually ran, padding included). Timed runs
    never count: the counter's dispatch overhead would slow them."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        result = run()
    return int(counter.get_total_flops()), result


def _register_cpu_attention_flops() -> None:
    """torch 2.13 has no FLOP formula for the CPU flash-attention kernel sdpa runs on CPU (it would
    count 0): give it the standard one, once (registering twice raises)."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _flash_cpu(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def efficiency(flops: dict[str, int], best: dict[str, float], peak: float) -> dict[str, dict[str, float]]:
    """Per system: achieved FLOP/s (its counted FLOPs over its best time) and that as a fraction of
    the measured matmul peak."""
    out = {}
    for name, seconds in best.items():
        if name in flops and seconds > 0:
            rate = flops[name] / seconds
            out[name] = {"flops": flops[name], "flop_per_s": round(rate), "fraction_of_peak": round(rate / peak, 4)}
    return out


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
