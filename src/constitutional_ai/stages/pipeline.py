"""``cai run``: the paper's pipeline end to end, each stage skipped when it is complete and unchanged.

critique -> export-sft -> sft -> sample-pairs -> label -> export-preferences -> train-pm -> ppo ->
eval -> report, into one output directory with one sub-directory per stage. A stage's identity is
the hash of the config sections it reads and of the identities of the stages it reads from, kept
in ``pipeline.json``: a rerun skips stages whose identity is unchanged and complete, re-runs from
scratch those whose inputs changed (and, through the identities, everything after them), and
resumes a stage that was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import write_atomic

PIPELINE = "pipeline.json"


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections that change what it writes
    after: tuple[str, ...]  # stages whose output it reads
    run: Callable[[RunConfig], Any]


def _critique(config: RunConfig) -> Any:
    from constitutional_ai.stages.critique import run_critique

    return run_critique(config)


def _export_sft(config: RunConfig) -> Any:
    from constitutional_ai.data.export import critique_to_sft

    out = Path(config.output_dir)
    return critique_to_sft(out / "critique" / "records.jsonl", out / "sft" / "train.jsonl", config.sft_export,
                           seed=config.seed)


def _sft(config: RunConfig) -> Any:
    from constitutional_ai.stages.sft import run_sft

    return run_sft(config)


def _pairs(config: RunConfig) -> Any:
    from constitutional_ai.stages.feedback import run_sample_pairs

    return run_sample_pairs(config)


def _labels(config: RunConfig) -> Any:
    from constitutional_ai.stages.feedback import labels_to_preferences, run_label

    result = run_label(config)
    labels_to_preferences(result.output, Path(config.output_dir) / "preferences" / "train.jsonl")
    return result


def _pm(config: RunConfig) -> Any:
    from constitutional_ai.stages.preference_model import run_train_pm

    return run_train_pm(config)


def _rl(config: RunConfig) -> Any:
    from constitutional_ai.stages.rl import run_rl

    return run_rl(config)


def _eval(config: RunConfig) -> Any:
    from constitutional_ai.stages.eval import run_eval

    return run_eval(config)


STAGES = (
    Stage("critique", ("seed", "constitution", "policy", "prompts", "critique"), (), _critique),
    Stage("export_sft", ("seed", "sft_export"), ("critique",), _export_sft),
    Stage("sft", ("seed", "policy", "sft"), ("export_sft",), _sft),
    Stage("pairs", ("seed", "prompts", "pairs"), ("sft",), _pairs),
    Stage("labels", ("seed", "constitution", "feedback"), ("pairs",), _labels),
    Stage("pm", ("seed", "pm"), ("labels",), _pm),
    Stage("rl", ("seed", "prompts", "rl"), ("sft", "pm"), _rl),
    Stage("eval", ("seed", "eval"), ("sft", "rl", "pm"), _eval),
)


def stage_config(config: RunConfig) -> tuple[RunConfig, str]:
    """The pipeline's wiring: SFT fine-tunes the policy model, response pairs come from the SL-CAI
    model (as in the paper), and RL starts from it."""
    sft_dir = str(Path(config.output_dir) / "sft" / "model")
    return config.with_overrides({"sft.model_name_or_path": config.policy.model_name_or_path}), sft_dir


def check_models(config: RunConfig) -> None:
    """Every hub model the run will need, checked before the first stage: an id that is neither
    cached nor downloadable fails at once in one line, not half-way through the pipeline."""
    from constitutional_ai.backends.transformers_backend import check_hub_model
    from constitutional_ai.config import EMBEDDED_MODEL

    served = [m.model_name_or_path for m in (config.policy, config.feedback.model)
              if m is not None and m.backend == "openai"]  # a name the server knows, not a hub id
    names = [config.policy.model_name_or_path, config.pm.model_name_or_path, config.rl.policy,
             config.rl.reward_model, config.eval.judge, config.feedback.model.model_name_or_path
             if config.feedback.model else ""]
    names = [n for n in names if n not in served]
    for name in dict.fromkeys(n for n in names if n and n != EMBEDDED_MODEL):
        if not Path(name).expanduser().exists():
            check_hub_model(name, None)


def run_pipeline(config: RunConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) every stage; returns ``{stage: {identity, status, seconds, skipped}}``."""
    check_models(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.to_yaml(out / "config.yaml")
    state_file = out / PIPELINE
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    base, sft_dir = stage_config(config)
    identities: dict[str, str] = {}
    summary: dict[str, Any] = {}
    for stage in STAGES:
        blob = json.dumps([stage.name, base.fingerprint(stage.sections), [identities[a] for a in stage.after]])
        identity = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
        identities[stage.name] = identity
        previous = state.get(stage.name)
        if previous and previous["identity"] == identity and previous["status"] == "complete" and not config.overwrite:
            progress(f"{stage.name}: complete and unchanged, skipped")
            summary[stage.name] = {**previous, "skipped": True}
            continue
        changed = bool(previous) and previous["identity"] != identity
        update: dict[str, Any] = {"overwrite": config.overwrite or changed, "resume": True}
        stage_cfg = base.model_copy(update=update)
        if stage.name in ("pairs", "labels") and Path(sft_dir).is_dir():
            stage_cfg = stage_cfg.model_copy(update={"policy": base.policy.model_copy(
                update={"model_name_or_path": sft_dir})})
        progress(f"{stage.name}: {'inputs changed, running again' if changed else 'running'}")
        state[stage.name] = {"identity": identity, "status": "running"}
        write_atomic(state_file, json.dumps(state, indent=2))
        start = time.perf_counter()
        stage.run(stage_cfg)
        seconds = round(time.perf_counter() - start, 1)
        state[stage.name] = {"identity": identity, "status": "complete", "seconds": seconds}
        write_atomic(state_file, json.dumps(state, indent=2))
        summary[stage.name] = {**state[stage.name], "skipped": False}
    from constitutional_ai.report.build import build_report

    summary["report"] = str(build_report(out))
    return summary
