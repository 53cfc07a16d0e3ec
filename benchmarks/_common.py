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


def quiet(args: argparse.Namespace) -> None:
    """Quiet logs and warnings, pin ``--threads``, seed: what every benchmark does before its model."""
    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def setup(args: argparse.Namespace, name: str) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Quiet logs, pin threads, seed, and build the random-weight model of ``--shape`` in a
    temporary folder."""
    from constitutional_ai.models.tiny import build_tiny_causal_lm

    quiet(args)
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


def peak_after(before: float, label: str = "") -> float:
    """The higher of the matmul peak measured ``before`` the timed work and one measured now. A slow
    spell on a shared host during a single measurement would understate the limit and put a
    fraction of peak above 100%; the best rate seen in the run is the truer limit."""
    after = matmul_peak()
    if label:
        print(f"{label}matmul peak before / after: {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s", flush=True)
    return max(before, after)


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


def measure_efficiency(systems: list[Any], run: Callable[[Any], Any], counts: dict[str, dict[str, Any]],
                       best: dict[str, float], snapshot: Callable[[Any], dict[str, Any]],
                       ) -> tuple[float, dict[str, dict[str, float]], dict[str, float]]:
    """The distance to the machine's limit: its matmul peak (the higher of one measured before and
    one after the counted runs), and each system's FLOPs counted on one more, untimed
    ``run(system)`` of exactly the timed work, warning when that run's work counts
    (``snapshot(system)`` after ``system.counter.reset()``) differ from the timed ones. Returns
    ``(peak, efficiency, seconds each counted run took)``."""
    import time

    peak = matmul_peak()
    flops: dict[str, int] = {}
    count_s: dict[str, float] = {}
    for system in systems:
        system.counter.reset()
        start = time.perf_counter()
        flops[system.name], _ = count_flops(lambda system=system: run(system))
        count_s[system.name] = time.perf_counter() - start
        counted = snapshot(system)
        if counted != counts[system.name]:
            print(f"  warning: {system.name}'s counted run did other work than its timed runs: "
                  f"{counted} vs {counts[system.name]}")
    peak = peak_after(peak)
    return peak, efficiency(flops, best, peak), count_s


def print_efficiency(peak: float, eff: dict[str, dict[str, float]], count_s: dict[str, float], width: int) -> None:
    """The peak, then one line per system: FLOPs counted, achieved FLOP/s, fraction of peak."""
    import torch

    print(f"fp32 matmul peak now: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    for name, e in eff.items():
        print(f"{name:<{width}}{e['flops'] / 1e9:>10.1f} GFLOP counted, {e['flop_per_s'] / 1e9:>7.1f} GFLOP/s, "
              f"{e['fraction_of_peak']:>6.1%} of peak (counted in {count_s[name]:.1f} s)")


def comparison_fields(unit: str, rate: dict[str, float], best: dict[str, float], times: dict[str, list[float]],
                      counts: dict[str, dict[str, Any]], eff: dict[str, dict[str, float]], count_s: dict[str, float],
                      peak: float, shape: dict[str, Any]) -> dict[str, Any]:
    """The fields every benchmark's JSON line ends with: ``ratio`` (ours over the strongest baseline
    that ran), that ``baseline``, the ``shape``, the peak, and each system's rate (``unit``, e.g.
    ``prompts_per_s``), times, work counts, FLOP/s and fraction of peak."""
    baselines = {name: r for name, r in rate.items() if name != "ours"}
    strongest = max(baselines, key=baselines.__getitem__) if baselines else None
    return {
        "ratio": round(rate["ours"] / baselines[strongest], 3) if strongest else None,
        "baseline": strongest,
        "baselines": sorted(baselines),
        "shape": shape,
        "peak_flop_per_s": round(peak),
        "systems": {name: {unit: round(rate[name], 3), "best_s": round(best[name], 3),
                           "runs_s": [round(t, 3) for t in times[name]], **counts[name], **eff[name],
                           "count_run_s": round(count_s[name], 3)} for name in rate},
    }
