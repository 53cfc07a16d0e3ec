"""A new user's first `cai run`: wall time on the embedded offline default, per stage, and peak memory.

It runs exactly what the README tells a new user to run (`cai run`, no arguments but a fresh
output directory), in a subprocess with an empty model cache, so the one-time demo model build is
counted as a first run pays for it. A second run with the cache warm measures what every later
first run costs. The target is 3 minutes on 2 cores: ``ratio`` = 180 s / the cold run's seconds
(above 1 means the target holds). Run it on a quiet machine; other jobs inflate every figure.

    python benchmarks/bench_first_run.py            # cold cache, then warm cache
    python benchmarks/bench_first_run.py --runs 1   # cold only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 180.0


def one_run(out: Path, cache: Path, threads: int) -> dict:
    env = {**os.environ, "CAI_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(threads)}
    cai = shutil.which("cai") or sys.exit("cai is not installed: pip install -e .")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([cai, "run", "-o", str(out)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"cai run failed ({done.returncode}): {done.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; the largest child so far
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(max(peak, before) / 1024, 1),
            "stages": {name: s.get("seconds") for name, s in summary["stages"].items()},
            "inside_cai_seconds": summary["total_seconds"], "stdout_lines": len(done.stdout.splitlines()),
            "stderr_bytes": len(done.stderr)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="1: cold cache only; 2: cold, then warm cache")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-first-run-") as tmp:
        cache = Path(tmp) / "cache"
        runs = []
        for n in range(args.runs):
            result = one_run(Path(tmp) / f"run{n}", cache, args.threads)
            result["cache"] = "cold" if n == 0 else "warm"
            runs.append(result)
            print(f"{result['cache']} cache: {result['seconds']} s, peak {result['peak_rss_mb']} MB; "
                  + ", ".join(f"{k} {v} s" for k, v in result["stages"].items()), flush=True)
    cold = runs[0]
    figures = {"benchmark": "first_run", "target_seconds": TARGET_SECONDS, "threads": args.threads,
               "cold_seconds": cold["seconds"], "cold_stages": cold["stages"], "peak_rss_mb": cold["peak_rss_mb"],
               **({"warm_seconds": runs[1]["seconds"], "warm_stages": runs[1]["stages"]} if len(runs) > 1 else {}),
               "baseline": "the 3-minute target", "ratio": round(TARGET_SECONDS / cold["seconds"], 3)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
