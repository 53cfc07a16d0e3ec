"""Feedback-label throughput: our scored labeler against generate-and-parse judges.

One random-weight Llama model built locally (nothing downloaded), comparisons built from the
package's embedded red-team prompts and helpful answers (1-4 sentence responses), one sampled
comparison principle each, and by default the paper's set-up of few-shot feedback examples before
each question (the default constitution's 3, each with its own sampled principle and option order;
``--few-shot 0`` for none). Every system asks the model the same question text (our
:class:`FeedbackPromptBuilder` output, with the principle and few-shot block our labeler uses for
that comparison):

* ``ours``: :class:`FeedbackLabeler` over :class:`TransformersBackend`, called as ``cai label``
  calls it (64 comparisons at a time); the question ends in ``Assistant: The answer is:`` and the
  label is read from the log-probabilities of `` (A)`` and `` (B)`` (``score_choices``: a prefix
  tree of batched forward passes where a few-shot block shared by many questions is computed once
  and kept in the prefix cache, which is emptied at the start of every timed run, and attended to
  in place by all the questions on it (shared-stem attention), the LM head run once per call over
  the positions the scores read; nothing generated);
* ``generate_loop``: the LLM-as-a-judge loop: ``model.generate(max_new_tokens=3, greedy)`` on one
  question at a time (batch size 1), then a regex pulls ``A`` or ``B`` out of the generated text;
* ``generate_batched``: the same judge batched (left padding, ``--judge-batch-size`` questions per
  ``generate``, questions sorted by length so batches carry little padding).

**Shape.** By default (``--shape qwen0.5b``) the model has Qwen2.5-0.5B's layer shape (hidden 896,
14 query heads sharing 2 key-value heads, intermediate 4864, a 32,768-token vocabulary) with one
layer (``--layers``): the balance a real judge has between the layers' matrix products and
attention over a ~1,100-token question (at hidden 256 attention costs half as much as the matrix
products, at 896 about an eighth), so ratios carry over to one. Every judge prefills every
question in full, so at this shape the default workload is 128 comparisons (two labeler calls of
64, each of the 8 few-shot blocks shared by about 16 questions), best of 2, to keep the run to
about 10 minutes on 2 cores; ``--shape tiny`` is the 5.25M-parameter model earlier figures were
measured on, with their workload (256 comparisons, best of 3). The tokenizer is trained on the
package's own text and padded with inert ``<unused_N>`` tokens to the model's vocabulary, so the
judges' random answers are mostly those tokens.

The random model rarely writes a letter, so most generated answers do not parse; a parse failure
still counts as a processed label (it costs the same model work) and its rate is reported.
Throughput is comparisons labelled per second; each system is timed ``--repeats`` times,
interleaved, and its best run is reported. Every forward pass is counted (calls, rows, token
positions computed, padding included) and every ``generate`` call (calls, sequences, unpadded
prompt tokens, generated tokens), and all systems are checked to have asked the same questions.
Forward passes are counted on the base model (the layers), which every system's passes run: our
scorer runs it without the LM head, which it applies once per call.

**Distance to the limit.** The run measures this machine's dense fp32 matrix-product rate
(:func:`_common.matmul_peak`, the best of repeated 1024 x 1024 products at the same thread count)
before and after the counted runs, keeping the higher, and runs each system once more, untimed, on
exactly the timed work (ours from an empty prefix cache again; the judges greedy, so the same
tokens) under torch's ``FlopCounterMode``: its FLOPs are what that run computed (the matrix
products, and the attention kernels torch has a formula for), padding included; a stem shared in
place is computed once and counted once. A system's achieved rate is those FLOPs over its best
time, and its fraction of peak that rate over the measured matmul rate: how close it runs to what
the machine's matrix unit can do. Less work at the same fraction of peak is a faster labeler; the
ratio is the time ratio, not the FLOP ratio.

Run: ``PYTHONPATH=src python benchmarks/bench_label.py``. The last line printed is one JSON
object: ``ratio`` is our throughput over the strongest (fastest) baseline, named by ``baseline``;
``shape`` the model's shape; ``peak_flop_per_s`` the measured matmul rate; and ``systems`` per
system its throughput, times, work counts, ``flops``, ``flop_per_s`` and ``fraction_of_peak`` (the
older top-level fields are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from _common import (
    add_model_args,
    comparison_fields,
    measure_efficiency,
    print_efficiency,
    setup,
    shape_of,
    time_interleaved,
)
from constitutional_ai.backends.transformers_backend import TransformersBackend
from constitutional_ai.config import FeedbackConfig, ModelConfig, PromptSourceConfig
from constitutional_ai.constitution.model import Constitution
from constitutional_ai.data.export import load_conversations
from constitutional_ai.data.prompts import load_prompts
from constitutional_ai.feedback.labeler import Comparison, FeedbackLabeler

#: What a judge wrapper accepts as an answer: the first standalone A or B, e.g. ``(A)``, `` B``.
ANSWER_RE = re.compile(r"\b([AB])\b")


class WorkCounter:
    """Counts one model instance's forward passes and, when wrapped, its ``generate`` calls."""

    def __init__(self, model: Any, pad_token_id: int, wrap_generate: bool):
        self.pad_token_id = pad_token_id
        self.reset()

        def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            self.forwards += 1
            self.forward_rows += int(ids.shape[0])
            self.positions += int(ids.numel())

        # on the base model: our scorer runs it without the LM head (deferred to one call after the passes)
        getattr(model, model.base_model_prefix).register_forward_pre_hook(pre_hook, with_kwargs=True)
        if not wrap_generate:
            return
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            mask = kwargs.get("attention_mask")
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            new = sequences[:, input_ids.shape[1]:]
            self.calls += 1
            self.sequences += int(new.shape[0])
            self.prompt_tokens += int(mask.sum()) if mask is not None else input_ids.numel()
            self.tokens += int((new != self.pad_token_id).sum())
            return out

        model.generate = generate

    def reset(self) -> None:
        self.forwards = self.forward_rows = self.positions = 0
        self.calls = self.sequences = self.tokens = self.prompt_tokens = 0

    def snapshot(self) -> dict[str, int]:
        return {"forwards": self.forwards, "forward_rows": self.forward_rows, "positions": self.positions,
                "generate_calls": self.calls, "sequences": self.sequences, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.tokens}


# -- the systems -------------------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, model_dir: Path, constitution: Constitution, feedback: FeedbackConfig, batch_size: int):
        self.backend = TransformersBackend(ModelConfig(model_name_or_path=str(model_dir), device="cpu",
                                                       dtype="float32", batch_size=batch_size))
        self.labeler = FeedbackLabeler(self.backend, constitution, feedback, seed=0)
        self.counter = WorkCounter(self.backend.model, self.backend.tokenizer.pad_token_id, wrap_generate=False)
        self.parse_failures = 0
        self.asked: list[str] = []  # the question texts of the last run, as score_choices received them
        score_choices = self.backend.score_choices

        def recording(prompts: Any, choices: Any) -> list[list[float]]:
            self.asked += list(prompts)
            return score_choices(prompts, choices)

        self.backend.score_choices = recording  # type: ignore[method-assign]

    def questions(self, comparisons: list[Comparison]) -> list[str]:
        """The question texts our labeler scores, in job order (the baselines ask these)."""
        return self.labeler.questions(comparisons)  # type: ignore[return-value]

    def run(self, comparisons: list[Comparison]) -> list[Any]:
        """Label as ``cai label`` does: in batches of ``feedback.batch_size`` comparisons, starting
        from an empty prefix cache (a few-shot block is computed in the run that first needs it)."""
        self.asked = []
        self.backend.clear_prefix_cache()
        size = self.labeler.config.batch_size
        records = [r for start in range(0, len(comparisons), size)
                   for r in self.labeler.label(comparisons[start:start + size])]
        assert all(r is not None for r in records), "a comparison did not fit the context"
        return [r["p_a"] for r in records]  # type: ignore[index]


class GenerateJudge:
    """Generate a few tokens after the question and regex the letter out, ``batch_size`` at a time."""

    def __init__(self, name: str, model_dir: Path, questions: list[str], batch_size: int, max_new_tokens: int,
                 questions_per_comparison: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.questions = questions
        self.per_comparison = questions_per_comparison
        self.batch_size = batch_size
        self.gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
                           "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        self.counter = WorkCounter(self.model, self.tokenizer.pad_token_id, wrap_generate=True)
        self.parse_failures = 0

    @staticmethod
    def parse(text: str) -> str | None:
        match = ANSWER_RE.search(text)
        return match.group(1) if match else None

    @torch.inference_mode()
    def _answers(self, texts: list[str]) -> list[str]:
        if self.batch_size == 1:
            out = []
            for text in texts:
                enc = self.tokenizer(text, return_tensors="pt")
                seq = self.model.generate(**enc, **self.gen_kwargs)
                out.append(self.tokenizer.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
            return out
        encoded = self.tokenizer(texts)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        answers: list[str] = [""] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            seq = self.model.generate(**batch, **self.gen_kwargs)
            for row, text in zip(idx, self.tokenizer.batch_decode(seq[:, batch["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True), strict=True):
                answers[row] = text
        return answers

    def run(self, comparisons: list[Comparison]) -> list[Any]:
        questions = self.questions if len(comparisons) * self.per_comparison == len(self.questions) else \
            self.questions[:len(comparisons) * self.per_comparison]
        letters = [self.parse(a) for a in self._answers(questions)]
        self.parse_failures = sum(letter is None for letter in letters)
        # a comparison's label: the share of its parsed questions that preferred (A) (None when none parsed)
        labels = []
        for ci in range(len(comparisons)):
            mine = [x for x in letters[ci * self.per_comparison:(ci + 1) * self.per_comparison] if x is not None]
            labels.append(sum(x == "A" for x in mine) / len(mine) if mine else None)
        return labels


# -- workload ------------------------------------------------------------------------------------------
def build_comparisons(n: int) -> list[Comparison]:
    """``n`` comparisons: red-team prompts (cycled, each copy keyed apart) with two helpful answers."""
    items, _ = load_prompts(PromptSourceConfig(path="embedded:red_team"))
    conversations, _ = load_conversations(PromptSourceConfig(path="embedded:helpful"))
    answers = [c[-1]["content"] for c in conversations]
    out = []
    for k in range(n):
        item = items[k % len(items)]
        a = answers[k % len(answers)]
        b = answers[(7 * k + 3) % len(answers)]
        if b == a:
            b = answers[(k + 1) % len(answers)]
        out.append(Comparison(key=f"{item.key}:{k}", prompt=item.messages, response_a=a, response_b=b))
    return out


def time_run(system: Any, comparisons: list[Comparison]) -> tuple[float, dict[str, int]]:
    system.counter.reset()
    start = time.perf_counter()
    labels = system.run(comparisons)
    seconds = time.perf_counter() - start
    assert len(labels) == len(comparisons), f"{system.name} returned {len(labels)} labels"
    return seconds, {**system.counter.snapshot(), "parse_failures": system.parse_failures}


#: The default workload at each shape (any flag given overrides it). Every judge prefills each
#: question's ~1,100 tokens at the realistic shape, so the comparisons are cut to what keeps the
#: whole run to about 10 minutes on 2 cores (two labeler calls of 64, each few-shot block still
#: shared by about 16 questions); the tiny shape keeps the workload earlier figures were measured on.
DEFAULTS: dict[str, dict[str, int]] = {
    "qwen0.5b": {"comparisons": 128, "repeats": 2},
    "tiny": {"comparisons": 256, "repeats": 3},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comparisons", type=int, default=None, help="default: 128 at qwen0.5b, 256 at tiny")
    ap.add_argument("--feedback-batch-size", type=int, default=64,
                    help="comparisons per labeler call, as cai label's feedback.batch_size")
    ap.add_argument("--both-orders", action="store_true", help="score each comparison in both option orders")
    ap.add_argument("--few-shot", type=int, default=3,
                    help="few-shot feedback examples before each question (the default constitution has 3)")
    ap.add_argument("--constitution", default=None,
                    help="constitution spec as in the config (default: ours; e.g. ../shared/data/cai-paper)")
    ap.add_argument("--few-shot-blocks", type=int, default=8, help="feedback.few_shot_blocks (0: one per question)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per system; the best is reported (default: 2 at qwen0.5b, 3 at tiny)")
    ap.add_argument("--batch-size", type=int, default=32, help="our backend's sequences per forward pass")
    ap.add_argument("--judge-batch-size", type=int, default=8, help="questions per generate in generate_batched")
    ap.add_argument("--judge-max-new-tokens", type=int, default=3)
    ap.add_argument("--skip-loop", action="store_true", help="leave out the batch-size-1 generate loop")
    ap.add_argument("--skip-batched", action="store_true", help="leave out the batched generate judge")
    add_model_args(ap, layers=1)
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tmp, model_dir = setup(args, "label")
    wall_start = time.perf_counter()
    constitution = Constitution.load(args.constitution)
    feedback = FeedbackConfig(principles="sample", both_orders=args.both_orders, few_shot=args.few_shot,
                              few_shot_blocks=args.few_shot_blocks, batch_size=args.feedback_batch_size)
    comparisons = build_comparisons(args.comparisons)

    ours = Ours(model_dir, constitution, feedback, args.batch_size)
    hf_logging.disable_progress_bar()  # our backend restores the bars after loading
    params = sum(p.numel() for p in ours.backend.model.parameters())
    questions = ours.questions(comparisons)
    per_comparison = len(questions) // len(comparisons)
    systems: list[Any] = [ours]
    if not args.skip_loop:
        systems.append(GenerateJudge("generate_loop", model_dir, questions, 1, args.judge_max_new_tokens,
                                     per_comparison))
    if not args.skip_batched:
        systems.append(GenerateJudge("generate_batched", model_dir, questions, args.judge_batch_size,
                                     args.judge_max_new_tokens, per_comparison))

    question_tokens = ours.backend.count_tokens(questions)
    shape = shape_of(args)
    print(f"model: Llama, {params / 1e6:.2f}M params at the {shape['name']} shape (vocab "
          f"{len(ours.backend.tokenizer)}, hidden {shape['hidden_size']}, {shape['heads']} heads / "
          f"{shape['kv_heads']} KV heads, intermediate {shape['intermediate_size']}, {shape['layers']} layers), "
          "random weights, float32, CPU")
    print(f"work: {len(comparisons)} comparisons x {per_comparison} question(s) (principles=sample, "
          f"both_orders={args.both_orders}, few_shot={args.few_shot}, few_shot_blocks={args.few_shot_blocks}, "
          f"labelled {args.feedback_batch_size} comparisons per call); question tokens mean "
          f"{sum(question_tokens) / len(question_tokens):.0f} (min {min(question_tokens)}, max "
          f"{max(question_tokens)}); judges generate {args.judge_max_new_tokens} tokens, greedy")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (cpu_count {os.cpu_count()}), "
          f"python {platform.python_version()}, best of {args.repeats}")

    # Warm-up, and the check that everyone asks the same questions: ours on the whole workload
    # (recording what score_choices is given), the judges on a few comparisons.
    ours.run(comparisons)
    assert ours.asked and sorted(ours.asked) == sorted(questions), "the baselines would ask other questions"
    for system in systems[1:]:
        system.run(comparisons[:2])

    times, counts, best = time_interleaved(systems, args.repeats, lambda system: time_run(system, comparisons))

    # the distance to the machine's limit (ours from an empty prefix cache again; the judges greedy,
    # so the same tokens again)
    peak, eff, count_s = measure_efficiency(
        systems, lambda system: system.run(comparisons), counts, best,
        lambda system: {**system.counter.snapshot(), "parse_failures": system.parse_failures})

    rate = {name: len(comparisons) / t for name, t in best.items()}
    print()
    header = (f"{'system':<18}{'best s':>8}{'runs s':>16}{'labels/s':>10}{'fwd':>6}{'rows':>6}{'positions':>11}"
              f"{'gen calls':>10}{'prompt tok':>11}{'gen tok':>8}{'unparsed':>10}{'ours is':>9}")
    print(header)
    print("-" * len(header))
    for system in systems:
        name, c = system.name, counts[system.name]
        runs = "/".join(f"{t:.2f}" for t in times[name])
        speedup = "" if name == "ours" else f"{rate['ours'] / rate[name]:.2f}x"
        unparsed = "-" if name == "ours" else f"{c['parse_failures'] / len(questions):.0%}"
        prompt_tok = sum(question_tokens) if name == "ours" else c["prompt_tokens"]
        print(f"{name:<18}{best[name]:>8.3f}{runs:>16}{rate[name]:>10.1f}{c['forwards']:>6}{c['forward_rows']:>6}"
              f"{c['positions']:>11}{c['generate_calls']:>10}{prompt_tok:>11}{c['generated_tokens']:>8}"
              f"{unparsed:>10}{speedup:>9}")
        if name != "ours" and (c["sequences"] != len(questions) or c["prompt_tokens"] != sum(question_tokens)):
            print(f"  warning: {name} answered {c['sequences']} questions of {c['prompt_tokens']} tokens, expected "
                  f"{len(questions)} of {sum(question_tokens)}")
    print("(fwd: model forward passes; rows: sequences in them; positions: token positions computed, padding "
          "included; prompt tok: unpadded question tokens; unparsed: generated answers with no A/B in them, "
          "still counted as labelled)")
    print()
    print_efficiency(peak, eff, count_s, 18)

    baselines = {name: r for name, r in rate.items() if name != "ours"}
    result: dict[str, Any] = {
        "benchmark": "label",
        "comparisons": len(comparisons),
        "questions": len(questions),
        "both_orders": args.both_orders,
        "constitution": constitution.hash[:19],
        "few_shot": args.few_shot,
        "few_shot_blocks": args.few_shot_blocks,
        "feedback_batch_size": args.feedback_batch_size,
        "question_tokens_mean": round(sum(question_tokens) / len(question_tokens), 1),
        "judge_max_new_tokens": args.judge_max_new_tokens,
        "params": params,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ours_labels_per_s": round(rate["ours"], 3),
        **{f"{name}_labels_per_s": round(r, 3) for name, r in baselines.items()},
        **{f"ratio_vs_{name}": round(rate["ours"] / r, 3) for name, r in baselines.items()},
        "parse_failure_rate": {name: round(counts[name]["parse_failures"] / len(questions), 3) for name in baselines},
        "positions": {name: c["positions"] for name, c in counts.items()},
        **comparison_fields("labels_per_s", rate, best, times, counts, eff, count_s, peak, shape),
        "wall_s": round(time.perf_counter() - wall_start, 1),
    }
    tmp.cleanup()
    print()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
