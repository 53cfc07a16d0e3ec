"""The ``cai`` command line.

Every flag is an override of one field of :class:`~constitutional_ai.config.RunConfig`
(``--rounds`` sets ``critique.n_rounds``), applied on top of ``--config FILE`` when given. The
flag table below is the single place that mapping lives; help texts come from the config's own
field descriptions, so the CLI and the YAML can never drift apart.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make torch on a busy CPU 30x slower (measured on a
# shared 2-core machine); passive waiting costs nothing when the CPU is free. It must be set
# before torch is imported, and an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import inspect
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.table import Table

from constitutional_ai.common.errors import CAIError, first_line
from constitutional_ai.common.progress import console
from constitutional_ai.config import RunConfig


@dataclass(frozen=True)
class Flag:
    path: str  # dotted path into RunConfig
    type: Any
    decls: tuple[str, ...]


def _flag(path: str, type_: Any, *decls: str) -> Flag:
    return Flag(path, type_, decls)


#: Flags shared by the stages, by Python parameter name.
COMMON_FLAGS: dict[str, Flag] = {
    "output_dir": _flag("output_dir", str, "--output-dir", "-o"),
    "seed": _flag("seed", int, "--seed"),
    "constitution": _flag("constitution", str, "--constitution"),
    "resume": _flag("resume", bool, "--resume/--no-resume"),
    "overwrite": _flag("overwrite", bool, "--overwrite/--no-overwrite"),
    "progress": _flag("progress", bool, "--progress/--no-progress"),
}
MODEL_FLAGS: dict[str, Flag] = {
    "model": _flag("policy.model_name_or_path", str, "--model", "-m"),
    "model_revision": _flag("policy.revision", str, "--model-revision"),
    "device": _flag("policy.device", str, "--device"),
    "dtype": _flag("policy.dtype", str, "--dtype"),
    "model_batch_size": _flag("policy.batch_size", int, "--model-batch-size"),
    "prefix_cache_tokens": _flag("policy.prefix_cache_tokens", int, "--prefix-cache-tokens"),
    "max_context": _flag("policy.max_context", int, "--max-context"),
    "chat_format": _flag("policy.chat_format", str, "--chat-format"),
    "trust_remote_code": _flag("policy.trust_remote_code", bool, "--trust-remote-code/--no-trust-remote-code"),
    "backend": _flag("policy.backend", str, "--backend"),
    "base_url": _flag("policy.base_url", str, "--base-url"),
    "api_key_env": _flag("policy.api_key_env", str, "--api-key-env"),
    "max_concurrency": _flag("policy.max_concurrency", int, "--max-concurrency"),
    "max_retries": _flag("policy.max_retries", int, "--max-retries"),
    "request_timeout": _flag("policy.request_timeout", float, "--request-timeout"),
    "logprobs_mode": _flag("policy.logprobs_mode", str, "--logprobs-mode"),
    "tokenizer": _flag("policy.tokenizer", str, "--tokenizer"),
    "extra_body": _flag("policy.extra_body", str, "--extra-body"),
    "tensor_parallel_size": _flag("policy.tensor_parallel_size", int, "--tensor-parallel-size", "--tp"),
    "gpu_memory_utilization": _flag("policy.gpu_memory_utilization", float, "--gpu-memory-utilization"),
    "enable_prefix_caching": _flag("policy.enable_prefix_caching", bool,
                                   "--enable-prefix-caching/--no-enable-prefix-caching"),
}
#: Distributed generation (critique, sample-pairs, label) over Ray actors.
RAY_FLAGS: dict[str, Flag] = {
    "ray_workers": _flag("ray.workers", int, "--ray-workers"),
    "ray_address": _flag("ray.address", str, "--ray-address"),
    "ray_gpus_per_worker": _flag("ray.num_gpus_per_worker", float, "--ray-gpus-per-worker"),
    "ray_cpus_per_worker": _flag("ray.num_cpus_per_worker", float, "--ray-cpus-per-worker"),
    "ray_batch_size": _flag("ray.batch_size", int, "--ray-batch-size"),
}
PROMPT_FLAGS: dict[str, Flag] = {
    "prompts": _flag("prompts.path", str, "--prompts", "-p"),
    "prompts_format": _flag("prompts.format", str, "--prompts-format"),
    "prompts_field": _flag("prompts.field", str, "--prompts-field"),
    "prompts_split": _flag("prompts.split", str, "--prompts-split"),
    "prompts_subset": _flag("prompts.subset", str, "--prompts-subset"),
    "prompts_data_dir": _flag("prompts.data_dir", str, "--prompts-data-dir"),
    "limit": _flag("prompts.limit", int, "--limit"),
}
CRITIQUE_FLAGS: dict[str, Flag] = {
    "rounds": _flag("critique.n_rounds", int, "--rounds", "-n"),
    "few_shot": _flag("critique.few_shot", int, "--few-shot"),
    "skip_critique": _flag("critique.skip_critique", bool, "--skip-critique/--with-critique"),
    "batch_size": _flag("critique.batch_size", int, "--batch-size"),
    "max_new_tokens": _flag("critique.generation.max_new_tokens", int, "--max-new-tokens"),
    "temperature": _flag("critique.generation.temperature", float, "--temperature"),
    "top_p": _flag("critique.generation.top_p", float, "--top-p"),
    "top_k": _flag("critique.generation.top_k", int, "--top-k"),
    "stop": _flag("critique.generation.stop", list[str], "--stop"),
}
EXPORT_FLAGS: dict[str, Flag] = {
    "revisions": _flag("sft_export.revisions", str, "--revisions"),
    "helpful": _flag("sft_export.helpful.path", str, "--helpful"),
    "helpful_fraction": _flag("sft_export.helpful_fraction", float, "--helpful-fraction"),
    "drop_truncated": _flag("sft_export.drop_truncated", bool, "--drop-truncated/--keep-truncated"),
}


PAIRS_FLAGS: dict[str, Flag] = {
    "n_responses": _flag("pairs.n_responses", int, "--n-responses"),
    "pairs_batch_size": _flag("pairs.batch_size", int, "--pairs-batch-size"),
    "pairs_max_new_tokens": _flag("pairs.generation.max_new_tokens", int, "--pairs-max-new-tokens"),
    "pairs_temperature": _flag("pairs.generation.temperature", float, "--pairs-temperature"),
}
FEEDBACK_FLAGS: dict[str, Flag] = {
    "feedback_model": _flag("feedback.model.model_name_or_path", str, "--feedback-model"),
    "principles": _flag("feedback.principles", str, "--principles"),
    "k": _flag("feedback.k", int, "--k"),
    "both_orders": _flag("feedback.both_orders", bool, "--both-orders/--one-order"),
    "feedback_few_shot": _flag("feedback.few_shot", int, "--feedback-few-shot"),
    "feedback_few_shot_blocks": _flag("feedback.few_shot_blocks", int, "--feedback-few-shot-blocks"),
    "chain_of_thought": _flag("feedback.chain_of_thought", bool, "--chain-of-thought/--no-chain-of-thought"),
    "clamp": _flag("feedback.clamp", tuple[float, float], "--clamp"),
    "feedback_batch_size": _flag("feedback.batch_size", int, "--feedback-batch-size"),
}
PM_FLAGS: dict[str, Flag] = {
    "pm_model": _flag("pm.model_name_or_path", str, "--pm-model"),
    "pm_data": _flag("pm.sources", list[str], "--pm-data"),
    "pm_eval_data": _flag("pm.eval_sources", list[str], "--pm-eval-data"),
    "eval_fraction": _flag("pm.eval_fraction", float, "--eval-fraction"),
    "max_length": _flag("pm.max_length", int, "--max-length"),
    "learning_rate": _flag("pm.learning_rate", float, "--learning-rate", "--lr"),
    "epochs": _flag("pm.num_train_epochs", float, "--epochs"),
    "pm_batch_size": _flag("pm.per_device_train_batch_size", int, "--pm-batch-size"),
    "grad_accum": _flag("pm.gradient_accumulation_steps", int, "--gradient-accumulation-steps"),
    "lr_scheduler": _flag("pm.lr_scheduler_type", str, "--lr-scheduler"),
    "warmup_ratio": _flag("pm.warmup_ratio", float, "--warmup-ratio"),
    "weight_decay": _flag("pm.weight_decay", float, "--weight-decay"),
    "center_rewards": _flag("pm.center_rewards_coefficient", float, "--center-rewards"),
    "group_by_length": _flag("pm.group_by_length", bool, "--group-by-length/--no-group-by-length"),
    "bf16": _flag("pm.bf16", bool, "--bf16/--no-bf16"),
    "disable_dropout": _flag("pm.disable_dropout", bool, "--disable-dropout/--keep-dropout"),
    "gradient_checkpointing": _flag("pm.gradient_checkpointing", bool,
                                    "--gradient-checkpointing/--no-gradient-checkpointing"),
    "lora_r": _flag("pm.lora.r", int, "--lora-r"),
    "pm_device": _flag("pm.device", str, "--pm-device"),
    "logging_steps": _flag("pm.logging_steps", int, "--logging-steps"),
    "save_steps": _flag("pm.save_steps", int, "--save-steps"),
    "report_to": _flag("pm.report_to", list[str], "--report-to"),
    "score_batch_size": _flag("pm.batch_size", int, "--score-batch-size"),
}
EVAL_PM_FLAGS: dict[str, Flag] = {
    "pm": _flag("eval_pm.model", str, "--pm"),
    "eval_data": _flag("eval_pm.data", list[str], "--eval-data"),
    "pm_bins": _flag("eval_pm.n_bins", int, "--bins"),
    "pm_device": _flag("pm.device", str, "--pm-device"),
    "score_batch_size": _flag("pm.batch_size", int, "--score-batch-size"),
}
SERVE_PM_FLAGS: dict[str, Flag] = {
    "pm": _flag("serve_pm.model", str, "--pm"),
    "host": _flag("serve_pm.host", str, "--host"),
    "port": _flag("serve_pm.port", int, "--port"),
    "pm_device": _flag("pm.device", str, "--pm-device"),
    "score_batch_size": _flag("pm.batch_size", int, "--score-batch-size"),
}
def _training_flags(section: str, prefix: str) -> dict[str, Flag]:
    """The TrainingArguments-style flags of one training section (``--sft-lr``, ``--rl-epochs``...)."""
    dash = prefix.replace("_", "-")
    return {
        f"{prefix}_learning_rate": _flag(f"{section}.learning_rate", float, f"--{dash}-lr"),
        f"{prefix}_epochs": _flag(f"{section}.num_train_epochs", float, f"--{dash}-epochs"),
        f"{prefix}_train_batch_size": _flag(f"{section}.per_device_train_batch_size", int,
                                            f"--{dash}-train-batch-size"),
        f"{prefix}_grad_accum": _flag(f"{section}.gradient_accumulation_steps", int, f"--{dash}-grad-accum"),
        f"{prefix}_max_length": _flag(f"{section}.max_length", int, f"--{dash}-max-length"),
        f"{prefix}_lora_r": _flag(f"{section}.lora.r", int, f"--{dash}-lora-r"),
        f"{prefix}_bf16": _flag(f"{section}.bf16", bool, f"--{dash}-bf16/--no-{dash}-bf16"),
        f"{prefix}_device": _flag(f"{section}.device", str, f"--{dash}-device"),
        f"{prefix}_save_steps": _flag(f"{section}.save_steps", int, f"--{dash}-save-steps"),
        f"{prefix}_logging_steps": _flag(f"{section}.logging_steps", int, f"--{dash}-logging-steps"),
        f"{prefix}_report_to": _flag(f"{section}.report_to", list[str], f"--{dash}-report-to"),
    }


SFT_FLAGS: dict[str, Flag] = {
    "sft_model": _flag("sft.model_name_or_path", str, "--sft-model"),
    "sft_data": _flag("sft.data", list[str], "--sft-data"),
    **_training_flags("sft", "sft"),
}
RL_FLAGS: dict[str, Flag] = {
    "algo": _flag("rl.algo", str, "--algo"),
    "rl_policy": _flag("rl.policy", str, "--policy"),
    "reward_model": _flag("rl.reward_model", str, "--reward-model"),
    "value_model": _flag("rl.value_model", str, "--value-model"),
    "total_steps": _flag("rl.total_steps", int, "--total-steps"),
    "rollout_batch_size": _flag("rl.batch_size", int, "--rollout-batch-size"),
    "num_mini_batches": _flag("rl.num_mini_batches", int, "--num-mini-batches"),
    "ppo_epochs": _flag("rl.ppo_epochs", int, "--ppo-epochs"),
    "num_generations": _flag("rl.num_generations", int, "--num-generations"),
    "rl_max_new_tokens": _flag("rl.max_new_tokens", int, "--rl-max-new-tokens"),
    "kl_coef": _flag("rl.kl_coef", float, "--kl-coef"),
    "kl_target": _flag("rl.kl_target", float, "--kl-target"),
    "vf_coef": _flag("rl.vf_coef", float, "--vf-coef"),
    "missing_eos_penalty": _flag("rl.missing_eos_penalty", float, "--missing-eos-penalty"),
    "normalize_reward": _flag("rl.normalize_reward", bool, "--normalize-reward/--no-normalize-reward"),
    "rl_learning_rate": _flag("rl.learning_rate", float, "--rl-lr"),
    "rl_lora_r": _flag("rl.lora.r", int, "--rl-lora-r"),
    "rl_device": _flag("rl.device", str, "--rl-device"),
    "rl_save_steps": _flag("rl.save_steps", int, "--rl-save-steps"),
    "rl_report_to": _flag("rl.report_to", list[str], "--rl-report-to"),
}
DPO_FLAGS: dict[str, Flag] = {
    "dpo_policy": _flag("dpo.policy", str, "--policy"),
    "dpo_data": _flag("dpo.data", list[str], "--dpo-data"),
    "beta": _flag("dpo.beta", float, "--beta"),
    **_training_flags("dpo", "dpo"),
}
ELO_FLAGS: dict[str, Flag] = {
    "eval_model": _flag("eval.models", list[str], "--eval-model"),
    "judge": _flag("eval.judge", str, "--judge"),
    "harmless_prompts": _flag("eval.harmless_prompts.path", str, "--harmless-prompts"),
    "helpful_prompts": _flag("eval.helpful_prompts.path", str, "--helpful-prompts"),
    "prompts_per_set": _flag("eval.limit", int, "--prompts-per-set"),
    "eval_max_new_tokens": _flag("eval.generation.max_new_tokens", int, "--eval-max-new-tokens"),
    "bootstrap": _flag("eval.bootstrap", int, "--bootstrap"),
}
EVAL_FLAGS: dict[str, Flag] = {
    "data": _flag("eval_labeler.data", str, "--data"),
    "data_format": _flag("eval_labeler.format", str, "--data-format"),
    "eval_limit": _flag("eval_labeler.limit", int, "--eval-limit"),
    "bins": _flag("eval_labeler.n_bins", int, "--bins"),
}


def _field_help(path: str) -> str:
    """The description of a config field, found by walking the pydantic models."""
    model: Any = RunConfig
    info = None
    for part in path.split("."):
        info = model.model_fields[part]
        annotation = info.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next((c for c in candidates if hasattr(c, "model_fields")), None)
    description = (info.description or "") if info else ""
    return f"{description} [config: {path}]".strip()


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors reach the user as one line, never a traceback from deep inside a library.

    A :class:`CAIError` says what to fix (exit 2). Anything else is unexpected: one line naming it,
    and ``CAI_DEBUG=1`` shows the traceback for a bug report (exit 1).
    """
    try:
        yield
    except CAIError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: run the same command again to resume where it stopped")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, click.exceptions.ClickException):
        raise
    except Exception as exc:
        if os.environ.get("CAI_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {first_line(exc)} "
                      "(rerun with CAI_DEBUG=1 for the traceback and report it)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _build_command(func: Callable[[RunConfig], Any], flags: dict[str, Flag]) -> Callable[..., Any]:
    """Give ``func(config)`` a CLI signature made from ``flags`` plus ``--config``."""

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config", None)
        overrides = {flags[k].path: v for k, v in kwargs.items() if v is not None}
        with user_errors():
            base = RunConfig.from_yaml(config_file) if config_file else RunConfig()
            func(base.with_overrides(overrides) if overrides else base)

    params = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (RunConfig).")],  # noqa: UP045
    )]
    for name, flag in flags.items():
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[flag.type], typer.Option(*flag.decls, help=_field_help(flag.path))],  # noqa: UP045
        ))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = func.__doc__
    return command


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Constitutional AI: align a language model with a written constitution.")
constitution_app = typer.Typer(no_args_is_help=True, help="Inspect, validate and convert constitutions.")
app.add_typer(constitution_app, name="constitution")


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    from constitutional_ai.training.common import is_main_process

    if not is_main_process():  # under accelerate launch every rank finishes; one table is enough
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


def critique(config: RunConfig) -> None:
    """SL-CAI data: initial responses, then rounds of critique and revision, resumable."""
    from constitutional_ai.stages.critique import run_critique

    _print_summary("critique", run_critique(config).as_dict())


def export_sft(config: RunConfig) -> None:
    """Export critique records as conversational SFT data (TRL ``messages`` format)."""
    from constitutional_ai.data.export import critique_to_sft
    from constitutional_ai.stages.critique import stage_dir

    result = critique_to_sft(stage_dir(config) / "records.jsonl", Path(config.output_dir) / "sft" / "train.jsonl",
                             config.sft_export, seed=config.seed)
    _print_summary("export-sft", result.as_dict())


def sample_pairs(config: RunConfig) -> None:
    """RL-CAI: sample K responses per prompt from the policy and pair them, resumable."""
    from constitutional_ai.stages.feedback import run_sample_pairs

    _print_summary("sample-pairs", run_sample_pairs(config).as_dict())


def label(config: RunConfig) -> None:
    """RL-CAI: soft preference labels from the feedback model under the constitution, resumable."""
    from constitutional_ai.stages.feedback import run_label

    _print_summary("label", run_label(config).as_dict())


def export_preferences(config: RunConfig) -> None:
    """Export labels as a TRL preference dataset (prompt/chosen/rejected messages + p_chosen)."""
    from constitutional_ai.stages.feedback import LABELS, labels_to_preferences, stage_path

    out = Path(config.output_dir) / "preferences" / "train.jsonl"
    n = labels_to_preferences(stage_path(config, LABELS) / "records.jsonl", out)
    _print_summary("export-preferences", {"output": str(out), "pairs": n})


def eval_labeler(config: RunConfig) -> None:
    """Measure a feedback configuration on data with known answers: accuracy, ECE, reliability, bias."""
    from constitutional_ai.stages.eval_labeler import run_eval_labeler

    _print_summary("eval-labeler", run_eval_labeler(config).as_dict())


def train_pm(config: RunConfig) -> None:
    """Train a preference model (Bradley-Terry, soft labels) on mixed preference sources."""
    from constitutional_ai.stages.preference_model import run_train_pm

    result = run_train_pm(config)
    _print_summary("train-pm", result.extra)


def eval_pm(config: RunConfig) -> None:
    """Measure a preference model on held-out pairs: accuracy, margin, calibration (JSON + PNG)."""
    from constitutional_ai.stages.preference_model import run_eval_pm

    result = run_eval_pm(config)
    _print_summary("eval-pm", {"output": str(result.output), **result.extra})


def serve_pm(config: RunConfig) -> None:
    """Serve a preference model over HTTP for OpenRLHF's --remote_rm_url (POST /get_reward)."""
    from constitutional_ai.preference_model.server import RewardServer
    from constitutional_ai.stages.preference_model import trained_pm

    scorer = trained_pm(config, config.serve_pm.model, "--pm", config.pm.device)
    server = RewardServer(scorer, config.serve_pm.host, config.serve_pm.port)
    console.print(f"serving {scorer.name} at {server.url} (OpenRLHF: --remote_rm_url {server.url})", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()


def sft(config: RunConfig) -> None:
    """SL-CAI: fine-tune the policy on the exported revisions (TRL SFTTrainer, full or LoRA)."""
    from constitutional_ai.stages.sft import run_sft

    _print_summary("sft", run_sft(config).extra)


def ppo(config: RunConfig) -> None:
    """RL-CAI: train the policy against the preference model (--algo ppo: ours; rloo, grpo: TRL)."""
    from constitutional_ai.stages.rl import run_rl

    _print_summary("ppo", run_rl(config).extra)


def dpo(config: RunConfig) -> None:
    """DPO on the AI preference pairs (TRL DPOTrainer), the alternative to a PM plus RL."""
    from constitutional_ai.stages.dpo import run_dpo

    _print_summary("dpo", run_dpo(config).extra)


def evaluate(config: RunConfig) -> None:
    """Elo of checkpoints (initial, SL-CAI, RL-CAI...) on red-team and helpfulness prompts, judged by the PM."""
    from constitutional_ai.stages.eval import run_eval

    result = run_eval(config)
    _print_summary("eval", {"output": str(result.output), **{f"{k}_elo": v for k, v in result.extra.items()}})


def run(config: RunConfig) -> None:
    """The whole pipeline on one config: critique, SFT, pairs, labels, PM, RL, evaluation, report.
    Complete and unchanged stages are skipped; changed ones run again; an interrupted one resumes."""
    from constitutional_ai.stages.pipeline import run_pipeline

    summary = run_pipeline(config, progress=lambda line: console.print(f"[bold]cai run[/] {line}", highlight=False))
    _print_summary("run", {name: ("skipped (unchanged)" if s["skipped"] else f"{s['seconds']} s")
                           for name, s in summary.items() if isinstance(s, dict)} | {"report": summary["report"]})


STAGE_FLAGS = {**COMMON_FLAGS, **MODEL_FLAGS, **PROMPT_FLAGS}
GENERATION_FLAGS = {**STAGE_FLAGS, **RAY_FLAGS}
#: Command name -> (function, flags). Tests check every flag maps onto a real config field.
COMMANDS: dict[str, tuple[Callable[[RunConfig], Any], dict[str, Flag]]] = {
    "critique": (critique, {**GENERATION_FLAGS, **CRITIQUE_FLAGS}),
    "export-sft": (export_sft, {"output_dir": COMMON_FLAGS["output_dir"], "seed": COMMON_FLAGS["seed"],
                                **EXPORT_FLAGS}),
    "sample-pairs": (sample_pairs, {**GENERATION_FLAGS, **PAIRS_FLAGS}),
    "label": (label, {**GENERATION_FLAGS, **PAIRS_FLAGS, **FEEDBACK_FLAGS}),
    "export-preferences": (export_preferences, {"output_dir": COMMON_FLAGS["output_dir"]}),
    "eval-labeler": (eval_labeler, {**COMMON_FLAGS, **MODEL_FLAGS, **FEEDBACK_FLAGS, **EVAL_FLAGS}),
    "train-pm": (train_pm, {**COMMON_FLAGS, **PM_FLAGS}),
    "eval-pm": (eval_pm, {"output_dir": COMMON_FLAGS["output_dir"], "seed": COMMON_FLAGS["seed"],
                          "pm_data": PM_FLAGS["pm_data"], "eval_fraction": PM_FLAGS["eval_fraction"],
                          **EVAL_PM_FLAGS}),
    "sft": (sft, {**COMMON_FLAGS, **SFT_FLAGS}),
    "ppo": (ppo, {**COMMON_FLAGS, **PROMPT_FLAGS, **RL_FLAGS}),
    "dpo": (dpo, {**COMMON_FLAGS, **DPO_FLAGS}),
    "eval": (evaluate, {**COMMON_FLAGS, **MODEL_FLAGS, **ELO_FLAGS}),
    "serve-pm": (serve_pm, {"output_dir": COMMON_FLAGS["output_dir"], **SERVE_PM_FLAGS}),
    "run": (run, {**GENERATION_FLAGS, **CRITIQUE_FLAGS, **EXPORT_FLAGS, **PAIRS_FLAGS, **FEEDBACK_FLAGS, **PM_FLAGS,
                  **{k: v for k, v in SFT_FLAGS.items() if k != "sft_model"}, **RL_FLAGS, **ELO_FLAGS}),
}
for _name, (_func, _flags) in COMMANDS.items():
    app.command(_name, help=_func.__doc__)(_build_command(_func, _flags))


@app.command("report")
def report(run_dir: Annotated[Path, typer.Argument(help="A run's --output-dir.")] = Path("runs/default")) -> None:
    """Rebuild a run's HTML report and Markdown summary from what is in its directory."""
    from constitutional_ai.report.build import build_report

    with user_errors():
        path = build_report(run_dir)
    console.print(f"wrote {path} and {path.with_name('report.md')}", highlight=False)


@app.command("config")
def show_config(output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here.")] = None,  # noqa: UP045
                ) -> None:
    """Print (or write) the default config as YAML, to start your own from."""
    text = RunConfig().to_yaml(output)
    if output is None:
        sys.stdout.write(text)


def _load_constitution(spec: str) -> Any:
    from constitutional_ai.constitution import Constitution

    with user_errors():
        return Constitution.load(spec)


@constitution_app.command("validate")
def constitution_validate(spec: Annotated[str, typer.Argument(help="File, 'default' or anthropic-paper:DIR.")]) -> None:
    """Check a constitution and print its size and hash."""
    c = _load_constitution(spec)
    console.print(f"[green]ok[/] {c.name} v{c.version}: {len(c.critique_revision)} critique/revision pairs, "
                  f"{len(c.comparison)} comparison principles, {len(c.critique_examples)} critique examples, "
                  f"{len(c.feedback_examples)} feedback examples; {c.hash}", highlight=False)


@constitution_app.command("hash")
def constitution_hash(spec: Annotated[str, typer.Argument(help="File, 'default' or anthropic-paper:DIR.")]) -> None:
    """Print the content hash recorded in every artifact made with this constitution."""
    sys.stdout.write(_load_constitution(spec).hash + "\n")


@constitution_app.command("show")
def constitution_show(spec: Annotated[str, typer.Argument(help="File, 'default' or anthropic-paper:DIR.")] = "default",
                      ) -> None:
    """Print a constitution as YAML."""
    import yaml

    sys.stdout.write(yaml.safe_dump(_load_constitution(spec).model_dump(mode="json"), sort_keys=False,
                                    allow_unicode=True, width=100))


@constitution_app.command("convert")
def constitution_convert(spec: Annotated[str, typer.Argument(help="File, 'default' or anthropic-paper:DIR.")],
                         output: Annotated[Path, typer.Argument(help="Output .yaml or .json file.")]) -> None:
    """Convert a constitution (for example the paper's JSON files) to our YAML or JSON format."""
    c = _load_constitution(spec)
    with user_errors():
        c.save(str(output))
    console.print(f"wrote {output} ({c.hash})", highlight=False)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
