"""The same critique workload through each way of running it, side by side in one run.

* ``transformers``: the in-process backend (batched generation), all threads.
* ``openai``: the OpenAI-compatible backend against llama.cpp's server on loopback, serving a GGUF
  export of the same model (``max_concurrency`` requests in flight; that server runs one at a time).
* ``vllm`` (only where vLLM and a CUDA GPU are present): vLLM's engine against the transformers
  backend on the same GPU.
* ``ray-1`` / ``ray-2``: the in-process backend inside Ray Data actors, one thread each, on one
  worker and on two. The driver writes the records either way.

Every system writes the full critique records (initial response, rounds of critique and revision)
for the same prompts and seeds. Throughput is prompts per second of the whole stage, model loading
included (Ray's start-up is not: a cluster is started once per session).

The model is ``--shape``'s (``_common``): by default ``qwen0.5b``, Qwen2.5-0.5B's layer shape
(hidden 896, 14 query heads sharing 2 key-value heads, intermediate 4864, 32k vocabulary) at 2
layers, where decoding is a real small model's (the LM head and grouped-query KV, not per-call
Python overhead, set the cost); its default workload (16 prompts, 2 rounds, 32 new tokens: two
Ray batches of 8, one per worker on 2) keeps the run to about 5 minutes on 2 idle cores.
``--shape tiny`` is the 5.25M model with the old workload (52 prompts, 4 rounds, 48 new tokens).

Distance to the limit: this machine's dense fp32 matmul rate is measured first and again after the
runs, the higher kept (``_common.matmul_peak`` and ``peak_after``, at ``--threads``), and the
workload's FLOPs are counted once, untimed, on the in-process backend under torch's
``FlopCounterMode`` (``_common.count_flops``: every matrix product it ran and the attention kernels
torch has formulas for, padding included). Each CPU system's ``flop_per_s`` is that count over its
seconds and ``fraction_of_peak`` that over the matmul rate: the same model work, so the fractions
rank the systems as their throughputs do, and say how far each is from what these cores could do
(Ray's workers run one thread each; llama.cpp's server pads nothing, so its own count would be a
little lower). The GPU systems get no fraction (the peak is the CPU's).

The last line is JSON. ``ratio`` is the scale-out figure, Ray on 2 workers over 1 (the baseline,
``baseline: "ray-1"``: distributed generation against the same stage on one worker);
``openai_vs_transformers`` says what a llama.cpp server costs or gains against the in-process
backend on this CPU; ``shape``, ``peak_flop_per_s``, ``workload_flops`` and ``systems`` (each
system's ``prompts_per_second``, ``flop_per_s`` and ``fraction_of_peak``) the distance to the limit.

    python benchmarks/bench_backends.py                 # qwen0.5b x 2 layers: 16 prompts, 2 rounds, 32 tokens
    python benchmarks/bench_backends.py --shape tiny    # 52 prompts, 4 rounds, 48 new tokens
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the llama.cpp server helper


#: The default workload at each shape: the old one at ``tiny``; at ``qwen0.5b`` (2 layers) a smaller
#: one, so that four systems' runs plus the counted one fit in about 5 minutes on 2 idle cores (16
#: prompts: two Ray batches of 8, so that 2 workers each get one).
WORKLOAD = {"qwen0.5b": {"prompts": 16, "rounds": 2, "max_new_tokens": 32},
            "tiny": {"prompts": 52, "rounds": 4, "max_new_tokens": 48}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(ap, layers=2)
    ap.add_argument("--prompts", type=int, default=None,
                    help="at most 52 (the embedded red-team sample); default 16 at qwen0.5b, 52 at tiny")
    ap.add_argument("--rounds", type=int, default=None, help="default 2 at qwen0.5b, 4 at tiny")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32 at qwen0.5b, 48 at tiny")
    ap.add_argument("--concurrency", type=int, default=8, help="openai backend: requests in flight")
    ap.add_argument("--ray-batch-size", type=int, default=8, help="inputs per map_batches call")
    ap.add_argument("--skip", nargs="*", default=[], choices=["transformers", "openai", "ray", "vllm"])
    args = ap.parse_args()
    for name, default in WORKLOAD[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    tmp, model_dir = _common.setup(args, "backends")
    shape = _common.shape_of(args)
    peak = _common.matmul_peak()  # fp32, the in-process backend's dtype on CPU, at --threads
    print(f"shape {shape}; matmul peak {peak / 1e9:.1f} GFLOP/s (fp32, {args.threads} threads)", flush=True)

    from constitutional_ai.config import RunConfig
    from constitutional_ai.stages.critique import run_critique

    work = Path(tempfile.mkdtemp(prefix="bench-backends-runs-"))

    def config(name: str, **overrides: object) -> RunConfig:
        return RunConfig().with_overrides({
            "output_dir": str(work / name), "progress": False, "overwrite": True, "seed": 0,
            "prompts.limit": args.prompts, "critique.n_rounds": args.rounds,
            "critique.generation.max_new_tokens": args.max_new_tokens, "policy.model_name_or_path": str(model_dir),
            "policy.device": "cpu", **overrides})

    seconds_of: dict[str, float] = {}

    def measure(name: str, cfg: RunConfig) -> float:
        start = time.perf_counter()
        result = run_critique(cfg)
        seconds = time.perf_counter() - start
        assert result.written == result.total, result.as_dict()  # the embedded set has 52 prompts
        rate = result.total / seconds
        seconds_of[name] = seconds
        print(f"{name:>14}: {seconds:7.1f} s  {rate:6.2f} prompts/s", flush=True)
        return rate

    figures: dict[str, float] = {}
    if "transformers" not in args.skip:
        figures["transformers"] = measure("transformers", config("transformers"))
    workload_flops = 0
    if not {"transformers", "ray"} <= set(args.skip):  # the workload's FLOPs, counted once (untimed)
        workload_flops, _ = _common.count_flops(lambda: run_critique(config("counted")))
        print(f"{'workload':>14}: {workload_flops / 1e12:.2f} TFLOP (counted on the in-process backend)", flush=True)

    if "openai" not in args.skip:
        from constitutional_ai.models.gguf import export_llama_gguf
        from servers import llama_server, llama_server_available

        reason = llama_server_available()
        if reason:
            print(f"openai: skipped ({reason})")
        else:
            gguf = export_llama_gguf(model_dir, Path(tmp.name) / "model.gguf")
            with llama_server(gguf, n_ctx=4096, threads=args.threads) as url:
                figures["openai"] = measure("openai", config(
                    "openai", **{"policy.backend": "openai", "policy.base_url": url, "policy.chat_format": "raw",
                                 "policy.max_context": 4096, "policy.max_concurrency": args.concurrency,
                                 "policy.extra_body": {"repeat_penalty": 1.0}}))

    if "vllm" not in args.skip:
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            print("vllm: skipped (needs the vllm package and a CUDA GPU)")
        else:  # the GPU check: the same model and workload in vLLM's engine and on the GPU in transformers
            figures["transformers-cuda"] = measure("transformers-cuda", config("tcuda", **{"policy.device": "cuda"}))
            figures["vllm"] = measure("vllm", config("vllm", **{"policy.backend": "vllm", "policy.device": "auto",
                                                               "policy.gpu_memory_utilization": 0.5}))

    if "ray" not in args.skip:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        for workers in (1, 2):
            figures[f"ray-{workers}"] = measure(f"ray-{workers}", config(
                f"ray{workers}", **{"ray.workers": workers, "ray.num_cpus_per_worker": 1,
                                                    "ray.batch_size": args.ray_batch_size}))
        ray.shutdown()

    shutil.rmtree(work, ignore_errors=True)
    tmp.cleanup()
    cpu = [name for name in figures if name in ("transformers", "openai", "ray-1", "ray-2")]
    peak = _common.peak_after(peak, "the runs' ")
    systems = _common.efficiency({name: workload_flops for name in cpu if workload_flops},
                                 {name: seconds_of[name] for name in cpu}, peak)
    out = {"workload": f"critique, {args.prompts} prompts x {args.rounds} rounds, {args.max_new_tokens} new tokens",
           "prompts_per_second": {k: round(v, 3) for k, v in figures.items()},
           "baseline": "ray-1", "shape": shape, "peak_flop_per_s": round(peak), "workload_flops": workload_flops,
           "systems": {name: {"prompts_per_second": round(rate, 3), "seconds": round(seconds_of[name], 2),
                              **systems.get(name, {})} for name, rate in figures.items()}}
    if "openai" in figures and "transformers" in figures:
        out["openai_vs_transformers"] = round(figures["openai"] / figures["transformers"], 3)
    if "vllm" in figures:
        out["vllm_vs_transformers_cuda"] = round(figures["vllm"] / figures["transformers-cuda"], 3)
    if "ray-1" in figures:
        out["ray_2_vs_1"] = round(figures["ray-2"] / figures["ray-1"], 3)
        out["ratio"] = out["ray_2_vs_1"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
