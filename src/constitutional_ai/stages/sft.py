"""``cai export-sft`` and ``cai sft``: the SL-CAI revisions as conversations, then fine-tuning on them
(TRL's SFTTrainer, loss on the final assistant turn); the model is the RL policy's starting point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from constitutional_ai.common.errors import DataError
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import read_records
from constitutional_ai.layout import SFT_INFO, RunLayout
from constitutional_ai.models import model_path
from constitutional_ai.report.spec import ReportSpec
from constitutional_ai.stages.registry import Stage, register
from constitutional_ai.stages.runner import StageResult
from constitutional_ai.stages.training import TrainingRun
from constitutional_ai.training.common import load_causal_lm, peft_config, training_arguments
from constitutional_ai.training.sft import prompt_completion

SFT = "sft"


def policy_path(config: RunConfig, explicit: str) -> str:
    """The policy an RL stage starts from: the one named, else this run's SFT model, else the
    configured policy model (the initial helpful model)."""
    if explicit:
        return model_path(RunLayout.of(config).resolve_model(explicit))
    sft_model = RunLayout.of(config).sft_model
    if sft_model.is_dir():
        return str(sft_model)
    return model_path(config.policy.model_name_or_path)


def _conversations(config: RunConfig) -> list[list[dict[str, str]]]:
    out = []
    layout = RunLayout.of(config)
    for spec in config.sft.data:
        path = layout.run_data(spec) or Path(spec)
        if not path.is_file():
            raise DataError(f"{path}: no SFT data; run `cai critique` and `cai export-sft` first, or pass "
                            "--sft-data FILE.jsonl (TRL messages format)")
        for n, row in enumerate(read_records(path), 1):
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{path}:{n}: expected {{\"messages\": [...]}} ending with an assistant turn")
            out.append(messages)
    return out


def run_sft(config: RunConfig) -> StageResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = config.sft
    layout = RunLayout.of(config)
    conversations = _conversations(config)
    with TrainingRun(config, SFT, layout.sft_trainer) as run:
        model, tokenizer = load_causal_lm(model_path(cfg.model_name_or_path))
        dataset = Dataset.from_list([prompt_completion(m, tokenizer) for m in conversations])
        args = training_arguments(cfg, SFTConfig, run.checkpoints, config.seed, config.progress,
                                  completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(cfg, "CAUSAL_LM"), callbacks=run.callbacks())
        output = run.fit(trainer)
        info = {"base_model": cfg.model_name_or_path, "examples": len(conversations),
                "train_seconds": round(run.seconds, 1), "global_step": output.global_step,
                "train_loss": output.training_loss, "world_size": trainer.accelerator.num_processes}
        run.save(trainer.model_wrapped, tokenizer, layout.sft_model, cfg.lora is not None, trainer.accelerator,
                 SFT_INFO, info)
        run.complete(**info)
    return StageResult(SFT, layout.sft_model, written=len(conversations), total=len(conversations),
                       seconds=run.seconds, prompt_report={}, extra={"model": str(layout.sft_model), **info})


def run_export_sft(config: RunConfig) -> Any:
    from constitutional_ai.data.export import critique_to_sft

    layout = RunLayout.of(config)
    return critique_to_sft(layout.critique_records, layout.sft_data, config.sft_export, seed=config.seed)


def _pipeline_sft(config: RunConfig, layout: RunLayout) -> RunConfig:
    """In the pipeline, SFT fine-tunes the policy model being aligned."""
    return config.with_overrides({"sft.model_name_or_path": config.policy.model_name_or_path})


register(Stage(
    name="export_sft", command="export-sft", run=run_export_sft, sections=("seed", "sft_export"),
    help="Export critique records as conversational SFT data (TRL messages format).",
    inputs=("sft_export.helpful.path",), consumes=("critique_records",), produces=("sft_data",),
    produced=lambda r: f"{r.critique_examples + r.helpful_examples} conversations",
))
register(Stage(
    name=SFT, command="sft", run=run_sft, sections=("seed", "policy", "sft"), unread=("policy",),
    wire=_pipeline_sft, wired=("sft.model_name_or_path",),
    help="SL-CAI: fine-tune the policy on the exported revisions (TRL SFTTrainer, full or LoRA).",
    inputs=("sft.data",), consumes=("sft_data",),
    produces=("sft_trainer", "sft_model"), summary=lambda result: result.extra,
    report=ReportSpec(store="sft_trainer", unit="log entries"),
    produced=lambda r: f"{r.extra['global_step']} steps on {r.written} conversations",
))
