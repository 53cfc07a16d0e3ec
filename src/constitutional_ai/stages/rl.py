"""``cai ppo``: the SL-CAI policy trained against the preference model.

``--algo ppo`` (the paper's) runs our :class:`~constitutional_ai.rl.ppo.PPOTrainer`; ``--algo
rloo`` and ``--algo grpo`` run TRL's ``RLOOTrainer``/``GRPOTrainer`` with the same reward: the PM
on exactly the text the policy produced. Every step's metrics stream to
the ``rl`` record store (and to ``report_to``); the trained policy is the layout's ``rl_model``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from constitutional_ai.common.chat_format import parse_raw, render_raw
from constitutional_ai.common.types import Conversation, RewardFn
from constitutional_ai.config import RunConfig
from constitutional_ai.data.prompts import load_prompts
from constitutional_ai.layout import RunLayout
from constitutional_ai.models import model_path
from constitutional_ai.report.spec import Plot, ReportSpec
from constitutional_ai.stages.feedback import sft_policy
from constitutional_ai.stages.registry import Stage, register
from constitutional_ai.stages.runner import StageResult
from constitutional_ai.stages.sft import policy_path
from constitutional_ai.stages.training import TrainingRun
from constitutional_ai.training.common import last_checkpoint, peft_config, training_arguments

RL = "rl"


def pm_reward(config: RunConfig) -> RewardFn:
    """The trained preference model as a reward function (``prompts, responses -> rewards``)."""
    import torch

    from constitutional_ai.stages.preference_model import trained_pm

    device = config.rl.device
    if device == "auto" and torch.cuda.is_available() and os.environ.get("LOCAL_RANK"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # under accelerate launch: this process's GPU, not GPU 0
    return trained_pm(config, config.rl.reward_model, "--reward-model", device).score_responses


def feedback_reward(config: RunConfig) -> RewardFn:
    """Direct RLAIF (Lee et al. 2023): the feedback model scores each response under a sampled
    comparison principle, from one ``score_choices`` pass, with no PM in between. ``pairwise``
    compares it with the starting policy's greedy answer to the same prompt."""
    from constitutional_ai.backends import load_backend
    from constitutional_ai.feedback.direct_reward import FeedbackReward
    from constitutional_ai.stages.runner import load_stage_constitution

    constitution = load_stage_constitution(config.constitution, "comparison", "feedback_examples",
                                           config.feedback.few_shot, "--feedback.few_shot")
    backend = load_backend(config.feedback.model or config.policy)
    reference = reference_responses(config) if config.rl.feedback_reward == "pairwise" else None
    return FeedbackReward(backend, constitution, config.feedback, mode=config.rl.feedback_reward, seed=config.seed,
                          reference=reference, center=True)


def reference_responses(config: RunConfig) -> Callable[[list[Conversation]], list[str]]:
    """The starting policy's greedy answer to every RL prompt, made once before training (so the
    reference does not move with the policy) and kept beside the RL records for the audit trail."""
    import json

    from constitutional_ai.backends.transformers_backend import TransformersBackend
    from constitutional_ai.common.text import clean_completion
    from constitutional_ai.config import GenerationParams
    from constitutional_ai.data.prompts import conversation_key
    from constitutional_ai.data.store import write_atomic

    path = RunLayout.of(config).rl_references
    prompts = rl_prompts(config)
    keys = [conversation_key(p) for p in prompts]
    policy = policy_path(config, config.rl.policy)
    params = GenerationParams(max_new_tokens=config.rl.max_new_tokens, temperature=0.0)
    # the answers belong to one policy (its weights as they are now) and one way of generating: a
    # retrained SFT model or a longer max_new_tokens makes new ones, never reuses stale ones
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(policy).glob("*.safetensors"))
    made_by = {"policy": policy, "weights": weights, "generation": params.model_dump(mode="json")}
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    responses = saved.get("responses", {}) if saved.get("made_by") == json.loads(json.dumps(made_by)) else {}
    if not set(keys) <= set(responses):
        backend = TransformersBackend(config.policy.model_copy(update={"model_name_or_path": policy}))
        responses = {k: clean_completion(g.text, backend.style)
                     for k, g in zip(keys, backend.generate(prompts, params), strict=True)}
        backend.close()
        write_atomic(path, json.dumps({"made_by": made_by, "responses": responses}, ensure_ascii=False, indent=1))
    return lambda convs: [responses[conversation_key(c)] for c in convs]


def rl_prompts(config: RunConfig) -> list[Conversation]:
    items, _ = load_prompts(config.prompts)
    return [list(item.messages) for item in items]


def run_rl(config: RunConfig, reward_fn: RewardFn | None = None) -> StageResult:
    if reward_fn is None:
        reward_fn = feedback_reward(config) if config.rl.reward == "feedback" else pm_reward(config)
    if config.rl.algo == "ppo":
        return run_ppo(config, reward_fn)
    return run_trl_online(config, reward_fn)


def continue_policy(config: RunConfig, layout: RunLayout) -> RunConfig:
    """RL starts from the SL-CAI model (or ``rl.policy``) in iteration 1 and, from iteration 2,
    continues from the policy the iteration before left, ``run:rl@K-1`` (its KL reference is then
    that policy: each iteration is a trust region around where it started). The feedback model,
    unless set, is the SL-CAI model, as for labels. A knob the reward in use does not read is left
    out of the identity."""
    config = sft_policy(config, layout)
    update: dict[str, Any] = {}
    if config.iteration > 1:
        update["policy"] = f"run:rl@{config.iteration - 1}"  # with its iteration: a bare run:rl is this one's
    if config.rl.reward == "pm":
        update["feedback_reward"] = type(config.rl).model_fields["feedback_reward"].default
    return config.model_copy(update={"rl": config.rl.model_copy(update=update)}) if update else config


def run_ppo(config: RunConfig, reward_fn: RewardFn) -> StageResult:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from constitutional_ai.rl.ppo import PPOTrainer

    cfg = config.rl
    layout = RunLayout.of(config)
    with TrainingRun(config, RL, layout.rl, **reward_identity(config)) as run:
        path = policy_path(config, cfg.policy)
        tokenizer = AutoTokenizer.from_pretrained(path)
        policy = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        value = None
        if cfg.value_model != "head":
            value_path = path if cfg.value_model == "policy" else model_path(cfg.value_model)
            value = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1,
                                                                       use_safetensors=True)
            value.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        if cfg.lora is not None:
            from peft import get_peft_model

            policy = get_peft_model(policy, peft_config(cfg, "CAUSAL_LM"))
            if value is not None:
                value = get_peft_model(value, peft_config(cfg, "SEQ_CLS"))
        accelerator = Accelerator(cpu=cfg.device == "cpu", log_with=cfg.report_to or None, project_dir=str(layout.rl))
        if cfg.report_to:
            accelerator.init_trackers("cai-rl", config={k: v for k, v in cfg.model_dump().items()
                                                         if isinstance(v, (int, float, str, bool))})
        trainer = PPOTrainer(cfg, policy, tokenizer, reward_fn, rl_prompts(config), layout.rl, seed=config.seed,
                             value_model=value, accelerator=accelerator, log=run.log)
        start = time.perf_counter()
        history = trainer.train(progress=config.progress)
        run.seconds = time.perf_counter() - start
        run.save(trainer._policy(), tokenizer, layout.rl_model, cfg.lora is not None, accelerator)
        accelerator.end_training()
        summary = {"algo": "ppo", "steps": trainer.global_step, "seconds": round(run.seconds, 1),
                   "world_size": accelerator.num_processes,
                   **({"first_reward": history[0]["reward"], "last_reward": history[-1]["reward"],
                       "last_kl": history[-1]["kl"]} if history else {})}
        run.complete(**summary)
    return StageResult(RL, layout.rl_model, written=len(history), total=cfg.total_steps, seconds=run.seconds,
                       prompt_report={}, extra={"model": str(layout.rl_model), **summary})


def reward_identity(config: RunConfig) -> dict[str, Any]:
    """What else decides the rewards: with ``reward: feedback``, the feedback settings and the
    constitution judged under (a PM's reward is decided by the PM stage's identity instead)."""
    if config.rl.reward != "feedback":
        return {}
    from constitutional_ai.stages.runner import load_stage_constitution

    return {"feedback": config.fingerprint(("feedback",)),
            "constitution": load_stage_constitution(config.constitution, "comparison", "feedback_examples",
                                                    config.feedback.few_shot, "--feedback.few_shot").hash}


def trl_reward(reward_fn: RewardFn, chat: bool, log: Callable[[list[dict[str, Any]]], None] | None = None,
               ) -> Callable[..., list[float]]:
    """Our reward function in TRL's ``reward_funcs`` signature (``prompts, completions, **kwargs``);
    a reward that keeps each response's details (``last``: the feedback model's principle) hands
    them to ``log``."""

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        convs = [list(p) if chat else parse_raw(p) for p in prompts]
        texts = [c[-1]["content"] if chat else c for c in completions]
        rewards = reward_fn(convs, texts)
        details = getattr(reward_fn, "last", None)
        if log is not None and details:
            log(details)
        return rewards

    reward.__name__ = "preference_model"
    return reward


def keep_rewards_up_to(audit: Path, checkpoint: str | None) -> None:
    """The reward log as the trainer will continue it: empty on a fresh start, and after a resume only
    the rewards of the updates the checkpoint holds (the later ones are computed again)."""
    import json

    from constitutional_ai.data.store import write_atomic

    if not audit.is_file():
        return
    done = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
    kept = [line for line in audit.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= done]
    write_atomic(audit, "".join(line + "\n" for line in kept))


def run_trl_online(config: RunConfig, reward_fn: RewardFn) -> StageResult:
    """RLOO or GRPO through TRL, with our reward."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    cfg = config.rl
    if cfg.algo == "grpo":
        from trl import GRPOConfig as ArgsCls
        from trl import GRPOTrainer as TrainerCls
    else:
        from trl import RLOOConfig as ArgsCls
        from trl import RLOOTrainer as TrainerCls
    layout = RunLayout.of(config)
    path = policy_path(config, cfg.policy)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = rl_prompts(config)
    dataset = Dataset.from_list([{"prompt": p if chat else render_raw(p, add_generation_prompt=True)}
                                 for p in prompts])
    with TrainingRun(config, RL, layout.rl, **reward_identity(config)) as run:
        args = training_arguments(cfg, ArgsCls, run.checkpoints, config.seed, config.progress,
                                  per_device_train_batch_size=cfg.batch_size, num_generations=cfg.num_generations,
                                  max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
                                  beta=cfg.kl_coef, max_steps=cfg.total_steps, logging_steps=1)
        audit = layout.rl_rewards
        keep_rewards_up_to(audit, last_checkpoint(run.checkpoints, config.resume))
        calls = iter(range(1 << 62))

        def log(details: list[dict[str, Any]]) -> None:
            import json

            step, call = trainer.state.global_step + 1, next(calls)  # the update these rewards are for
            with audit.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": step, "call": call, **d}, ensure_ascii=False) + "\n"
                             for d in details)

        trainer = TrainerCls(model=path, reward_funcs=trl_reward(reward_fn, chat, log), args=args,
                             train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(cfg, "CAUSAL_LM"), callbacks=run.callbacks())
        output = run.fit(trainer)
        run.save(trainer.model_wrapped, tokenizer, layout.rl_model, cfg.lora is not None, trainer.accelerator)
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        summary = {"algo": cfg.algo, "steps": output.global_step, "seconds": round(run.seconds, 1),
                   "world_size": trainer.accelerator.num_processes,
                   **({"first_reward": rewards[0], "last_reward": rewards[-1]} if rewards else {})}
        run.complete(**summary)
    return StageResult(RL, layout.rl_model, written=output.global_step, total=cfg.total_steps,
                       seconds=run.seconds, prompt_report={}, extra={"model": str(layout.rl_model), **summary})


register(Stage(
    name=RL, command="ppo", run=run_rl, sections=("seed", "prompts", "rl"), options=("policy", "feedback"),
    extra_identity=reward_identity,
    help="RL-CAI: train the policy against the preference model, or the feedback model itself (--reward "
         "feedback); --algo ppo: ours; rloo, grpo: TRL.",
    inputs=("prompts.path",), consumes=("sft_model", "pm_model"),
    produces=("rl", "rl_records", "rl_model"), iterated=True, from_previous=("rl_model",), wire=continue_policy,
    summary=lambda result: result.extra,
    produced=lambda r: f"{r.extra['steps']} steps",
    report=ReportSpec(store="rl", unit="log entries", plots=(
        Plot("rl_reward_plot", "Reward, KL to the reference policy and response length over RL training"),)),
))
