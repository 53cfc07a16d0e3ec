"""PPO step time and memory: our PPO against TRL's own ``PPOTrainer``, side by side in one run.

TRL 1.x dropped ``PPOTrainer`` (1.13.0 removed the last, experimental one), so the baseline runs
TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer`` in a separate virtual environment that this script
builds on first use (``benchmarks/_trl_env.py``, about 80-150 s once, reused afterwards; pass
``--venv DIR`` to choose where). Both systems get the same random models built here, all four of
``--shape``: a Llama policy, its frozen reference (a second copy of the policy), and a value model and
a reward model, both one-output classifiers initialised from the same folder (as TRL's example
does), the same prompts (the first ``--batch-size`` of the embedded red-team sample, in the paper's
raw format, all of them in every update, shuffled: the same work in each update of each system, so
that neither is timed on luckier draws of the long multi-turn prompts), rollout size, minibatches,
PPO epochs, response length, temperature 1, KL coefficient and learning rate, on CPU with the same
threads.

The default shape, ``qwen0.5b``, is Qwen2.5-0.5B's layer (hidden 896, 14 query heads sharing 2
key-value heads, intermediate 4864) with its 32k-wide embedding and LM head, at 1 decoder layer
(``--layers``): what a PPO update costs per token there (the LM head over the response, the
grouped-query attention, four models' passes and two models' optimizer state) is what it costs in
a real small policy. An update takes 20-25 s there on 2 idle cores, so the default is 2 timed
updates per run (after the warm-up), 2 runs per system: about 6-7 minutes for both systems (more
on a busy machine).
``--shape tiny`` is the 5.25M-parameter model (hidden 256, 4 layers) earlier figures were measured
at, with 5 timed updates per run (about 4 minutes).

* ``ours``: :class:`constitutional_ai.rl.ppo.PPOTrainer` with a separate value model, the reward
  from the reward model on the decoded response text (as ``cai ppo`` does with a PM);
* ``trl``: ``trl.experimental.ppo.PPOTrainer`` (``benchmarks/_trl_ppo_worker.py``).

Each system runs in its own process (its peak resident memory is its own): one warm-up update,
then ``--steps`` timed updates, ``--repeats`` times, interleaved; reported: the fastest run's mean
seconds per PPO update, its peak resident memory and the share of it above the imported libraries
(models, optimizer state, activations), and the ratios. The libraries' share is read after both
workers have imported the same modules the training will use (``_trl_ppo_worker.import_libraries``:
accelerate, transformers' generation and Llama modules): our trainer imports accelerate and
transformers imports its generation and model code lazily, and TRL's worker had them imported by
``import trl``, which counted about 130 MB of modules as our "training" memory (the 124 MB gap the
earlier figures showed; with both marks after the same imports, ours takes less).

Distance to the limit: the warm-up update of each system (untimed) runs under torch's
``FlopCounterMode`` (``_trl_ppo_worker.flop_counter``, the same code in both processes, with
formulas for the CPU attention kernels torch leaves out), which counts every matrix product and
attention kernel the update ran: generation, the reference, value and reward passes, and every
minibatch's forward and backward. A system's ``flop_per_s`` is those FLOPs over its fastest mean
seconds per update, and ``fraction_of_peak`` that over this machine's dense fp32 matmul rate
(``_common.matmul_peak``, measured in this process at the same threads before and after the workers
run; the higher of the two).
FLOPs differ between the systems because their work does: TRL computes the LM head at every
position of each training pass, ours at the response positions only, and ours drops the left
padding every row of a minibatch shares.

The last line is JSON; ``ratio`` is TRL's seconds per step over ours (above 1: we are faster),
``baseline`` is ``trl``, ``shape`` the model's shape, ``peak_flop_per_s`` the matmul rate and
``systems`` each system's ``flops`` (per update), ``flop_per_s`` and ``fraction_of_peak``.

Run: ``python benchmarks/bench_ppo.py`` (``--shape tiny`` for the small model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)


def build_models(args: argparse.Namespace) -> tuple[Any, Path, Path, Path]:
    """The policy of ``--shape`` (``_common.setup``), a reward/value classifier initialised from it
    (same shape, grouped-query heads included) and a prompts file, built locally (nothing downloaded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from constitutional_ai.common.chat_format import render_raw
    from constitutional_ai.config import PromptSourceConfig
    from constitutional_ai.data.prompts import load_prompts

    tmp, policy = _common.setup(args, "ppo")
    root = Path(tmp.name)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    reward = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(root / "reward", safe_serialization=True)
    tokenizer.save_pretrained(root / "reward")
    del reward
    items, _ = load_prompts(PromptSourceConfig(path="embedded:red_team"))
    # the same batch_size prompts in every update of both systems (each shuffles them): one drawing a
    # long multi-turn prompt pads its whole rollout to it, which would make the two systems' work differ
    items = [items[i % len(items)] for i in range(args.batch_size)]
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([render_raw(list(item.messages)) for item in items]))
    return tmp, policy, root / "reward", prompts


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc), to tell the libraries' share from the training's."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our PPO with the same settings (runs in its own process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from _trl_ppo_worker import flop_counter, import_libraries  # as TRL's worker: counted and measured alike
    from constitutional_ai.common.chat_format import parse_raw
    from constitutional_ai.config import RLConfig
    from constitutional_ai.preference_model.reward_model import RewardModel
    from constitutional_ai.rl.ppo import PPOTrainer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    import_libraries()
    start_rss_mb = current_rss_mb()  # libraries imported, no model loaded yet
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    scorer = RewardModel(AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1),
                         AutoTokenizer.from_pretrained(args.reward), max_length=512, batch_size=args.batch_size)
    prompts = [parse_raw(p) for p in json.loads(Path(args.prompts).read_text())]
    config = RLConfig(batch_size=args.batch_size, num_mini_batches=args.mini_batches, ppo_epochs=args.ppo_epochs,
                      max_new_tokens=args.response_length, learning_rate=args.learning_rate, kl_coef=args.kl_coef,
                      total_steps=args.steps + 1, save_steps=10_000)
    trainer = PPOTrainer(config, policy, tokenizer, scorer.score_responses, prompts,
                         tempfile.mkdtemp(prefix="bench-ppo-ours-"), seed=args.seed, value_model=value)
    times = []
    counter = flop_counter()
    for update in range(args.steps + 1):
        start = time.perf_counter()
        if update == 0:  # the warm-up update (untimed) is the counted one, as in TRL's worker
            with counter:
                trainer.step(trainer._batches())
        else:
            trainer.step(trainer._batches())
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": sum(times[1:]) / args.steps, "warmup_seconds": times[0], "step_seconds": times[1:],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "start_rss_mb": start_rss_mb,
            "flops_per_update": int(counter.get_total_flops())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--reward", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed PPO updates per run, after one warm-up (default: 2 at qwen0.5b, 5 at tiny)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per rollout")
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--learning-rate", type=float, default=3e-6)
    ap.add_argument("--seed", type=int, default=0)
    _common.add_model_args(ap, layers=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per system, interleaved; the fastest is reported")
    ap.add_argument("--venv", default=None, help="where the TRL 1.12 baseline venv lives (built if missing)")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.shape == "tiny" else 2
    if args.worker:
        print(json.dumps(ours(args)))
        return {}
    from _trl_env import ensure_env

    cache = Path(os.environ.get("CAI_CACHE_DIR", Path.home() / ".cache" / "constitutional_ai"))
    venv = Path(args.venv) if args.venv else cache / "bench-trl-ppo-venv"
    print(f"baseline environment: {venv} (built on first use)", flush=True)
    baseline_python = ensure_env(venv)
    shape = _common.shape_of(args)
    tmp, policy, reward, prompts = build_models(args)
    peak = _common.matmul_peak()  # fp32, the benchmark's dtype, at --threads
    common = ["--policy", str(policy), "--reward", str(reward), "--prompts", str(prompts), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--mini-batches", str(args.mini_batches),
              "--ppo-epochs", str(args.ppo_epochs), "--response-length", str(args.response_length),
              "--kl-coef", str(args.kl_coef), "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
              "--threads", str(args.threads)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    commands = {"trl": [str(baseline_python), str(HERE / "_trl_ppo_worker.py"), *common],
                "ours": [sys.executable, __file__, "--worker", *common]}
    print(f"models: Llama policy/reference and value/reward classifiers, shape {shape['name']} (hidden "
          f"{shape['hidden_size']}, {shape['heads']} heads / {shape['kv_heads']} KV heads, intermediate "
          f"{shape['intermediate_size']}, {shape['layers']} layers, vocab {shape['vocab_size']}); rollout "
          f"{args.batch_size} prompts x {args.response_length} tokens, "
          f"{args.mini_batches} minibatches x {args.ppo_epochs} epochs, {args.threads} threads, CPU; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (fp32)", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for _ in range(args.repeats):  # interleaved, so that a noisy spell on a shared machine hits both
        for name, command in commands.items():
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {name: min(rs, key=lambda r: r["seconds_per_step"]) for name, rs in runs.items()}
    peak = _common.peak_after(peak, "the runs' ")
    for name, rs in runs.items():
        print(f"{name}: s/step per run " + ", ".join(f"{r['seconds_per_step']:.3f}" for r in rs))
    for r in results.values():
        r["training_mb"] = r["peak_rss_mb"] - r["start_rss_mb"]
    systems = _common.efficiency({name: r["flops_per_update"] for name, r in results.items()},
                                 {name: r["seconds_per_step"] for name, r in results.items()}, peak)
    print(f"\n{'system':<8}{'s/step':>9}{'warm-up s':>11}{'peak MB':>9}{'libraries MB':>14}{'training MB':>13}"
          f"{'GFLOP/upd':>11}{'GFLOP/s':>9}{'of peak':>9}")
    for name, r in results.items():
        e = systems[name]
        print(f"{name:<8}{r['seconds_per_step']:>9.3f}{r['warmup_seconds']:>11.2f}{r['peak_rss_mb']:>9.0f}"
              f"{r['start_rss_mb']:>14.0f}{r['training_mb']:>13.0f}{e['flops'] / 1e9:>11.1f}"
              f"{e['flop_per_s'] / 1e9:>9.2f}{e['fraction_of_peak']:>9.1%}")
    print("(peak MB: the process's peak resident memory; libraries MB: resident after imports, before any model; "
          "training MB: the difference, what models, optimizer and activations took; GFLOP/upd: counted in the "
          "warm-up update, whose time includes the counting)")
    trl, mine = results["trl"], results["ours"]
    figures = {
        "benchmark": "ppo", "steps": args.steps, "batch_size": args.batch_size, "mini_batches": args.mini_batches,
        "ppo_epochs": args.ppo_epochs, "response_length": args.response_length, "hidden_size": shape["hidden_size"],
        "layers": shape["layers"], "threads": args.threads, "trl_version": trl.get("trl_version"),
        "ours_seconds_per_step": round(mine["seconds_per_step"], 4),
        "trl_seconds_per_step": round(trl["seconds_per_step"], 4),
        "ours_peak_rss_mb": round(mine["peak_rss_mb"], 1), "trl_peak_rss_mb": round(trl["peak_rss_mb"], 1),
        "ours_training_mb": round(mine["training_mb"], 1), "trl_training_mb": round(trl["training_mb"], 1),
        "speed_ratio": round(trl["seconds_per_step"] / mine["seconds_per_step"], 3),
        "memory_ratio": round(trl["peak_rss_mb"] / mine["peak_rss_mb"], 3),
        "training_memory_ratio": round(trl["training_mb"] / mine["training_mb"], 3),
        "ratio": round(trl["seconds_per_step"] / mine["seconds_per_step"], 3),
        "baseline": "trl", "shape": shape, "peak_flop_per_s": round(peak),
        "systems": {name: {**systems[name], "seconds_per_step": round(r["seconds_per_step"], 4),
                           "peak_rss_mb": round(r["peak_rss_mb"], 1), "training_mb": round(r["training_mb"], 1)}
                    for name, r in results.items()},
    }
    tmp.cleanup()
    print()
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
