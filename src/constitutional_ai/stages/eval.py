"""``cai eval``: checkpoints answer held-out red-team and helpfulness prompts, a judge (the PM or the
feedback model) compares every pair of answers to one prompt, and Elo comes out per prompt set
(the arithmetic and figures are in ``evaluation.elo_eval``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from constitutional_ai.common.errors import ConfigError
from constitutional_ai.common.seeding import derive_seed
from constitutional_ai.common.text import clean_completion
from constitutional_ai.common.types import RewardFn
from constitutional_ai.config import RunConfig
from constitutional_ai.data.prompts import load_prompts
from constitutional_ai.data.store import RecordStore, read_records, write_atomic
from constitutional_ai.evaluation.curves import extra_figures
from constitutional_ai.evaluation.elo_eval import SETS, feedback_judgments, summarise
from constitutional_ai.layout import RunLayout
from constitutional_ai.report.spec import Plot, ReportSpec
from constitutional_ai.stages.registry import Stage, inputs_identity, register
from constitutional_ai.stages.runner import StageResult

EVAL = "eval"


def _rl_iterations(layout: RunLayout) -> list[int]:
    return [k for k in layout.iterations() if layout.at(k).rl_model.is_dir()]


def resolve_checkpoints(config: RunConfig) -> list[tuple[str, str]]:
    """``(name, path)`` of each checkpoint to compare; ``run:`` names this run's stages, and
    ``run:rl`` in a run that iterated RL-CAI is every iteration's policy (``rl@1``, ``rl@2``...)."""
    layout = RunLayout.of(config)
    found = []
    for spec in config.eval.models:
        if spec == "run:initial":
            found.append(("initial", config.policy.model_name_or_path))
        elif spec == "run:rl" and len(iterated := _rl_iterations(layout)) > 1:
            found += [(f"rl@{k}", str(layout.at(k).rl_model)) for k in iterated]  # every iteration's policy
        elif (run_model := layout.run_model(spec)) is not None:
            if run_model.is_dir():  # else this run has not made that checkpoint
                found.append((spec.removeprefix("run:"), str(run_model)))
        else:
            path = Path(spec)
            found.append((path.parent.name if path.name == "model" and path.parent.name else path.name or spec, spec))
    seen: dict[str, int] = {}
    for i, (name, path) in enumerate(found):  # two runs' rl/model must not share a name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            found[i] = (f"{name}-{seen[name]}", path)
    if len(found) < 2:
        raise ConfigError(f"cai eval needs at least two checkpoints, found {[n for n, _ in found]}; run `cai sft`/"
                          "`cai ppo` first or pass --eval-model DIR (twice or more)")
    return found


def _judge(config: RunConfig) -> RewardFn:
    from constitutional_ai.stages.preference_model import trained_pm

    return trained_pm(config, config.eval.judge, "--judge", final=True).score_responses


def run_eval(config: RunConfig, judge: RewardFn | None = None) -> StageResult:
    from constitutional_ai.backends.transformers_backend import TransformersBackend

    start = time.perf_counter()
    config = judge_for_reward(config, RunLayout.of(config))  # on its own too, not only as cai run wires it
    checkpoints = resolve_checkpoints(config)
    by_feedback = judge is None and config.eval.judge == "feedback"
    if by_feedback:  # the feedback model judges; this run's PM (if any) still draws the curves
        try:
            judge = _judge(config.with_overrides({"eval.judge": ""}))
        except ConfigError:
            judge = None
    else:
        judge = judge or _judge(config)
    prompts = {}
    for name, source in (("harmless", config.eval.harmless_prompts), ("helpful", config.eval.helpful_prompts)):
        items, _ = load_prompts(source.model_copy(update={"limit": config.eval.limit}))
        prompts[name] = items
    identity = {"stage": EVAL, "config": config.fingerprint(("seed", "eval")),
                "checkpoints": [path for _, path in checkpoints], **inputs_identity(EVAL, config)}
    layout = RunLayout.of(config)
    directory = layout.eval
    store = RecordStore(directory, identity, resume=config.resume, overwrite=config.overwrite,
                        fields=config.fingerprint_fields(("seed", "eval")))
    try:
        for name, path in checkpoints:
            todo = [(s, item) for s in SETS for item in prompts[s] if f"{s}:{name}:{item.key}" not in store]
            if not todo:
                continue
            backend = TransformersBackend(config.policy.model_copy(update={"model_name_or_path": path}))
            seeds = [derive_seed(config.seed, "eval", s, item.key) for s, item in todo]
            outs = backend.generate([item.messages for _, item in todo], config.eval.generation, seeds=seeds)
            answers = [clean_completion(o.text, backend.style) for o in outs]
            rewards = judge([list(item.messages) for _, item in todo], answers) if judge else [None] * len(answers)
            store.write([{"key": f"{s}:{name}:{item.key}", "set": s, "model": name, "prompt_key": item.key,
                          "prompt": item.messages, "response": a, "reward": r}
                         for (s, item), a, r in zip(todo, answers, rewards, strict=True)])
            backend.close()
        records = list(read_records(store.path))
        names = [n for n, _ in checkpoints]
        judged = feedback_judgments(records, names, config) if by_feedback else None
        summary = summarise(records, names, config.eval.bootstrap, config.seed, layout.elo_plot, judged)
        summary["judge"] = "feedback model" if by_feedback else "preference model"
        rl_records = {k: layout.at(k).rl_records for k in layout.iterations() if layout.at(k).rl_records.is_file()}
        summary.update(extra_figures(records, judge, config.eval.limit, layout.critique_records, rl_records,
                                     layout.revisions_plot, layout.rl_reward_plot))
        write_atomic(layout.elo, json.dumps(summary, indent=2))
        store.close(complete=True)
    except BaseException:
        store.close(complete=False)
        raise
    return StageResult(EVAL, layout.elo, written=len(store), total=len(store),
                       seconds=time.perf_counter() - start, prompt_report={},
                       extra={s: summary[s]["elo"] for s in SETS if s in summary})


def judge_for_reward(config: RunConfig, layout: RunLayout) -> RunConfig:
    """With direct RLAIF there is no PM to judge by: the feedback model judges, as it rewarded."""
    if config.rl.reward == "feedback" and not config.eval.judge:
        return config.model_copy(update={"eval": config.eval.model_copy(update={"judge": "feedback"})})
    return config


register(Stage(
    name=EVAL, command="eval", run=run_eval, sections=("seed", "eval"), options=("policy", "feedback"),
    wire=judge_for_reward,
    help="Elo of checkpoints (initial, SL-CAI, RL-CAI...) on red-team and helpfulness prompts, judged by the PM.",
    inputs=("eval.harmless_prompts.path", "eval.helpful_prompts.path"),
    consumes=("sft_model", "rl_model", "pm_model"), produces=("eval", "eval_records", "elo"),
    summary=lambda result: {"output": str(result.output), **{f"{k}_elo": v for k, v in result.extra.items()}},
    produced=lambda r: f"{r.total} answers",
    report=ReportSpec(store="eval", unit="answers", plots=(
        Plot("elo_plot", "Harmlessness against helpfulness Elo (anchored on the first checkpoint)"),
        Plot("revisions_plot", "PM score after each critique-revision round"))),
))
