"""``cai eval``: checkpoints answer held-out red-team and helpfulness prompts, a preference model
judges every pair of answers to the same prompt, and Elo ratings with bootstrap intervals come out
per prompt set, anchored on the first checkpoint (the paper anchors the initial helpful model).

Each comparison's outcome is the judge's probability ``sigma(r_a - r_b)``, not a hard win, so a
near-tie counts as one. Answers stream to ``<output_dir>/eval/records.jsonl`` (resumable, keyed by
set, checkpoint and prompt); ``elo.json`` and ``elo.png`` (harmlessness against helpfulness, as the
paper's figure) are written at the end.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

from constitutional_ai.config import RunConfig
from constitutional_ai.critique.engine import clean_completion, derive_seed
from constitutional_ai.data.prompts import load_prompts
from constitutional_ai.data.store import RecordStore, read_records, write_atomic
from constitutional_ai.errors import ConfigError
from constitutional_ai.evaluation.curves import extra_figures
from constitutional_ai.evaluation.elo import Comparison, elo_ratings
from constitutional_ai.rl.ppo import RewardFn
from constitutional_ai.stage_runner import StageResult

EVAL = "eval"
SETS = ("harmless", "helpful")


def resolve_checkpoints(config: RunConfig) -> list[tuple[str, str]]:
    """``(name, path)`` of each checkpoint to compare; ``run:`` names this run's stages."""
    out = Path(config.output_dir)
    run_paths = {"run:initial": config.policy.model_name_or_path, "run:sft": str(out / "sft" / "model"),
                 "run:rl": str(out / "rl" / "model"), "run:dpo": str(out / "dpo" / "model")}
    found = []
    for spec in config.eval.models:
        if spec in run_paths:
            path = run_paths[spec]
            if spec != "run:initial" and not Path(path).is_dir():
                continue  # this run has not made that checkpoint
            found.append((spec.removeprefix("run:"), path))
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
    from constitutional_ai.preference_model.stage import trained_pm

    return trained_pm(config, config.eval.judge, "--judge").score_responses


def run_eval(config: RunConfig, judge: RewardFn | None = None) -> StageResult:
    from constitutional_ai.backends.transformers_backend import TransformersBackend

    start = time.perf_counter()
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
                "checkpoints": [path for _, path in checkpoints]}
    directory = Path(config.output_dir) / EVAL
    store = RecordStore(directory, identity, resume=config.resume, overwrite=config.overwrite)
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
        summary = summarise(records, names, config.eval.bootstrap, config.seed, directory, judged)
        summary["judge"] = "feedback model" if by_feedback else "preference model"
        summary.update(extra_figures(Path(config.output_dir), directory, judge, records, config.eval.limit))
        write_atomic(directory / "elo.json", json.dumps(summary, indent=2))
        store.close(complete=True)
    except BaseException:
        store.close(complete=False)
        raise
    return StageResult(EVAL, directory / "elo.json", written=len(store), total=len(store),
                       seconds=time.perf_counter() - start, prompt_report={},
                       extra={s: summary[s]["elo"] for s in SETS if s in summary})


def feedback_judgments(records: list[dict[str, Any]], names: list[str],
                       config: RunConfig) -> dict[tuple[str, str, str, str], float]:
    """``P(a's answer is better)`` for every pair of answers to one prompt, from the feedback model
    answering the paper's multiple-choice question under sampled comparison principles."""
    from constitutional_ai.backends import load_backend
    from constitutional_ai.constitution import Constitution
    from constitutional_ai.feedback.labeler import Comparison as Pair
    from constitutional_ai.feedback.labeler import FeedbackLabeler

    answers: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        answers.setdefault((r["set"], r["prompt_key"]), {})[r["model"]] = r
    pairs, index = [], []
    for (s, key), by_model in answers.items():
        for a, b in itertools.combinations(names, 2):
            if a in by_model and b in by_model:
                pairs.append(Pair(f"{s}:{key}:{a}:{b}", by_model[a]["prompt"], by_model[a]["response"],
                                  by_model[b]["response"]))
                index.append((s, key, a, b))
    backend = load_backend(config.feedback.model or config.policy)
    try:
        labeler = FeedbackLabeler(backend, Constitution.load(config.constitution), config.feedback, seed=config.seed)
        labels = labeler.label(pairs)
    finally:
        backend.close()
    return {i: label["p_a"] for i, label in zip(index, labels, strict=True) if label is not None}


def summarise(records: list[dict[str, Any]], names: list[str], bootstrap: int, seed: int, directory: Path,
              judged: dict[tuple[str, str, str, str], float] | None = None) -> dict[str, Any]:
    """Elo per prompt set from every pair of checkpoints' answers to the same prompt: the PM's
    ``sigma(r_a - r_b)``, or the feedback model's ``P(a is better)`` when ``judged`` is given."""
    summary: dict[str, Any] = {"anchor": names[0], "checkpoints": names}
    for s in SETS:
        by_prompt: dict[str, dict[str, float]] = {}
        for r in records:
            if r["set"] == s and r["model"] in names:
                by_prompt.setdefault(r["prompt_key"], {})[r["model"]] = r["reward"]
        if judged is not None:
            comparisons = [Comparison(a, b, p) for (js, _, a, b), p in judged.items() if js == s]
        else:
            comparisons = [Comparison(a, b, 1.0 / (1.0 + math.exp(-(scores[a] - scores[b]))))
                           for scores in by_prompt.values() for a, b in itertools.combinations(names, 2)
                           if a in scores and b in scores and scores[a] is not None and scores[b] is not None]
        if not comparisons:
            continue
        result = elo_ratings(comparisons, anchor=names[0], bootstrap=bootstrap, seed=seed)
        rewards = {m: [sc[m] for sc in by_prompt.values() if sc.get(m) is not None] for m in names}
        summary[s] = {"elo": {m: round(result.ratings[m], 1) for m in names},
                      "lower": {m: round(result.lower[m], 1) for m in names},
                      "upper": {m: round(result.upper[m], 1) for m in names},
                      "mean_reward": {m: sum(v) / len(v) for m, v in rewards.items() if v},
                      "prompts": len(by_prompt), "comparisons": len(comparisons)}
    if all(s in summary for s in SETS):
        plot_elo(summary, directory / "elo.png")
    return summary


def plot_elo(summary: dict[str, Any], path: Path) -> Path:
    """Harmlessness Elo against helpfulness Elo, with bootstrap intervals (the paper's figure 2)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    help_, harm = summary["helpful"], summary["harmless"]
    for name in summary["checkpoints"]:
        x, y = help_["elo"][name], harm["elo"][name]
        ax.errorbar(x, y, xerr=[[x - help_["lower"][name]], [help_["upper"][name] - x]],
                    yerr=[[y - harm["lower"][name]], [harm["upper"][name] - y]], fmt="o", capsize=3, label=name)
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title(f"Elo vs {summary['anchor']} (95% bootstrap intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
