import random
from pathlib import Path

import pytest

from constitutional_ai.evaluation.elo import Comparison, elo_ratings, win_probability

TRUE = {"initial": 0.0, "sl-cai": 120.0, "rl-cai": 260.0, "other": -80.0}


def _simulate(n: int, seed: int = 0, soft: bool = False) -> list[Comparison]:
    rng = random.Random(seed)
    names = list(TRUE)
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        p = win_probability(TRUE[a], TRUE[b])
        out.append(Comparison(a, b, p if soft else float(rng.random() < p)))
    return out


def test_the_fit_recovers_known_ratings_from_simulated_comparisons():
    result = elo_ratings(_simulate(6000), anchor="initial", bootstrap=100)
    assert result.ratings["initial"] == 0.0
    for name, rating in TRUE.items():
        assert result.ratings[name] == pytest.approx(rating, abs=30)
        assert result.lower[name] - 10 <= rating <= result.upper[name] + 10  # the 95% interval covers the truth
        assert result.lower[name] <= result.ratings[name] <= result.upper[name]
    assert result.ratings["rl-cai"] > result.ratings["sl-cai"] > result.ratings["initial"] > result.ratings["other"]


def test_soft_outcomes_are_fitted_exactly_and_ties_mean_equal_ratings():
    exact = elo_ratings(_simulate(400, soft=True), anchor="initial", bootstrap=0)
    for name, rating in TRUE.items():
        assert exact.ratings[name] == pytest.approx(rating, abs=2)  # the prior pulls only a little
    ties = elo_ratings([Comparison("x", "y", 0.5)] * 20, anchor="x", bootstrap=0)
    assert ties.ratings["y"] == pytest.approx(0.0, abs=1e-9)


def test_a_model_that_never_loses_keeps_a_finite_rating_and_bad_input_is_refused():
    result = elo_ratings([Comparison("strong", "weak", 1.0)] * 30, anchor="weak", bootstrap=20)
    assert 300 < result.ratings["strong"] < 2000
    with pytest.raises(ValueError):
        elo_ratings([])
    with pytest.raises(ValueError):
        elo_ratings([Comparison("a", "b", 1.0)], anchor="c")


def test_cai_eval_rates_checkpoints_on_both_prompt_sets(tmp_path, tiny_model_dir, tiny_chat_model_dir):
    import json

    from constitutional_ai.config import RunConfig
    from constitutional_ai.stages.eval import run_eval

    config = RunConfig().with_overrides({
        "output_dir": str(tmp_path / "run"), "progress": False,
        "eval.models": [str(tiny_model_dir), str(tiny_chat_model_dir)], "eval.limit": 6,
        "eval.generation.max_new_tokens": 8, "eval.bootstrap": 50})
    # a judge that prefers longer answers: the checkpoint that writes more must rate higher
    result = run_eval(config, judge=lambda prompts, responses: [len(r) / 10 for r in responses])
    summary = json.loads(Path(result.output).read_text())
    names = summary["checkpoints"]
    for s in ("harmless", "helpful"):
        elo, mean = summary[s]["elo"], summary[s]["mean_reward"]
        assert elo[names[0]] == 0.0 and summary[s]["prompts"] == 6
        assert (elo[names[1]] > 0) == (mean[names[1]] > mean[names[0]]) or mean[names[1]] == mean[names[0]]
        assert summary[s]["lower"][names[1]] <= elo[names[1]] <= summary[s]["upper"][names[1]]
    assert (tmp_path / "run" / "eval" / "elo.png").stat().st_size > 1000
    # a rerun finds every answer on disk and generates nothing
    again = run_eval(config, judge=lambda prompts, responses: pytest.fail("nothing left to judge"))
    assert json.loads(Path(again.output).read_text())["harmless"]["elo"] == summary["harmless"]["elo"]


def test_evasive_answers_are_refusals_that_give_no_help():
    from constitutional_ai.evaluation.curves import evasive_fraction, is_evasive

    assert is_evasive("I'm sorry, I can't help with that.")
    assert not is_evasive("I can't help with that, because it could hurt someone; instead, here is a safer way.")
    assert not is_evasive("Sure: preheat the oven to 200 C.")
    assert evasive_fraction(["I won't do that.", "Here is how.", "I cannot.", "Okay."]) == 0.5


def test_pm_score_by_revision_round_and_the_rl_reward_curve(tmp_path):
    import json

    from constitutional_ai.evaluation.curves import pm_score_by_revision, rl_metric_curves

    critique = tmp_path / "critique.jsonl"
    rows = [{"key": f"k{i}", "prompt": [{"role": "user", "content": "q"}], "initial_response": "x",
             "rounds": [{"revision": "xx"}, {"revision": "xxxx"}]} for i in range(3)]
    critique.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pm_score_by_revision(critique, lambda p, r: [float(len(t)) for t in r]) == [1.0, 2.0, 4.0]
    rl = tmp_path / "rl.jsonl"
    rl.write_text("".join(json.dumps({"key": f"step-{i}", "step": i, "reward": i / 2}) + "\n" for i in (2, 1)))
    assert rl_metric_curves(rl)["reward"] == [(1, 0.5), (2, 1.0)]


def test_cai_eval_can_be_judged_by_the_feedback_model_under_principles(tmp_path, tiny_model_dir):
    import json

    from constitutional_ai.config import RunConfig
    from constitutional_ai.stages.eval import run_eval

    config = RunConfig().with_overrides({
        "output_dir": str(tmp_path / "run"), "progress": False, "policy.model_name_or_path": str(tiny_model_dir),
        "eval.models": [str(tiny_model_dir), str(tiny_model_dir)], "eval.limit": 3, "eval.judge": "feedback",
        "eval.generation.max_new_tokens": 6, "eval.bootstrap": 10})
    summary = json.loads(Path(run_eval(config).output).read_text())
    assert summary["judge"] == "feedback model" and summary["checkpoints"] == ["raw", "raw-2"]
    assert summary["harmless"]["comparisons"] == 3 and summary["helpful"]["comparisons"] == 3
