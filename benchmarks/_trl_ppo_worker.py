"""Time TRL's own ``PPOTrainer`` (the PPOv2 design) on CPU: the baseline for our PPO benchmark.

Run with the python of the separate venv that ``benchmarks/_trl_env.py`` builds (TRL 1.12.0, the
last release shipping a ``PPOTrainer``); this script must not import ``constitutional_ai``. Example::

    VENV_PY benchmarks/_trl_ppo_worker.py --policy DIR --reward DIR --prompts prompts.json \
        --steps 3 --batch-size 8 --mini-batches 2 --ppo-epochs 2 --response-length 16 \
        --kl-coef 0.05 --seed 0 --threads 1

It prints exactly one JSON line on stdout (everything TRL/transformers print goes to stderr)::

    {"seconds_per_step", "peak_rss_mb", "start_rss_mb", "flops_per_update", "steps", "trl_version",
     "transformers_version", "torch_version", "config", "warmup_seconds", "step_seconds"}

``flops_per_update``: the FLOPs of the warm-up update (untimed), counted by torch's
``FlopCounterMode`` (:func:`flop_counter`), entered at ``on_train_begin`` and left at the first
``on_step_end``: every matrix product and attention kernel that update ran -- generation, the
reference, value and reward passes, and the ``E*M`` forward and backward passes. The same counter
counts our PPO's warm-up update (``bench_ppo.py`` imports :func:`flop_counter` from here, since this
file cannot import the benchmarks' ``_common``), so both systems' FLOPs are counted alike.

Models (nothing is downloaded; everything loads from the given folders, offline):

* policy: ``AutoModelForCausalLM`` from ``--policy`` (trained);
* reference: a second, frozen copy loaded from ``--policy`` (passed as ``ref_model``);
* reward: ``AutoModelForSequenceClassification`` (one output) from ``--reward`` (frozen);
* value: a separate ``AutoModelForSequenceClassification`` also loaded from ``--reward`` -- TRL's
  own recipe (its ``ppo.py`` example initialises the value model from the reward model). It is not
  a value head on the policy: TRL wraps policy + value model in a ``PolicyAndValueWrapper``, one
  AdamW over both, loss ``pg_loss + vf_coef * vf_loss``.

How our knobs map onto ``PPOConfig``:

* ``--batch-size B`` -> ``per_device_train_batch_size=B``, ``gradient_accumulation_steps=1``
  (one process, so ``batch_size = B`` prompts per update) and ``local_rollout_forward_batch_size=B``
  (the whole rollout is generated/scored in one chunk);
* ``--mini-batches M`` -> ``num_mini_batches=M``: TRL's micro-batch loop then runs once per
  mini-batch of ``B/M`` rows and, as ``gradient_accumulation_steps=1``, steps the optimiser after
  each, i.e. ``E*M`` optimiser steps per update (with ``gradient_accumulation_steps>1`` accelerate
  would only step every that many micro-batches, which is not what "mini-batches" means);
* ``--ppo-epochs E`` -> ``num_ppo_epochs``; ``--response-length L`` -> ``response_length``
  (``max_new_tokens``); ``--kl-coef C`` -> ``kl_coef`` (fixed, no adaptive controller; k1 estimator
  by default, per-token KL penalty in the reward); ``--seed`` -> ``seed``;
* sampling: ``temperature=1.0`` (TRL's default is 0.7), ``top_k=0``, ``top_p=1``;
* stop token: ``--stop-token eos`` (default) truncates responses after EOS before scoring, as TRL's
  examples do; ``none`` keeps all ``L`` tokens. No ``missing_eos_penalty``.
* TRL defaults otherwise: ``learning_rate`` 3e-6 (``--learning-rate``), ``cliprange`` 0.2,
  ``cliprange_value`` 0.2, ``vf_coef`` 0.1, ``gamma`` 1, ``lam`` 0.95, ``whiten_rewards=False``;
  advantages ARE always whitened (masked, per rollout batch).

Timing: a ``TrainerCallback`` stamps ``time.perf_counter()`` at ``on_train_begin`` and at each
``on_step_end`` (one PPO update = rollout + reward/value scoring + GAE + E*M optimiser steps +
TRL's own logging). Training runs ``1 + steps`` updates (``total_episodes = (1 + steps) * B``);
the first (warm-up) update, which also counts the FLOPs (the counter's dispatch overhead makes it
slower), is dropped and ``seconds_per_step`` is the mean of the rest.
``peak_rss_mb`` is ``ru_maxrss / 1024`` of this process (Linux: KiB -> MiB), so it includes
model loading and the warm-up; ``start_rss_mb`` is the resident memory after the imports
(:func:`import_libraries` included, as in our worker) and before any model.

Nothing is reported or saved: ``report_to="none"``, ``save_strategy="no"``, ``eval_strategy="no"``,
``num_sample_generations=0``, ``output_dir`` is a temporary folder removed afterwards.

Compatibility adaptations (only used when the normal path fails, e.g. an older transformers than the
one that wrote the folders): the tokenizer falls back to
``PreTrainedTokenizerFast(tokenizer_file=DIR/tokenizer.json)`` with ``<s>``/``</s>``/``<pad>`` as
bos/eos/pad, and a model whose ``config.json`` the installed transformers rejects is rebuilt from
a cleaned ``LlamaConfig`` (``rope_parameters`` -> ``rope_theta``, unknown keys dropped) plus the
safetensors weights. Queries are left-padded (TRL's PPO requires it). The import falls back from
``trl.experimental.ppo`` (TRL 0.26-1.12) to ``trl.PPOTrainer`` (0.12-0.28) and maps the older
constructor names (``policy``/``ref_policy``/``tokenizer``), so an older pin also runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_DISABLED": "true", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
               "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DISABLE_MLFLOW_INTEGRATION": "TRUE"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def import_libraries() -> None:
    """Import what training will import lazily (accelerate, transformers' generation and Llama
    modules), so that the resident memory read next ("libraries") is the same set of modules in
    our worker and in this one: ``import trl`` pulls these in, our trainer only on first use, and
    without this ~130 MB of modules would count as our training memory."""
    import accelerate  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification  # noqa: F401


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` (no display) that also counts CPU attention.

    torch's registry has formulas for the CUDA attention kernels only; on CPU ``scaled_dot_product_
    attention`` runs ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), which it
    would count as 0 FLOPs. Those two get torch's own SDPA formulas here (full ``L x S`` score
    matrix, causal or not, grouped-query heads as the query's). Enter it around the counted work and
    read ``get_total_flops()``."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in fc.flop_registry:
        fc.register_flop_formula(forward)(
            lambda query, key, value, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(query, key, value))
    if backward is not None and backward not in fc.flop_registry:
        fc.register_flop_formula(backward)(
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            fc.sdpa_backward_flop_count(grad_out, query, key, value))
    return fc.FlopCounterMode(display=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, required=True, help="saved causal LM + tokenizer")
    ap.add_argument("--reward", type=Path, required=True, help="saved one-output sequence classifier + tokenizer")
    ap.add_argument("--prompts", type=Path, required=True, help="JSON list of prompt strings")
    ap.add_argument("--steps", type=int, default=3, help="timed PPO updates (after 1 warm-up update)")
    ap.add_argument("--batch-size", type=int, default=8, help="rollout size (prompts) per update")
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=16)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--learning-rate", type=float, default=3e-6, help="TRL's default")
    ap.add_argument("--stop-token", choices=("eos", "none"), default="eos")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.mini_batches < 1 or args.ppo_epochs < 1:
        ap.error("--steps, --batch-size, --mini-batches and --ppo-epochs must be >= 1")
    if args.batch_size % args.mini_batches:
        ap.error("--batch-size must be a multiple of --mini-batches")
    return args


def load_tokenizer(path: Path):
    """The folder's tokenizer, left-padded; falls back to the raw tokenizer.json (see docstring)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # e.g. an older transformers cannot read a v5 tokenizer_config.json
        print(f"[worker] AutoTokenizer failed ({type(exc).__name__}: {exc}); using tokenizer.json", file=sys.stderr)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **SPECIALS)
    for name, token in SPECIALS.items():
        if getattr(tok, name, None) is None:
            setattr(tok, name, token)
    tok.padding_side = "left"
    return tok


def _clean_config(path: Path, **overrides):
    """A ``LlamaConfig`` from config.json, for a transformers that cannot read it as saved."""
    from transformers import LlamaConfig

    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    rope = raw.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        raw.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in raw:
        raw.setdefault("torch_dtype", raw.pop("dtype"))
    known = set(inspect.signature(LlamaConfig.__init__).parameters) | {
        "architectures", "torch_dtype", "id2label", "label2id", "num_labels", "pad_token_id", "bos_token_id",
        "eos_token_id", "tie_word_embeddings", "problem_type"}
    raw = {k: v for k, v in raw.items() if k in known and k not in {"transformers_version", "model_type"}}
    raw.update(overrides)
    return LlamaConfig(**raw)


def load_model(auto_cls, path: Path, **kwargs):
    """``auto_cls.from_pretrained(path)`` in float32, else rebuilt from a cleaned config + safetensors."""
    import torch

    try:
        return auto_cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    except TypeError:
        pass  # a transformers without the ``dtype`` keyword
    except Exception as exc:
        print(f"[worker] {auto_cls.__name__}.from_pretrained({path}) failed ({type(exc).__name__}: {exc});"
              " rebuilding from config.json", file=sys.stderr)
        return _rebuild(auto_cls, path, **kwargs)
    try:
        return auto_cls.from_pretrained(path, torch_dtype=torch.float32, **kwargs)
    except Exception as exc:
        print(f"[worker] {auto_cls.__name__}.from_pretrained({path}) failed ({type(exc).__name__}: {exc});"
              " rebuilding from config.json", file=sys.stderr)
        return _rebuild(auto_cls, path, **kwargs)


def _rebuild(auto_cls, path: Path, **kwargs):
    from safetensors.torch import load_file

    model = auto_cls.from_config(_clean_config(path, **kwargs))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"weights of {path} do not fit: missing={missing} unexpected={unexpected}")
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.float()


def import_ppo():
    """(PPOConfig, PPOTrainer, where) from whichever location this TRL has."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from trl.experimental.ppo import PPOConfig, PPOTrainer
            return PPOConfig, PPOTrainer, "trl.experimental.ppo"
        except ImportError:
            pass
        try:
            from trl import PPOConfig, PPOTrainer
            return PPOConfig, PPOTrainer, "trl"
        except ImportError:
            from trl import PPOv2Config, PPOv2Trainer
            return PPOv2Config, PPOv2Trainer, "trl(PPOv2)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result), file=real_stdout, flush=True)
    return 0


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc), to tell the libraries' share from the training's."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import datasets
        datasets.disable_progress_bars()
    PPOConfig, PPOTrainer, where = import_ppo()
    import_libraries()

    start_rss_mb = current_rss_mb()  # libraries imported, no model loaded yet
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.policy)
    policy = load_model(AutoModelForCausalLM, args.policy)
    ref_policy = load_model(AutoModelForCausalLM, args.policy)
    reward = load_model(AutoModelForSequenceClassification, args.reward, num_labels=1)
    value = load_model(AutoModelForSequenceClassification, args.reward, num_labels=1)
    for model in (policy, ref_policy, reward, value):
        model.config.pad_token_id = tok.pad_token_id
    for model in (ref_policy, reward):
        model.eval()
        model.requires_grad_(False)

    prompts = json.loads(args.prompts.read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise SystemExit(f"{args.prompts}: expected a non-empty JSON list of strings")
    while len(prompts) < args.batch_size:  # the dataloader drops ragged batches
        prompts = prompts + prompts
    dataset = Dataset.from_dict({"input_ids": [tok(p, padding=False)["input_ids"] for p in prompts]})

    updates = 1 + args.steps
    stamps: list[float] = []
    counter = flop_counter()
    counted: list[int] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            counter.__enter__()  # the warm-up update is counted (and untimed)

        def on_step_end(self, a, state, control, **kw):
            if not counted:
                counter.__exit__(None, None, None)
                counted.append(int(counter.get_total_flops()))
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as out:
        cfg_kwargs = dict(
            output_dir=out, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="steps",
            logging_steps=1, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=args.seed,
            dataloader_num_workers=0, learning_rate=args.learning_rate,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            local_rollout_forward_batch_size=args.batch_size, num_mini_batches=args.mini_batches,
            num_ppo_epochs=args.ppo_epochs, response_length=args.response_length, kl_coef=args.kl_coef,
            temperature=1.0, total_episodes=updates * args.batch_size, num_sample_generations=0,
            stop_token=None if args.stop_token == "none" else "eos", missing_eos_penalty=None,
            whiten_rewards=False,
        )
        fields = set(inspect.signature(PPOConfig.__init__).parameters)
        dropped = sorted(k for k in cfg_kwargs if k not in fields)
        cfg_kwargs = {k: v for k, v in cfg_kwargs.items() if k in fields}
        if "use_cpu" in dropped and "no_cuda" in fields:  # older TrainingArguments spellings
            cfg_kwargs["no_cuda"] = True
        if "eval_strategy" in dropped and "evaluation_strategy" in fields:
            cfg_kwargs["evaluation_strategy"] = "no"
        config = PPOConfig(**cfg_kwargs)

        params = set(inspect.signature(PPOTrainer.__init__).parameters)
        names = {"processing_class": "processing_class" if "processing_class" in params else "tokenizer",
                 "model": "model" if "model" in params else "policy",
                 "ref_model": "ref_model" if "ref_model" in params else "ref_policy"}
        trainer = PPOTrainer(**{"args": config, names["processing_class"]: tok, names["model"]: policy,
                                names["ref_model"]: ref_policy, "reward_model": reward, "value_model": value,
                                "train_dataset": dataset, "callbacks": [StepTimer()]})
        with contextlib.suppress(Exception):  # keep stdout/stderr free of per-step log dicts
            from transformers import PrinterCallback, ProgressCallback
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        trainer.train()
        completed = trainer.state.global_step

    if completed != updates or len(stamps) != updates + 1:
        raise RuntimeError(f"expected {updates} updates, TRL ran {completed} ({len(stamps) - 1} timed)")
    durations = [b - a for a, b in itertools.pairwise(stamps)]
    timed = durations[1:]
    return {
        "seconds_per_step": sum(timed) / len(timed),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "start_rss_mb": start_rss_mb,
        "flops_per_update": counted[0],
        "steps": len(timed),
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "config": {
            "policy": str(args.policy), "reward": str(args.reward), "prompts": str(args.prompts),
            "num_prompts": len(prompts), "batch_size": args.batch_size, "mini_batches": args.mini_batches,
            "mini_batch_size": args.batch_size // args.mini_batches, "ppo_epochs": args.ppo_epochs,
            "optimizer_steps_per_update": args.ppo_epochs * args.mini_batches,
            "response_length": args.response_length, "kl_coef": args.kl_coef, "seed": args.seed,
            "threads": args.threads, "learning_rate": args.learning_rate, "temperature": 1.0,
            "stop_token": args.stop_token, "value_model": "separate, loaded from --reward",
            "ref_model": "separate frozen copy loaded from --policy", "whiten_advantages": True,
            "whiten_rewards": False, "kl_estimator": getattr(config, "kl_estimator", "k1"),
            "cliprange": getattr(config, "cliprange", None),
            "cliprange_value": getattr(config, "cliprange_value", None),
            "vf_coef": getattr(config, "vf_coef", None), "gamma": getattr(config, "gamma", None),
            "lam": getattr(config, "lam", None), "warmup_updates": 1, "ppo_trainer": f"{where}.PPOTrainer",
            "dropped_config_keys": dropped,
        },
        "warmup_seconds": durations[0],
        "step_seconds": timed,
    }


if __name__ == "__main__":
    sys.exit(main())
