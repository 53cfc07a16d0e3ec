import itertools
import math
import random
import sys

import numpy as np
import pytest

from constitutional_ai.evaluation.calibration import (
    binary_accuracy,
    calibration_summary,
    expected_calibration_error,
    position_bias_rate,
    reliability_bins,
    reliability_diagram,
)

# A small set whose ECE is computed by hand below (n_bins=5, width 0.1 over [0.5, 1]):
#   p     conf  bin           correct
#   0.95  0.95  4 [0.9, 1.0]  1
#   0.05  0.95  4             0
#   0.85  0.85  3 [0.8, 0.9)  1
#   0.85  0.85  3             1
#   0.30  0.70  2 [0.7, 0.8)  0      (0.7 is a left edge: it opens bin 2)
#   0.55  0.55  0 [0.5, 0.6)  1
#   0.50  0.50  0             0.5    (tie: half correct)
# bin 0: n=2, conf 0.525, acc 0.75, gap 0.225 -> 2/7 * 0.225 = 0.45/7
# bin 1: empty
# bin 2: n=1, conf 0.70,  acc 0.0,  gap 0.70  -> 1/7 * 0.70  = 0.70/7
# bin 3: n=2, conf 0.85,  acc 1.0,  gap 0.15  -> 2/7 * 0.15  = 0.30/7
# bin 4: n=2, conf 0.95,  acc 0.5,  gap 0.45  -> 2/7 * 0.45  = 0.90/7
# ECE = 2.35 / 7 ; accuracy = 4.5 / 7 ; mean confidence = 5.35 / 7
HAND = [0.95, 0.05, 0.85, 0.85, 0.30, 0.55, 0.50]
HAND_ECE = 2.35 / 7


def _calibrated(n: int, seed: int) -> list[float]:
    """Confidence c ~ U[0.5, 1]; the pick is right with probability c, so p_correct is c or 1 - c."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = rng.uniform(0.5, 1.0)
        out.append(c if rng.random() < c else 1.0 - c)
    return out


def _weighted_gap(bins):
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["accuracy"] - b["mean_confidence"]) for b in bins if b["count"])


# --- accuracy -------------------------------------------------------------------------------------

def test_accuracy_counts_ties_as_half():
    assert binary_accuracy([0.9, 0.1, 0.7, 0.2]) == pytest.approx(0.5)
    assert binary_accuracy([0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.5)  # (0.5 + 0.5 + 1 + 0) / 4
    assert binary_accuracy([0.5]) == pytest.approx(0.5)
    assert binary_accuracy([0.51, 0.5, 0.5]) == pytest.approx(2 / 3)  # (1 + 0.5 + 0.5) / 3
    assert binary_accuracy(HAND) == pytest.approx(4.5 / 7)


def test_accuracy_reads_arrays():
    assert binary_accuracy(np.array([0.9, 0.8, 0.3, 0.6])) == pytest.approx(0.75)


# --- ECE and bins ---------------------------------------------------------------------------------

def test_ece_hand_computed():
    assert expected_calibration_error(HAND, n_bins=5) == pytest.approx(HAND_ECE)


def test_bins_hand_computed():
    bins = reliability_bins(HAND, n_bins=5)
    assert [b["count"] for b in bins] == [2, 0, 1, 2, 2]
    assert [b["lo"] for b in bins] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [b["hi"] for b in bins] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    assert bins[0]["mean_confidence"] == pytest.approx(0.525)
    assert bins[0]["accuracy"] == pytest.approx(0.75)
    assert bins[1]["mean_confidence"] is None and bins[1]["accuracy"] is None
    assert bins[2]["accuracy"] == pytest.approx(0.0)
    assert bins[3]["accuracy"] == pytest.approx(1.0)
    assert bins[4]["mean_confidence"] == pytest.approx(0.95)
    assert bins[4]["accuracy"] == pytest.approx(0.5)


def test_bins_cover_range_and_edges():
    bins = reliability_bins([0.5, 1.0, 0.0, 0.6, 0.4], n_bins=10)
    assert len(bins) == 10
    assert bins[0]["lo"] == 0.5 and bins[-1]["hi"] == 1.0
    for a, b in itertools.pairwise(bins):
        assert a["hi"] == pytest.approx(b["lo"])
    counts = [b["count"] for b in bins]
    assert sum(counts) == 5
    assert counts[0] == 1  # 0.5 sits in the first bin
    assert counts[2] == 2  # 0.6 and 1 - 0.4 open bin [0.6, 0.7)
    assert counts[-1] == 2  # confidence 1.0 (p = 1 and p = 0) sits in the last, closed bin
    assert bins[-1]["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15])
def test_ece_equals_weighted_gap_over_bins(n_bins):
    ps = [*_calibrated(500, seed=n_bins), 0.5, 0.0, 1.0, 0.7, 0.3]
    bins = reliability_bins(ps, n_bins)
    assert sum(b["count"] for b in bins) == len(ps)
    assert expected_calibration_error(ps, n_bins) == pytest.approx(_weighted_gap(bins))


def test_one_bin_ece_is_gap_of_means():
    # With one bin ECE is |accuracy - mean confidence|: here |0.5 - 0.8| (p=0.8 right, p=0.2 wrong).
    assert expected_calibration_error([0.8, 0.2], n_bins=1) == pytest.approx(0.3)


def test_calibrated_labeler_has_small_ece():
    ps = _calibrated(20_000, seed=1234)
    assert expected_calibration_error(ps) < 0.02


def test_overconfident_labeler_ece():
    # Always 99% sure, right 70% of the time: every item has confidence 0.99, accuracy 0.7.
    ps = [0.99] * 700 + [0.01] * 300
    random.Random(0).shuffle(ps)
    assert expected_calibration_error(ps) == pytest.approx(0.29)
    # The same with the 70% drawn at random rather than fixed.
    rng = random.Random(7)
    noisy = [0.99 if rng.random() < 0.7 else 0.01 for _ in range(5000)]
    assert expected_calibration_error(noisy) == pytest.approx(0.29, abs=0.02)


def test_coin_flip_labeler_is_calibrated():
    assert expected_calibration_error([0.5] * 10) == pytest.approx(0.0)
    assert binary_accuracy([0.5] * 10) == pytest.approx(0.5)


def test_summary():
    s = calibration_summary(HAND, n_bins=5)
    assert s["n"] == 7
    assert s["accuracy"] == pytest.approx(4.5 / 7)
    assert s["ece"] == pytest.approx(HAND_ECE)
    assert s["mean_confidence"] == pytest.approx(5.35 / 7)
    assert s["bins"] == reliability_bins(HAND, n_bins=5)


# --- position bias --------------------------------------------------------------------------------

def test_position_bias_always_a_is_one():
    assert position_bias_rate([0.9, 0.8, 0.7], [0.9, 0.6, 0.99]) == pytest.approx(1.0)


def test_position_bias_always_b_is_one():
    assert position_bias_rate([0.1, 0.3], [0.2, 0.4]) == pytest.approx(1.0)


def test_position_bias_consistent_judge_is_zero():
    # The same response wins both times, so the winning slot flips.
    assert position_bias_rate([0.9, 0.2, 0.7], [0.1, 0.8, 0.3]) == pytest.approx(0.0)


def test_position_bias_mixed():
    p1 = [0.9, 0.2, 0.7, 0.6, 0.5]
    p2 = [0.8, 0.1, 0.3, 0.5, 0.9]
    # A,A same slot; B,B same slot; A,B flips; A,tie and tie,A name no winner in one order.
    assert position_bias_rate(p1, p2) == pytest.approx(2 / 5)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call",
    [
        lambda: binary_accuracy([]),
        lambda: expected_calibration_error([]),
        lambda: reliability_bins([]),
        lambda: calibration_summary([]),
        lambda: position_bias_rate([], []),
        lambda: position_bias_rate([0.6, 0.7], [0.4]),
        lambda: expected_calibration_error([0.6], n_bins=0),
        lambda: expected_calibration_error([1.2]),
        lambda: binary_accuracy([-0.1]),
        lambda: binary_accuracy([math.nan]),
        lambda: position_bias_rate([0.6], [math.inf]),
    ],
)
def test_value_errors(call):
    with pytest.raises(ValueError):
        call()


def test_diagram_empty_raises(tmp_path):
    with pytest.raises(ValueError):
        reliability_diagram([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --- diagram --------------------------------------------------------------------------------------

def test_reliability_diagram_writes_png(tmp_path):
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    target = tmp_path / "nested" / "dir" / "reliability.png"
    out = reliability_diagram(_calibrated(300, seed=3), str(target), title="test labeler", n_bins=5)
    assert out == target
    data = target.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    if not pyplot_loaded:  # drawn without pyplot, so the process's backend is left alone
        assert "matplotlib.pyplot" not in sys.modules
