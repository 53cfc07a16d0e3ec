"""GPU section: critique and labels through the vLLM backend and the in-process transformers backend.

Where a CUDA GPU and the ``vllm`` package are both present, the same model is loaded twice, one
backend after the other (vLLM first, before this process initialises CUDA, so that its engine may
fork its workers; GPU memory is freed between the two), and the same two workloads run through each:

* **critique**: :class:`CritiqueRevisionEngine` on ``--prompts`` red-team prompts (the embedded set,
  cycled with a distinct lead-in on each repeat so no two prompts share a prefix), ``--rounds``
  critique-revision rounds, greedy, ``--max-new-tokens`` per generation, all prompts in one batch
  (``1 + 2 * rounds`` batched ``generate`` calls). Generated tokens are counted from the
  :class:`Generation` objects' ``completion_tokens`` (the records' ``tokens``), so each backend is
  credited with what it actually generated: greedy bf16 decoding may diverge between kernels.
  Reported: generated tokens/s and prompts/s (a prompt is its whole chain).
* **labels**: :class:`FeedbackLabeler` on ``--comparisons`` comparisons (embedded red-team prompts,
  two made-up responses each from the embedded helpful answers, as ``bench_label.py`` builds them),
  one sampled principle each, ``--few-shot`` few-shot examples, labelled ``--feedback-batch-size``
  comparisons per call as ``cai label`` does. Reported: labels/s, and how far the two backends'
  labels are apart (the largest ``|p_a difference|`` must be within ``--label-tolerance``).

Each workload has one untimed warm-up on a few items; then ``--repeats`` timed runs, each starting
from empty prefix caches (vLLM's and the transformers scorer's), the best reported. A bf16 dense
matmul rate is measured on the GPU in the same run, and each system's *nominal* FLOP/s (2 x the
model's linear-layer weights per token processed: every prompt and generated token of every
generation, every question token scored; attention and any reuse of cached prefixes not counted)
is reported as a fraction of it.

Without CUDA or without vllm the script prints one line saying which is missing and that the GPU
section was skipped, then ``{"skipped": true, "reason": ..., "ratio": null}``, and exits 0.

Run on a GPU machine (``pip install -e '.[vllm]'``)::

    python benchmarks/bench_gpu.py                                 # random-weight Qwen2.5-0.5B shape
    python benchmarks/bench_gpu.py --model Qwen/Qwen2.5-0.5B-Instruct   # a cached hub model

The last line printed is one JSON object; its ``ratio`` is vLLM's generated tokens/s over the
transformers backend's (``baseline: transformers``). Exit status 1 when a backend failed or the
labels disagree beyond the tolerance (the JSON line is still printed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from _common import add_model_args, quiet, setup, shape_of

#: Warm-up sizes: enough to touch every kernel path (prefill, decode, scoring) once.
WARM_PROMPTS = 4
WARM_COMPARISONS = 8
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


# -- what is missing -------------------------------------------------------------------------------
def missing_pieces() -> str | None:
    """Why the GPU section cannot run here (no CUDA GPU, no vllm, or both), or None."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append(f"no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)")
    # vLLM logs every step of its start at INFO; the variable is read when vllm is first imported
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (CUDA libraries, binary mismatch)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        missing.append(f"vllm cannot be imported ({text}; pip install -e '.[vllm]')")
    return " and ".join(missing) or None


# -- workloads -------------------------------------------------------------------------------------
def build_prompts(n: int) -> list[Any]:
    """``n`` red-team prompts: the embedded set, cycled; each repeat gets a distinct lead-in on its
    user turn so that no two prompts share a prefix (vLLM's prefix cache must not get free hits)."""
    from constitutional_ai.config import PromptSourceConfig
    from constitutional_ai.data.prompts import PromptItem, load_prompts

    items, _ = load_prompts(PromptSourceConfig(path="embedded:red_team"))
    out = []
    for k in range(n):
        item, lap = items[k % len(items)], k // len(items)
        messages = [dict(m) for m in item.messages]
        if lap:
            messages[-1]["content"] = f"Question {lap + 1}: {messages[-1]['content']}"
        out.append(PromptItem(key=f"{item.key}:{k}", messages=messages, index=k, meta=dict(item.meta)))
    return out


def build_comparisons(n: int) -> list[Any]:
    """``bench_label.py``'s comparisons (imported on use: that module loads torch at import)."""
    from bench_label import build_comparisons as label_comparisons

    return label_comparisons(n)


# -- the model -------------------------------------------------------------------------------------

def locate(spec: str) -> str:
    """A local model directory, or a hub id's snapshot in the local Hugging Face cache (never
    downloaded: both backends must read the very same files)."""
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, local_files_only=True)
    except Exception as exc:
        raise SystemExit(f"error: --model {spec!r} is neither a directory nor in the local Hugging Face cache "
                         f"({type(exc).__name__}); run `hf download {spec}` first or pass a directory") from None


def model_shape(path: str) -> dict[str, Any]:
    """Layer shape of a model directory, as ``_common.shape_of`` reports a built one."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return {"name": "custom", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "kv_heads": getattr(cfg, "num_key_value_heads", None)
            or cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size, "layers": cfg.num_hidden_layers}


def flops_per_token(shape: dict[str, Any], head_dim: int | None = None) -> int:
    """Matmul FLOPs per token through the model: 2 x the weights of every linear layer (attention
    projections, MLP, LM head); attention scores and norms not counted."""
    h, heads, kv = shape["hidden_size"], shape["heads"], shape["kv_heads"]
    hd = head_dim or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * shape["intermediate_size"]
    return 2 * (shape["layers"] * per_layer + shape["vocab_size"] * h)


def head_dim_of(path: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "head_dim", None)


# -- the measurements ------------------------------------------------------------------------------
def matmul_peak_gpu(dtype: Any, seconds: float = 1.5, n: int = 8192) -> float:
    """The GPU's dense matrix-product rate (FLOP/s) at ``dtype``: the best of repeated ``n x n``
    products, timed with the device synchronised."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    c = torch.mm(a, b)
    torch.cuda.synchronize()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(8):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        best = max(best, 8 * 2 * n ** 3 / (time.perf_counter() - start))
    del a, b, c
    torch.cuda.empty_cache()
    return best


def clear_caches(backend: Any) -> None:
    """Empty every prefix cache, so that a timed run gets no hits from the previous one."""
    if hasattr(backend, "clear_prefix_cache"):
        backend.clear_prefix_cache()
    engine = getattr(backend, "llm", None)
    if engine is not None and hasattr(engine, "reset_prefix_cache"):
        with suppress(Exception):  # absent or different in some vLLM releases
            engine.reset_prefix_cache()


def label_all(labeler: Any, comparisons: list[Any], size: int) -> list[float | None]:
    """Label as ``cai label`` does, ``size`` comparisons per call; ``p_a`` per comparison."""
    records = [r for start in range(0, len(comparisons), size)
               for r in labeler.label(comparisons[start:start + size])]
    return [None if r is None else r["p_a"] for r in records]


def measure(backend: Any, items: list[Any], comparisons: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Critique and labels through one backend: warm-up, then ``args.repeats`` timed runs of each."""
    from constitutional_ai.config import CritiqueConfig, FeedbackConfig, GenerationParams
    from constitutional_ai.constitution.model import Constitution
    from constitutional_ai.critique.engine import CritiqueRevisionEngine
    from constitutional_ai.feedback.labeler import FeedbackLabeler

    constitution = Constitution.default()
    critique = CritiqueConfig(n_rounds=args.rounds, batch_size=max(len(items), 1),
                              generation=GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0))
    engine = CritiqueRevisionEngine(backend, constitution, critique, seed=0)
    feedback = FeedbackConfig(principles="sample", few_shot=args.few_shot, few_shot_blocks=args.few_shot_blocks,
                              batch_size=args.feedback_batch_size)
    labeler = FeedbackLabeler(backend, constitution, feedback, seed=0)

    engine.run(items[:WARM_PROMPTS])
    label_all(labeler, comparisons[:WARM_COMPARISONS], args.feedback_batch_size)

    critique_times, label_times = [], []
    records: list[dict[str, Any]] = []
    labels: list[float | None] = []
    for _ in range(args.repeats):
        clear_caches(backend)
        start = time.perf_counter()
        records = engine.run(items)
        critique_times.append(time.perf_counter() - start)
        clear_caches(backend)
        start = time.perf_counter()
        labels = label_all(labeler, comparisons, args.feedback_batch_size)
        label_times.append(time.perf_counter() - start)
    assert len(records) == len(items) and len(labels) == len(comparisons)

    generated = sum(r["tokens"]["completion"] for r in records)
    prompt_tokens = sum(r["tokens"]["prompt"] for r in records)
    question_tokens = sum(backend.count_tokens(labeler.questions(comparisons)))
    best_c, best_l = min(critique_times), min(label_times)
    return {
        "critique_s": round(best_c, 3),
        "critique_runs_s": [round(t, 3) for t in critique_times],
        "tokens_per_s": round(generated / best_c, 1),
        "prompts_per_s": round(len(items) / best_c, 3),
        "generations": len(items) * (1 + 2 * args.rounds),
        "generated_tokens": generated,
        "prompt_tokens": prompt_tokens,
        "labels_s": round(best_l, 3),
        "labels_runs_s": [round(t, 3) for t in label_times],
        "labels_per_s": round(len(comparisons) / best_l, 2),
        "question_tokens": question_tokens,
        "too_long": sum(p is None for p in labels),
        "_labels": labels,
        "_finals": [r["final_response"] for r in records],
    }


def run_backend(name: str, config: Any, items: list[Any], comparisons: list[Any],
                args: argparse.Namespace) -> dict[str, Any]:
    """Load one backend, measure it, close it and give its GPU memory back."""
    import torch

    from constitutional_ai.backends import load_backend

    print(f"{name}: loading {config.model_name_or_path} ({config.dtype}) ...", flush=True)
    start = time.perf_counter()
    backend = None
    try:
        backend = load_backend(config)
        startup = time.perf_counter() - start
        if torch.cuda.is_available() and name == "transformers":
            torch.cuda.reset_peak_memory_stats()
        result = measure(backend, items, comparisons, args)
        result["startup_s"] = round(startup, 1)
        if torch.cuda.is_available() and name == "transformers":
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except Exception as exc:  # our errors are one line worded for a user; anything else is named
        text = (str(exc).strip().splitlines() or [""])[0]
        print(f"{name}: failed: {type(exc).__name__}: {text}", flush=True)
        return {"error": f"{type(exc).__name__}: {text}"}
    finally:
        if backend is not None:
            backend.close()
        del backend
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{name}: up in {result['startup_s']:.1f}s; critique {result['critique_s']:.2f}s "
          f"({result['tokens_per_s']:.0f} tok/s, {result['prompts_per_s']:.2f} prompts/s, "
          f"{result['generated_tokens']} tokens); labels {result['labels_s']:.2f}s "
          f"({result['labels_per_s']:.1f} labels/s)", flush=True)
    return result


def add_efficiency(result: dict[str, Any], per_token: int, peak: float) -> None:
    """Nominal FLOP/s of both workloads, and their fractions of the measured matmul peak."""
    crit = per_token * (result["prompt_tokens"] + result["generated_tokens"])
    lab = per_token * result["question_tokens"]
    result["critique_nominal_flop_per_s"] = round(crit / result["critique_s"])
    result["labels_nominal_flop_per_s"] = round(lab / result["labels_s"])
    result["critique_fraction_of_peak"] = round(crit / result["critique_s"] / peak, 5)
    result["labels_fraction_of_peak"] = round(lab / result["labels_s"] / peak, 5)


def compare_labels(a: list[float | None], b: list[float | None]) -> dict[str, Any]:
    """How far two backends' labels of the same comparisons are apart."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return {"labels_max_abs_diff": None, "labels_mean_abs_diff": None, "labels_same_side": None}
    diffs = [abs(x - y) for x, y in pairs]
    return {"labels_max_abs_diff": round(max(diffs), 6),
            "labels_mean_abs_diff": round(sum(diffs) / len(diffs), 6),
            "labels_same_side": round(sum((x >= 0.5) == (y >= 0.5) for x, y in pairs) / len(pairs), 4)}


# -- the run ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="a local model directory or a hub id in the local cache (e.g. Qwen/Qwen2.5-0.5B-Instruct); "
                         "default: a random-weight Llama of --shape, built in a temporary folder")
    ap.add_argument("--prompts", type=int, default=64, help="critique prompts")
    ap.add_argument("--rounds", type=int, default=2, help="critique-revision rounds per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation (greedy)")
    ap.add_argument("--comparisons", type=int, default=512, help="comparisons labelled")
    ap.add_argument("--few-shot", type=int, default=3, help="few-shot feedback examples before each question")
    ap.add_argument("--few-shot-blocks", type=int, default=8, help="feedback.few_shot_blocks")
    ap.add_argument("--feedback-batch-size", type=int, default=64, help="comparisons per labeler call")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="the transformers backend's sequences per forward pass (vLLM schedules its own)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per workload and backend; the best is reported")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of GPU memory")
    ap.add_argument("--label-tolerance", type=float, default=None,
                    help="largest |p_a difference| between the backends accepted (default: 0.05 in 16-bit, "
                         "0.01 in fp32)")
    # run the transformers half alone where CUDA or vllm is missing (to check this script on a CPU)
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    add_model_args(ap, layers=24)  # Qwen2.5-0.5B's own depth: cheap on a GPU
    ap.set_defaults(threads=min(os.cpu_count() or 1, 8))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    reason = missing_pieces()
    if reason and not args.allow_cpu:
        print(f"GPU section skipped: {reason}")
        print(json.dumps({"skipped": True, "reason": reason, "ratio": None, "benchmark": "gpu",
                          "baseline": "transformers"}))
        return 0

    import torch

    from constitutional_ai.config import ModelConfig

    on_gpu = torch.cuda.is_available()
    run_vllm = reason is None
    dtype = DTYPES[args.dtype] if args.dtype else ("bfloat16" if on_gpu else "float32")
    tolerance = args.label_tolerance if args.label_tolerance is not None else (0.01 if dtype == "float32" else 0.05)
    tmp = None
    if args.model:
        quiet(args)
        path = locate(args.model)
        shape = model_shape(path)
        model_label = args.model
    else:
        tmp, model_dir = setup(args, "gpu")
        path, shape = str(model_dir), shape_of(args)
        model_label = f"random-weight Llama, {args.shape} shape, {shape['layers']} layers"
    per_token = flops_per_token(shape, head_dim_of(path))
    items, comparisons = build_prompts(args.prompts), build_comparisons(args.comparisons)
    print(f"model: {model_label} ({per_token / 2e6:.0f}M linear weights), {dtype}")
    print(f"work: critique {len(items)} prompts x {args.rounds} rounds ({1 + 2 * args.rounds} generations each, "
          f"max_new_tokens={args.max_new_tokens}, greedy); labels {len(comparisons)} comparisons (few_shot="
          f"{args.few_shot}, {args.feedback_batch_size} per call); best of {args.repeats}")
    if not run_vllm:
        print(f"note: vllm half skipped ({reason}); transformers on {'cuda' if on_gpu else 'cpu'} only")

    results: dict[str, dict[str, Any] | None] = {}
    # vLLM first: its engine should start before this process initialises CUDA (so it may fork)
    if run_vllm:
        results["vllm"] = run_backend("vllm", ModelConfig(
            backend="vllm", model_name_or_path=path, dtype=dtype,
            gpu_memory_utilization=args.gpu_memory_utilization), items, comparisons, args)
    results["transformers"] = run_backend("transformers", ModelConfig(
        model_name_or_path=path, device="cuda" if on_gpu else "cpu", dtype=dtype, batch_size=args.batch_size),
        items, comparisons, args)

    import _common

    torch_dtype = getattr(torch, dtype)
    peak = matmul_peak_gpu(torch_dtype) if on_gpu else _common.matmul_peak(torch_dtype)
    gpu = torch.cuda.get_device_name(0) if on_gpu else f"none (cpu: {platform.processor() or platform.machine()})"
    for result in results.values():
        if result and "error" not in result:
            add_efficiency(result, per_token, peak)

    ok = {k: v for k, v in results.items() if v and "error" not in v}
    agreement: dict[str, Any] = {"labels_max_abs_diff": None}
    same_final = None
    if "vllm" in ok and "transformers" in ok:
        agreement = compare_labels(ok["vllm"]["_labels"], ok["transformers"]["_labels"])
        finals = list(zip(ok["vllm"]["_finals"], ok["transformers"]["_finals"], strict=True))
        same_final = round(sum(x == y for x, y in finals) / len(finals), 4)
    agree = agreement["labels_max_abs_diff"] is not None and agreement["labels_max_abs_diff"] <= tolerance
    for result in ok.values():
        del result["_labels"], result["_finals"]

    ratio = labels_ratio = None
    if "vllm" in ok and "transformers" in ok:
        ratio = round(ok["vllm"]["tokens_per_s"] / ok["transformers"]["tokens_per_s"], 3)
        labels_ratio = round(ok["vllm"]["labels_per_s"] / ok["transformers"]["labels_per_s"], 3)
    print()
    header = f"{'backend':<14}{'tok/s':>10}{'prompts/s':>11}{'labels/s':>10}{'crit %peak':>12}{'label %peak':>13}"
    print(header)
    print("-" * len(header))
    for name, r in ok.items():
        print(f"{name:<14}{r['tokens_per_s']:>10.0f}{r['prompts_per_s']:>11.2f}{r['labels_per_s']:>10.1f}"
              f"{100 * r['critique_fraction_of_peak']:>11.2f}%{100 * r['labels_fraction_of_peak']:>12.2f}%")
    print(f"({dtype} matmul peak measured: {peak / 1e9:,.0f} GFLOP/s; %peak: nominal FLOP/s, 2 x linear weights "
          "per token processed, over that peak)")
    if ratio is not None:
        print(f"vllm / transformers: {ratio:.2f}x tokens/s, {labels_ratio:.2f}x labels/s; labels max |p_a diff| "
              f"{agreement['labels_max_abs_diff']} (tolerance {tolerance}), same side "
              f"{agreement['labels_same_side']:.0%}; identical final critique responses {same_final:.0%}")
        if not agree:
            print(f"warning: the backends' labels differ by up to {agreement['labels_max_abs_diff']}, more than "
                  f"--label-tolerance {tolerance}")

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    with suppress(Exception):
        import transformers

        versions["transformers"] = transformers.__version__
    if run_vllm:
        with suppress(Exception):
            import vllm

            versions["vllm"] = vllm.__version__
    out: dict[str, Any] = {
        "benchmark": "gpu",
        "skipped": False,
        "shape": shape,
        "model": model_label,
        "gpu": gpu,
        "dtype": dtype,
        "workload": {"prompts": len(items), "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
                     "comparisons": len(comparisons), "few_shot": args.few_shot,
                     "feedback_batch_size": args.feedback_batch_size, "transformers_batch_size": args.batch_size,
                     "repeats": args.repeats},
        "matmul_peak_flop_per_s": round(peak),
        "flops_per_token": per_token,
        "transformers": results.get("transformers"),
        "vllm": results.get("vllm"),
        "ratio": ratio,
        "baseline": "transformers",
        "labels_ratio": labels_ratio,
        **agreement,
        "labels_tolerance": tolerance,
        "labels_agree": agree if ratio is not None else None,
        "critique_same_final": same_final,
        "versions": versions,
        "wall_s": round(time.perf_counter() - wall_start, 1),
    }
    if not run_vllm:
        out["vllm_skipped"] = reason
    if tmp is not None:
        tmp.cleanup()
    print()
    print(json.dumps(out))
    failed = any(v is None or "error" in v for v in results.values())
    return 1 if failed or (ratio is not None and not agree) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
