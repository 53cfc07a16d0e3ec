"""Critique-revision throughput: our batched engine against one-prompt-at-a-time baselines.

One random-weight Llama model built locally (nothing downloaded), red-team prompts, critique-revision
rounds, greedy decoding, the same ``max_new_tokens`` and the same stop strings everywhere. Every
prompt costs 1 + 2 * rounds generations in each system:

* ``ours``: :class:`CritiqueRevisionEngine` over :class:`TransformersBackend` (the whole batch
  advances step by step, one batched ``generate`` per step; each prompt's stored start, its
  conversation's KV from the step before, is reused and only its new tokens are prefilled
  (:mod:`~constitutional_ai.backends.kv_reuse`); decoding's few-row products take the CPU's faster
  orientation (:mod:`~constitutional_ai.models.cpu_linear`); the KV store is emptied at the start
  of every timed run, so no run reads what an earlier one computed);
* ``naive_loop``: the same prompts (rendered with our :class:`CritiquePromptBuilder`) through
  ``model.generate`` one prompt and one step at a time, batch size 1;
* ``langchain``: LangChain's own ``ConstitutionalChain`` (``langchain-classic``) with an
  ``LLMChain`` on ``HuggingFacePipeline`` wrapping a transformers ``text-generation`` pipeline,
  given our principles and prompt templates that render the same text as ours. Skipped with a
  note when the ``bench`` extra is not installed.

The final responses of every baseline are compared with ours (greedy everywhere, so they should be
identical up to float rounding) and the count of identical ones is printed and reported.

**Shape.** By default (``--shape qwen0.5b``) the model has Qwen2.5-0.5B's layer shape (hidden 896,
14 query heads sharing 2 key-value heads, intermediate 4864, a 32,768-token vocabulary) with one
layer (``--layers``): per-token costs are a real small model's (a 32k-wide LM head on every decoded
token, batch-1 decoding bound by reading the weights, grouped-query KV), so ratios carry over to
one, while one layer keeps the run to about 10 minutes on 2 cores. The baselines decode one
sequence at a time, so the default workload at this shape is 32 prompts (half the batch ``cai
critique`` advances together by default) x 2 rounds x 16 new tokens (160 generations per system);
``--shape tiny`` is the 5.25M-parameter model earlier figures were measured on, with their workload
(32 prompts x 2 rounds x 48 tokens). The tokenizer is trained on the package's own text and padded
with inert ``<unused_N>`` tokens to the model's vocabulary, so the random model mostly generates
those: stop strings then never match and every generation uses its whole budget, the same in every
system (the table's ``full`` column and token counts show it).

**Throughput** is prompts completed per second (a prompt is its whole chain); each system is timed
``--repeats`` times, interleaved, and its best run is reported. Every ``generate`` call is counted
(calls, sequences, generated tokens) so one can check that the systems did the same work.

**Distance to the limit.** The run measures this machine's dense fp32 matrix-product rate
(:func:`_common.matmul_peak`, the best of repeated 1024 x 1024 products at the same thread count)
before and after the counted runs, keeping the higher, and runs each system once more, untimed, on
exactly the timed work (same prompts; greedy, so the same tokens) under torch's
``FlopCounterMode``: its FLOPs are what that run computed (the matrix products, and the attention
kernels torch has a formula for), padding and finished rows in a batch included. A system's
achieved rate is those FLOPs over its best time, and its fraction of peak that rate over the
measured matmul rate: how close it runs to what the machine's matrix unit can do (a batch-1
decoding loop is far from it, being bound by memory and per-call overhead).

Run: ``PYTHONPATH=src python benchmarks/bench_critique.py``. The last line printed is one JSON
object: ``ratio`` is our throughput over the strongest (fastest) baseline that ran, named by
``baseline``; ``shape`` the model's shape; ``peak_flop_per_s`` the measured matmul rate; and
``systems`` per system its throughput, times, work counts, ``flops``, ``flop_per_s`` and
``fraction_of_peak`` (the older top-level fields are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
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
from constitutional_ai.common.chat_format import RAW_STOP, render_raw
from constitutional_ai.common.text import clean_completion
from constitutional_ai.config import CritiqueConfig, GenerationParams, ModelConfig, PromptSourceConfig
from constitutional_ai.constitution.model import Constitution, CritiqueRevisionPrinciple
from constitutional_ai.constitution.prompts import CritiquePromptBuilder, CritiqueStep
from constitutional_ai.critique.engine import CritiqueRevisionEngine
from constitutional_ai.data.prompts import PromptItem, load_prompts


class GenerateCounter:
    """Wraps one model instance's ``generate`` to count calls, sequences and generated tokens."""

    def __init__(self, model: Any, pad_token_id: int, max_new_tokens: int):
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        self.reset()
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            mask = kwargs.get("attention_mask")
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            new = sequences[:, input_ids.shape[1]:]
            per_row = (new != self.pad_token_id).sum(dim=1)
            self.calls += 1
            self.sequences += int(new.shape[0])
            self.prompt_tokens += int(mask.sum()) if mask is not None else input_ids.numel()
            self.tokens += int(per_row.sum())
            self.full_budget += int((per_row == self.max_new_tokens).sum())
            return out

        model.generate = generate

    def reset(self) -> None:
        self.calls = self.sequences = self.tokens = self.full_budget = self.prompt_tokens = 0

    def snapshot(self) -> dict[str, int]:
        return {"generate_calls": self.calls, "sequences": self.sequences, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.tokens, "full_budget_sequences": self.full_budget}


# -- the systems -------------------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, model_dir: Path, constitution: Constitution, critique: CritiqueConfig, batch_size: int):
        self.backend = TransformersBackend(ModelConfig(model_name_or_path=str(model_dir), device="cpu",
                                                       dtype="float32", batch_size=batch_size))
        self.engine = CritiqueRevisionEngine(self.backend, constitution, critique, seed=0)
        self.counter = GenerateCounter(self.backend.model, self.backend.tokenizer.pad_token_id,
                                       critique.generation.max_new_tokens)

    def run(self, items: list[PromptItem]) -> list[str]:
        if self.backend.kv_store is not None:  # every run starts cold: nothing read in an earlier run
            self.backend.kv_store.clear()
        return [r["final_response"] for r in self.engine.run(items)]


class NaiveLoop:
    """The obvious loop: for each prompt, each step, one ``model.generate`` on batch size 1."""

    name = "naive_loop"

    def __init__(self, model_dir: Path, principles: dict[str, list[CritiqueRevisionPrinciple]],
                 max_new_tokens: int, stops: list[str], builder: CritiquePromptBuilder):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.principles = principles
        self.builder = builder  # ours: the same few-shot examples, so the same prompt text
        self.gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "stop_strings": stops,
                           "tokenizer": self.tokenizer, "pad_token_id": self.tokenizer.pad_token_id,
                           "eos_token_id": self.tokenizer.eos_token_id}
        self.stops = stops
        self.counter = GenerateCounter(self.model, self.tokenizer.pad_token_id, max_new_tokens)

    @torch.inference_mode()
    def _complete(self, text: str) -> str:
        enc = self.tokenizer(text, return_tensors="pt")
        out = self.model.generate(**enc, **self.gen_kwargs)
        completion = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        cut = min((i for i in (completion.find(s) for s in self.stops) if i >= 0), default=len(completion))
        return clean_completion(completion[:cut])

    def run(self, items: list[PromptItem]) -> list[str]:
        finals = []
        for item in items:
            response = self._complete(render_raw(item.messages, add_generation_prompt=True))
            for p in self.principles[item.key]:
                step = CritiqueStep(p.critique_request, p.revision_request)
                critique = self._complete(self.builder.critique(item.messages, response, step))
                step = CritiqueStep(p.critique_request, p.revision_request, critique=critique)
                revision = self._complete(self.builder.revision(item.messages, response, step))
                response = revision or response
            finals.append(response)
        return finals


class LangChainConstitutional:
    """LangChain's ``ConstitutionalChain``, one ``invoke`` per prompt (as the chain is used)."""

    name = "langchain"
    # The same text our raw-format builder renders after its few-shot block (``prefix``), so both
    # systems feed the model the same prompts.
    CRITIQUE = "{input_prompt} {output_from_model}\n\nCritiqueRequest: {critique_request}\n\nCritique:"
    REVISION = ("{input_prompt} {output_from_model}\n\nCritiqueRequest: {critique_request}\n\nCritique: {critique}"
                "\n\nRevisionRequest: {revision_request}\n\nRevision:")

    def __init__(self, model_dir: Path, items: list[PromptItem],
                 principles: dict[str, list[CritiqueRevisionPrinciple]], max_new_tokens: int, stops: list[str],
                 prefix: str):
        from langchain_classic.chains import LLMChain
        from langchain_classic.chains.constitutional_ai.base import ConstitutionalChain
        from langchain_classic.chains.constitutional_ai.models import ConstitutionalPrinciple
        from langchain_core.prompts import PromptTemplate
        from langchain_huggingface import HuggingFacePipeline
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        warnings.filterwarnings("ignore")  # langchain-core re-enables its deprecation warnings on import
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu",
                        max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False,
                        stop_sequence=stops, add_special_tokens=True, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
        llm = HuggingFacePipeline(pipeline=pipe)
        self.counter = GenerateCounter(model, tokenizer.pad_token_id, max_new_tokens)
        qa = LLMChain(llm=llm, prompt=PromptTemplate.from_template("{dialogue}"))
        block = prefix.replace("{", "{{").replace("}", "}}")  # literal text in a template
        critique_prompt = PromptTemplate.from_template(block + self.CRITIQUE)
        revision_prompt = PromptTemplate.from_template(block + self.REVISION)
        # Our engine draws principles per prompt; give each prompt's chain the same draw.
        self.chains = {
            item.key: ConstitutionalChain.from_llm(
                llm=llm, chain=qa, critique_prompt=critique_prompt, revision_prompt=revision_prompt,
                constitutional_principles=[
                    ConstitutionalPrinciple(name=p.id, critique_request=p.critique_request,
                                            revision_request=p.revision_request)
                    for p in principles[item.key]],
                return_intermediate_steps=True)
            for item in items}

    def run(self, items: list[PromptItem]) -> list[str]:
        with torch.inference_mode():
            return [self.chains[item.key].invoke({"dialogue": render_raw(item.messages, True)})["output"]
                    for item in items]


# -- harness -------------------------------------------------------------------------------------------
def time_run(system: Any, items: list[PromptItem]) -> tuple[float, dict[str, int]]:
    system.counter.reset()
    start = time.perf_counter()
    outputs = system.run(items)
    seconds = time.perf_counter() - start
    assert len(outputs) == len(items), f"{system.name} returned {len(outputs)} outputs for {len(items)} prompts"
    system.outputs = outputs
    return seconds, system.counter.snapshot()


#: The default workload at each shape (any flag given overrides it). The baselines generate one
#: sequence at a time, so at the realistic shape (a 32k-vocabulary LM head per decoded token) the
#: workload is cut to what keeps the whole run, LangChain included, to about 10 minutes on 2 cores;
#: the tiny shape keeps the workload earlier figures were measured on.
DEFAULTS: dict[str, dict[str, int]] = {
    "qwen0.5b": {"prompts": 32, "rounds": 2, "max_new_tokens": 16},
    "tiny": {"prompts": 32, "rounds": 2, "max_new_tokens": 48},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=None, help="red-team prompts (default: 32)")
    ap.add_argument("--rounds", type=int, default=None, help="critique-revision rounds (default: 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="tokens per generation (default: 16 at qwen0.5b, 48 at tiny)")
    ap.add_argument("--few-shot", type=int, default=3,
                    help="the constitution's worked critique/revision examples before every request (default 3, all "
                         "of the default constitution's, the paper's set-up and ConstitutionalChain's own default "
                         "prompts'; 0: none, `cai critique`'s default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per system; the best is reported")
    ap.add_argument("--batch-size", type=int, default=32, help="our backend's sequences per forward pass")
    ap.add_argument("--skip-langchain", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    add_model_args(ap, layers=1)
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tmp, model_dir = setup(args, "critique")
    wall_start = time.perf_counter()
    constitution = Constitution.default()
    items, _ = load_prompts(PromptSourceConfig(path="embedded:red_team", limit=args.prompts))
    critique = CritiqueConfig(n_rounds=args.rounds, batch_size=max(len(items), 1), few_shot=args.few_shot,
                              generation=GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0))

    ours = Ours(model_dir, constitution, critique, args.batch_size)
    hf_logging.disable_progress_bar()  # our backend restores the bars after loading
    params = sum(p.numel() for p in ours.backend.model.parameters())
    principles = {it.key: ours.engine.principles_for(it.key) for it in items}
    stops = list(ours.engine.params.stop)  # the raw-format stop strings our engine generates with
    assert set(RAW_STOP) <= set(stops)

    systems: list[Any] = [ours]
    notes: list[str] = []
    if not args.skip_naive:
        systems.append(NaiveLoop(model_dir, principles, args.max_new_tokens, stops, ours.engine.builder))
    if not args.skip_langchain:
        try:
            systems.append(LangChainConstitutional(model_dir, items, principles, args.max_new_tokens, stops,
                                                   ours.engine.builder.raw_prefix))
        except ImportError as exc:
            missing = (exc.name or str(exc)).split(".")[0]
            notes.append(f"langchain baseline skipped ({missing} not installed; "
                         "pip install -e '.[bench]')")
    for note in notes:
        print(f"note: {note}")

    shape = shape_of(args)
    print(f"model: Llama, {params / 1e6:.2f}M params at the {shape['name']} shape (vocab "
          f"{len(ours.backend.tokenizer)}, hidden {shape['hidden_size']}, {shape['heads']} heads / "
          f"{shape['kv_heads']} KV heads, intermediate {shape['intermediate_size']}, {shape['layers']} layers), "
          "random weights, float32, CPU")
    print(f"work: {len(items)} prompts x {args.rounds} rounds = {1 + 2 * args.rounds} generations per prompt, "
          f"max_new_tokens={args.max_new_tokens}, greedy, {len(stops)} stop strings, "
          f"{args.few_shot} few-shot examples before every critique and revision request")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (cpu_count {os.cpu_count()}), "
          f"python {platform.python_version()}, best of {args.repeats}")

    warm = items[:2]  # first calls pay one-off costs (allocator, lazy imports, kernels)
    for system in systems:
        system.run(warm)

    times, counts, best = time_interleaved(systems, args.repeats, lambda system: time_run(system, items))

    # the distance to the machine's limit (greedy: the counted run makes the same tokens again)
    peak, eff, count_s = measure_efficiency(systems, lambda system: system.run(items), counts, best,
                                            lambda system: system.counter.snapshot())

    expected = len(items) * (1 + 2 * args.rounds)
    rate = {name: len(items) / t for name, t in best.items()}
    print()
    header = (f"{'system':<12}{'best s':>9}{'runs s':>16}{'prompts/s':>11}{'gen/s':>9}{'tok/s':>9}"
              f"{'calls':>7}{'seqs':>6}{'prompt tok':>11}{'gen tok':>8}{'full':>6}{'ours is':>9}")
    print(header)
    print("-" * len(header))
    for system in systems:
        name, c = system.name, counts[system.name]
        runs = "/".join(f"{t:.1f}" for t in times[name])
        speedup = "" if name == "ours" else f"{rate['ours'] / rate[name]:.2f}x"
        print(f"{name:<12}{best[name]:>9.2f}{runs:>16}{rate[name]:>11.2f}{c['sequences'] / best[name]:>9.1f}"
              f"{c['generated_tokens'] / best[name]:>9.0f}{c['generate_calls']:>7}{c['sequences']:>6}"
              f"{c['prompt_tokens']:>11}{c['generated_tokens']:>8}{c['full_budget_sequences']:>6}{speedup:>9}")
        if c["sequences"] != expected:
            print(f"  warning: {name} generated {c['sequences']} sequences, expected {expected}")
    print("(gen/s: generations per second; tok/s: generated tokens per second; prompt tok: unpadded "
          "prompt tokens fed in; full: sequences that used the whole token budget)")
    # greedy everywhere: every system should write the same final responses (float rounding aside)
    same = {s.name: sum(a == b for a, b in zip(s.outputs, ours.outputs, strict=True)) for s in systems[1:]}
    for name, k in same.items():
        print(f"{name}: {k}/{len(items)} final responses identical to ours")
    print()
    print_efficiency(peak, eff, count_s, 12)

    baselines = {name: r for name, r in rate.items() if name != "ours"}
    ratio_key = {"naive_loop": "ratio_vs_naive", "langchain": "ratio_vs_langchain"}
    ratios = {ratio_key[name]: round(rate["ours"] / r, 3) for name, r in baselines.items()}
    result: dict[str, Any] = {
        "benchmark": "critique",
        "prompts": len(items),
        "rounds": args.rounds,
        "few_shot": args.few_shot,
        "max_new_tokens": args.max_new_tokens,
        "params": params,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ours_prompts_per_s": round(rate["ours"], 3),
        **{f"{name}_prompts_per_s": round(r, 3) for name, r in baselines.items()},
        **ratios,
        "prompt_tokens": {name: c["prompt_tokens"] for name, c in counts.items()},
        "generated_tokens": {name: c["generated_tokens"] for name, c in counts.items()},
        "same_final_responses": same,
        **comparison_fields("prompts_per_s", rate, best, times, counts, eff, count_s, peak, shape),
        "wall_s": round(time.perf_counter() - wall_start, 1),
    }
    if notes:
        result["notes"] = notes
    tmp.cleanup()
    print()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
