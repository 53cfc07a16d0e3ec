"""The ``cai`` command line, generated from the config and the stage registry.

Every field of :class:`~constitutional_ai.config.RunConfig` is a flag named by its dotted path
(``--critique.n_rounds 2``, ``--feedback.both_orders``), with the field's description and default
as its help; a command offers the fields of the sections its stage declares, and ``cai run``
offers them all. Flags override ``--config FILE``. :data:`ALIASES` keeps the short names people
type; nothing else in this file knows a field or a stage by name, so a new knob or a new stage
needs no edit here.
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
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import click
import typer
from pydantic import BaseModel
from rich.table import Table
from typer.core import TyperCommand

from constitutional_ai.common.errors import CAIError, first_line
from constitutional_ai.common.progress import console
from constitutional_ai.config import UNSET_SECTION_DEFAULTS, RunConfig

#: Short names of fields (every flag of earlier releases, so existing commands keep working):
#: ``flag -> candidate dotted paths``. A command gets the alias when one of the candidates is among
#: its flags (the first such candidate wins): ``--policy`` is ``rl.policy`` on ``cai ppo`` and
#: ``dpo.policy`` on ``cai dpo``.
ALIASES: dict[str, tuple[str, ...]] = {
    "--enable-prefix-caching": ("policy.enable_prefix_caching",),
    "--gradient-checkpointing": ("pm.gradient_checkpointing",),
    "--output-dir": ("output_dir",), "-o": ("output_dir",), "-v": ("verbose",),
    "--model": ("policy.model_name_or_path",),
    "-m": ("policy.model_name_or_path",), "--model-revision": ("policy.revision",), "--device": ("policy.device",),
    "--dtype": ("policy.dtype",), "--model-batch-size": ("policy.batch_size",),
    "--prefix-cache-tokens": ("policy.prefix_cache_tokens",), "--max-context": ("policy.max_context",),
    "--generation-cache-tokens": ("policy.generation_cache_tokens",),
    "--chat-format": ("policy.chat_format",), "--trust-remote-code": ("policy.trust_remote_code",),
    "--backend": ("policy.backend",), "--base-url": ("policy.base_url",), "--api-key-env": ("policy.api_key_env",),
    "--max-concurrency": ("policy.max_concurrency",), "--max-retries": ("policy.max_retries",),
    "--request-timeout": ("policy.request_timeout",), "--logprobs-mode": ("policy.logprobs_mode",),
    "--tokenizer": ("policy.tokenizer",), "--extra-body": ("policy.extra_body",),
    "--tensor-parallel-size": ("policy.tensor_parallel_size",), "--tp": ("policy.tensor_parallel_size",),
    "--gpu-memory-utilization": ("policy.gpu_memory_utilization",), "--ray-workers": ("ray.workers",),
    "--ray-address": ("ray.address",), "--ray-gpus-per-worker": ("ray.num_gpus_per_worker",),
    "--ray-cpus-per-worker": ("ray.num_cpus_per_worker",), "--ray-batch-size": ("ray.batch_size",),
    "--prompts": ("prompts.path",), "-p": ("prompts.path",), "--prompts-format": ("prompts.format",),
    "--prompts-field": ("prompts.field",), "--prompts-split": ("prompts.split",),
    "--prompts-subset": ("prompts.subset",), "--prompts-data-dir": ("prompts.data_dir",),
    "--limit": ("prompts.limit",), "--rounds": ("critique.n_rounds",), "-n": ("critique.n_rounds",),
    "--few-shot": ("critique.few_shot",), "--skip-critique": ("critique.skip_critique",),
    "--batch-size": ("critique.batch_size",), "--max-new-tokens": ("critique.generation.max_new_tokens",),
    "--temperature": ("critique.generation.temperature",), "--top-p": ("critique.generation.top_p",),
    "--top-k": ("critique.generation.top_k",), "--stop": ("critique.generation.stop",),
    "--revisions": ("sft_export.revisions",), "--helpful": ("sft_export.helpful.path",),
    "--helpful-fraction": ("sft_export.helpful_fraction",), "--drop-truncated": ("sft_export.drop_truncated",),
    "--n-responses": ("pairs.n_responses",), "--pairs-batch-size": ("pairs.batch_size",),
    "--pairs-max-new-tokens": ("pairs.generation.max_new_tokens",),
    "--pairs-temperature": ("pairs.generation.temperature",),
    "--feedback-model": ("feedback.model.model_name_or_path",), "--principles": ("feedback.principles",),
    "--k": ("feedback.k",), "--both-orders": ("feedback.both_orders",),
    "--feedback-few-shot": ("feedback.few_shot",), "--feedback-few-shot-blocks": ("feedback.few_shot_blocks",),
    "--chain-of-thought": ("feedback.chain_of_thought",), "--clamp": ("feedback.clamp",),
    "--feedback-batch-size": ("feedback.batch_size",), "--pm-model": ("pm.model_name_or_path",),
    "--pm-data": ("pm.sources",), "--pm-eval-data": ("pm.eval_sources",), "--eval-fraction": ("pm.eval_fraction",),
    "--max-length": ("pm.max_length",), "--learning-rate": ("pm.learning_rate",), "--lr": ("pm.learning_rate",),
    "--epochs": ("pm.num_train_epochs",), "--pm-batch-size": ("pm.per_device_train_batch_size",),
    "--gradient-accumulation-steps": ("pm.gradient_accumulation_steps",),
    "--lr-scheduler": ("pm.lr_scheduler_type",), "--warmup-ratio": ("pm.warmup_ratio",),
    "--weight-decay": ("pm.weight_decay",), "--center-rewards": ("pm.center_rewards_coefficient",),
    "--group-by-length": ("pm.group_by_length",), "--padding-free": ("pm.padding_free",), "--bf16": ("pm.bf16",),
    "--disable-dropout": ("pm.disable_dropout",), "--lora-r": ("pm.lora.r",), "--pm-device": ("pm.device",),
    "--logging-steps": ("pm.logging_steps",), "--save-steps": ("pm.save_steps",), "--report-to": ("pm.report_to",),
    "--score-batch-size": ("pm.batch_size",), "--pm": ("eval_pm.model", "serve_pm.model"),
    "--eval-data": ("eval_pm.data",), "--bins": ("eval_pm.n_bins", "eval_labeler.n_bins"),
    "--host": ("serve_pm.host",), "--port": ("serve_pm.port",), "--sft-model": ("sft.model_name_or_path",),
    "--sft-data": ("sft.data",), "--algo": ("rl.algo",), "--policy": ("rl.policy", "dpo.policy"),
    "--reward-model": ("rl.reward_model",), "--value-model": ("rl.value_model",),
    "--total-steps": ("rl.total_steps",), "--rollout-batch-size": ("rl.batch_size",),
    "--num-mini-batches": ("rl.num_mini_batches",), "--ppo-epochs": ("rl.ppo_epochs",),
    "--num-generations": ("rl.num_generations",), "--rl-max-new-tokens": ("rl.max_new_tokens",),
    "--kl-coef": ("rl.kl_coef",), "--kl-target": ("rl.kl_target",), "--vf-coef": ("rl.vf_coef",),
    "--missing-eos-penalty": ("rl.missing_eos_penalty",), "--normalize-reward": ("rl.normalize_reward",),
    "--rl-lr": ("rl.learning_rate",), "--rl-lora-r": ("rl.lora.r",), "--rl-device": ("rl.device",),
    "--rl-save-steps": ("rl.save_steps",), "--rl-report-to": ("rl.report_to",), "--dpo-data": ("dpo.data",),
    "--beta": ("dpo.beta",), "--eval-model": ("eval.models",), "--judge": ("eval.judge",),
    "--harmless-prompts": ("eval.harmless_prompts.path",), "--helpful-prompts": ("eval.helpful_prompts.path",),
    "--prompts-per-set": ("eval.limit",), "--eval-max-new-tokens": ("eval.generation.max_new_tokens",),
    "--bootstrap": ("eval.bootstrap",), "--data": ("eval_labeler.data",), "--data-format": ("eval_labeler.format",),
    "--eval-limit": ("eval_labeler.limit",), "--sft-lr": ("sft.learning_rate",),
    "--sft-epochs": ("sft.num_train_epochs",), "--sft-train-batch-size": ("sft.per_device_train_batch_size",),
    "--sft-grad-accum": ("sft.gradient_accumulation_steps",), "--sft-max-length": ("sft.max_length",),
    "--sft-lora-r": ("sft.lora.r",), "--sft-device": ("sft.device",), "--sft-save-steps": ("sft.save_steps",),
    "--sft-logging-steps": ("sft.logging_steps",), "--sft-report-to": ("sft.report_to",),
    "--sft-bf16": ("sft.bf16",), "--dpo-lr": ("dpo.learning_rate",), "--dpo-epochs": ("dpo.num_train_epochs",),
    "--dpo-train-batch-size": ("dpo.per_device_train_batch_size",),
    "--dpo-grad-accum": ("dpo.gradient_accumulation_steps",), "--dpo-max-length": ("dpo.max_length",),
    "--dpo-lora-r": ("dpo.lora.r",), "--dpo-device": ("dpo.device",), "--dpo-save-steps": ("dpo.save_steps",),
    "--dpo-logging-steps": ("dpo.logging_steps",), "--dpo-report-to": ("dpo.report_to",),
    "--dpo-bf16": ("dpo.bf16",), "--iterations": ("rl.iterations",), "--reward": ("rl.reward",),
    "--feedback-reward": ("rl.feedback_reward",), "--new-data-weight": ("pm.new_data_weight",),
    "--push-to-hub": ("hub.push_to_hub",),
}
#: Off-switch spellings of the boolean aliases (``--keep-dropout`` turns ``pm.disable_dropout`` off).
OFF_ALIASES: dict[str, str] = {
    "--enable-prefix-caching": "--no-enable-prefix-caching", "--gradient-checkpointing": "--no-gradient-checkpointing",
    "--trust-remote-code": "--no-trust-remote-code", "--skip-critique": "--with-critique",
    "--drop-truncated": "--keep-truncated", "--both-orders": "--one-order",
    "--chain-of-thought": "--no-chain-of-thought", "--group-by-length": "--no-group-by-length",
    "--padding-free": "--no-padding-free",
    "--bf16": "--no-bf16", "--disable-dropout": "--keep-dropout", "--normalize-reward": "--no-normalize-reward",
    "--sft-bf16": "--no-sft-bf16", "--dpo-bf16": "--no-dpo-bf16",
}


@dataclass(frozen=True)
class Field:
    """One leaf of the config as a flag: its dotted path, the type the command line parses, its help."""

    path: str
    type: Any
    help: str
    is_bool: bool
    choices: tuple[str, ...] | None = None

    @property
    def param(self) -> str:
        return self.path.replace(".", "__")


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _submodel(annotation: Any) -> type[BaseModel] | None:
    inner = _strip_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _cli_type(annotation: Any) -> tuple[Any, tuple[str, ...] | None]:
    """What the command line parses for a field type; complex values travel as strings the
    config's own validators parse (a JSON object, ``PATH,key=value`` preference sources)."""
    inner = _strip_optional(annotation)
    origin = typing.get_origin(inner)
    if origin is Literal:
        return inner, tuple(str(a) for a in typing.get_args(inner))
    if origin is list:
        (item,) = typing.get_args(inner) or (str,)
        return list[item if item in (str, int, float) else str], None
    if origin is tuple:
        return inner, None
    if origin is dict or inner is dict:
        return str, None
    return (inner if inner in (str, int, float, bool) else str), None


def _default_text(value: Any) -> str:
    if isinstance(value, list):  # preference sources show as the strings one would pass
        value = [getattr(v, "path", v) for v in value]
    if value in (None, "", [], {}):
        return "unset" if value is None else "empty"
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def config_fields(model: type[BaseModel] = RunConfig, instance: Any = None, prefix: str = "",
                  unset: str = "") -> Iterator[Field]:
    """Every leaf field of the config (nested sections flattened into dotted paths). ``unset`` says
    what a field of an optional section that is unset by default falls back to."""
    instance = model() if instance is None and model is RunConfig else instance
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        default = getattr(instance, name, None) if instance is not None else info.get_default(call_default_factory=True)
        sub = _submodel(info.annotation)
        if sub is not None:
            inherited = UNSET_SECTION_DEFAULTS.get(path)
            note = unset or ("" if default is not None else
                             f"as {inherited} while {path} is unset" if inherited else
                             f"{path} is unset (off); setting a field turns it on")
            yield from config_fields(sub, default if isinstance(default, sub) else None, f"{path}.", note)
            continue
        cli_type, choices = _cli_type(info.annotation)
        description = (info.description or "").rstrip(".")
        choice_text = f" ({'|'.join(choices)})" if choices else ""
        default_text = f"{_default_text(default)}; {unset}" if unset else _default_text(default)
        yield Field(path, cli_type, f"{description}{choice_text}. Default: {default_text}.", cli_type is bool, choices)


ALL_FIELDS: dict[str, Field] = {f.path: f for f in config_fields()}


def fields_for(sections: tuple[str, ...] | set[str], leave_out: frozenset[str] | set[str] = frozenset()) -> list[Field]:
    """The flags of a command reading ``sections``, less the fields in ``leave_out``."""
    return [f for f in ALL_FIELDS.values() if f.path.split(".")[0] in sections and f.path not in leave_out]


def _aliases(fields: list[Field]) -> dict[str, list[str]]:
    """``path -> alias flags`` for this command's fields."""
    paths = {f.path for f in fields}
    out: dict[str, list[str]] = {}
    for alias, candidates in ALIASES.items():
        target = next((c for c in candidates if c in paths), None)
        if target is not None:
            out.setdefault(target, []).append(alias)
    return out


def _option(field: Field, aliases: list[str]) -> Any:
    if field.is_bool:
        decls = [f"--{field.path}/--no-{field.path}",
                 *(f"{a}/{OFF_ALIASES[a]}" if a in OFF_ALIASES else a for a in aliases)]
    else:
        decls = [f"--{field.path}", *aliases]
    return typer.Option(*decls, help=field.help, show_default=False, show_choices=False)


class StageCommand(TyperCommand):
    """A command whose options list reads at 80 columns: each option's names on their own line(s),
    broken at ``/`` and ``,`` rather than cut, and its help wrapped beneath them."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        import textwrap

        rows = [p.get_help_record(ctx) for p in self.get_params(ctx)]
        width = max(40, (formatter.width or 80) - 2)
        with formatter.section("Options"):
            for names, text in (r for r in rows if r is not None):
                line = ""
                for part in names.replace(" / ", " /\0").replace(", ", ",\0").split("\0"):
                    if line and len(line) + 1 + len(part) > width - formatter.current_indent:
                        formatter.write_text(line)
                        line = "  " + part
                    else:
                        line = f"{line} {part}" if line else part
                formatter.write_text(line)
                for wrapped in textwrap.wrap(text or "", width - formatter.current_indent - 4, break_on_hyphens=False):
                    formatter.write_text("    " + wrapped)


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
    except OSError as exc:  # the machine said no (disk full, permissions, a missing folder): the user can fix it
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        reason = exc.strerror or first_line(exc)
        console.print(f"[bold red]error:[/] {where}{reason}; check the path, its permissions and free disk space",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        if os.environ.get("CAI_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {first_line(exc)} "
                      "(rerun with CAI_DEBUG=1 for the traceback and report it)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def build_command(func: Callable[[RunConfig], Any], fields: list[Field]) -> Callable[..., None]:
    """Give ``func(config)`` a CLI signature: ``--config`` plus one option per field."""
    by_param = {f.param: f for f in fields}

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config", None)
        overrides = {by_param[k].path: v for k, v in kwargs.items() if v is not None and v != ()}
        with user_errors():
            base = RunConfig.from_yaml(config_file) if config_file else RunConfig()
            config = base.with_overrides(overrides) if overrides else base
            from constitutional_ai.common.console_log import quiet_console
            from constitutional_ai.layout import RunLayout

            with quiet_console(RunLayout(config.output_dir).log, config.verbose):
                func(config)

    aliases = _aliases(fields)
    params = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see cai config).")],  # noqa: UP045
    )]
    for field in fields:
        params.append(inspect.Parameter(
            field.param, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[field.type], _option(field, aliases.get(field.path, []))],  # noqa: UP045
        ))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = func.__doc__
    return command


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 100},
                  help="Constitutional AI: align a language model with a written constitution.")
constitution_app = typer.Typer(no_args_is_help=True, help="Inspect, validate and convert constitutions.")
app.add_typer(constitution_app, name="constitution")


def print_summary(title: str, summary: dict[str, Any]) -> None:
    from constitutional_ai.training.common import is_main_process

    if not is_main_process():  # under accelerate launch every rank finishes; one table is enough
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


def _stage_command(name: str, help_text: str) -> Callable[[RunConfig], None]:
    """The stage is looked up when the command runs, so a replaced registration takes effect."""

    def run_stage(config: RunConfig) -> None:
        from constitutional_ai.stages import registry

        stage = registry.get(name)
        if stage.iterated and config.iteration > 1:  # `cai ppo --iteration 2`: wired as `cai run` wires rl@2
            from constitutional_ai.layout import RunLayout

            stage = registry.at_iteration(stage, config.iteration)
            config = stage.wire(config, RunLayout(config.output_dir)) if stage.wire is not None else config
        if config.hub.push_to_hub:  # a bad repo id or a missing token is refused before the work, not after
            from constitutional_ai.stages.export import check_stage_push

            check_stage_push(stage, config)
        result = stage.run(config)
        if result is not None:
            print_summary(stage.command, stage.summary(result) if stage.summary else result.as_dict())
        if config.hub.push_to_hub:
            from constitutional_ai.stages.export import push_produced

            for line in push_produced(stage, config):
                console.print(line, highlight=False, soft_wrap=True)

    run_stage.__doc__ = help_text
    return run_stage


def run(config: RunConfig) -> None:
    """The whole pipeline on one config: critique, SFT, pairs, labels, PM, RL, evaluation, report.
    Complete and unchanged stages are skipped; changed ones run again; an interrupted one resumes."""
    from constitutional_ai.common.progress import results
    from constitutional_ai.stages.pipeline import run_pipeline, summary_lines
    from constitutional_ai.training.common import is_main_process

    if config.hub.push_to_hub:  # a bad prefix or a missing token is refused before the work, not after it
        from constitutional_ai.artifacts import ARTIFACTS
        from constitutional_ai.artifacts.push import check_push

        check_push(config.hub, list(ARTIFACTS), prefix=True)
    summary = run_pipeline(config)
    if is_main_process():
        for line in summary_lines(summary):
            results.print(line, highlight=False, soft_wrap=True)
    if config.hub.push_to_hub:
        from constitutional_ai.stages.export import push_run

        for line in push_run(config):
            results.print(line, highlight=False, soft_wrap=True)


def register_commands() -> None:
    """One command per registered stage (pipeline order first, so ``cai --help`` reads like the
    pipeline), then ``cai run`` over every field."""
    from constitutional_ai.stages import registry

    ordered = registry.pipeline_order() + [s for s in registry.stages() if not s.pipeline]
    known = {c.name for c in app.registered_commands}
    for stage in ordered:
        if stage.command not in known:
            command = build_command(_stage_command(stage.name, stage.help), fields_for(stage.flag_sections))
            app.command(stage.command, help=stage.help, cls=StageCommand)(command)
    if "run" not in known:
        sections, wired = registry.pipeline_flags()
        app.command("run", help=run.__doc__, cls=StageCommand)(build_command(run, fields_for(sections, wired)))
    rank = {name: i for i, name in enumerate([*(s.command for s in ordered), "run"])}
    app.registered_commands.sort(key=lambda c: rank.get(c.name or "", len(rank)))


@app.command("report")
def report(run_dir: Annotated[Path, typer.Argument(help="A run's --output-dir.")] = Path("runs/default"),
           other: Annotated[Optional[Path], typer.Argument(  # noqa: UP045
               help="A second run's --output-dir: compare the two side by side.")] = None,
           output: Annotated[Optional[Path], typer.Option(  # noqa: UP045
               "--output", "-o", help="Where to write the comparison page; default: RUN_DIR/compare.html.")] = None,
           ) -> None:
    """Rebuild a run's HTML report and Markdown summary from what is in its directory; with a second
    run, write one page comparing them (constitution diff, config differences, metric deltas, answers)."""
    from constitutional_ai.stages import registry

    with user_errors():
        if other is None:
            from constitutional_ai.report.build import build_report

            path = build_report(run_dir, registry.report_sections())
            console.print(f"wrote {path} and {path.with_name('report.md')}", highlight=False)
        else:
            from constitutional_ai.report.compare import compare_runs

            path = compare_runs(run_dir, other, registry.report_sections(), output)
            console.print(f"wrote {path}", highlight=False)


@app.command("config")
def show_config(output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here.")] = None,  # noqa: UP045
                ) -> None:
    """Print (or write) the default config as YAML, each field's description as a comment."""
    text = RunConfig().to_commented_yaml()
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


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


register_commands()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
