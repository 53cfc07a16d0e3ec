"""``cai dpo``: TRL's DPOTrainer on the AI preference pairs, the Hugging Face CAI recipe's route and
the alternative to a PM plus RL (hard preferences: the labeler's winner is ``chosen``)."""

from __future__ import annotations

from constitutional_ai.config import RunConfig
from constitutional_ai.layout import RunLayout
from constitutional_ai.preference_model.data import mix_sources
from constitutional_ai.report.spec import ReportSpec
from constitutional_ai.stages.registry import Stage, register
from constitutional_ai.stages.runner import StageResult
from constitutional_ai.stages.sft import policy_path
from constitutional_ai.stages.training import TrainingRun
from constitutional_ai.training.common import load_causal_lm, peft_config, training_arguments
from constitutional_ai.training.dpo import dpo_row

DPO = "dpo"


def run_dpo(config: RunConfig) -> StageResult:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = config.dpo
    layout = RunLayout.of(config)
    pairs, reports = mix_sources(cfg.data, config.seed, layout.root)
    with TrainingRun(config, DPO, layout.dpo) as run:
        model, tokenizer = load_causal_lm(policy_path(config, cfg.policy))
        dataset = Dataset.from_list([dpo_row(p, tokenizer) for p in pairs])
        args = training_arguments(cfg, DPOConfig, run.checkpoints, config.seed, config.progress, beta=cfg.beta)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(cfg, "CAUSAL_LM"), callbacks=run.callbacks())
        output = run.fit(trainer)
        run.save(trainer.model_wrapped, tokenizer, layout.dpo_model, cfg.lora is not None, trainer.accelerator)
        summary = {"pairs": len(pairs), "steps": output.global_step, "seconds": round(run.seconds, 1),
                   "train_loss": output.training_loss}
        run.complete(**summary)
    return StageResult(DPO, layout.dpo_model, written=len(pairs), total=len(pairs), seconds=run.seconds,
                       prompt_report={"sources": [r.as_dict() for r in reports]},
                       extra={"model": str(layout.dpo_model), **summary})


register(Stage(
    name=DPO, command="dpo", run=run_dpo, sections=("seed", "dpo"), pipeline=False,
    help="DPO on the AI preference pairs (TRL DPOTrainer), the alternative to a PM plus RL.",
    inputs=("dpo.data",), consumes=("preferences", "sft_model"),
    produces=("dpo", "dpo_model"), summary=lambda result: result.extra,
    report=ReportSpec(store="dpo", unit="log entries"),
    produced=lambda r: f"{r.extra.get('steps', r.written)} steps",
))
