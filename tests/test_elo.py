import random

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
