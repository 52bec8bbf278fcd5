"""The length rule and the length-controlled win rate on hand-made outcomes (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.comparisons import SampleRow, head_to_head
from rlhf.length_bias import fit_length_logistic, length_controlled_win_rate, length_rule_accuracy


def test_length_rule_counts_equal_lengths_half():
    r = length_rule_accuracy([10, 5, 7, 3], [4, 9, 7, 1])
    # longer chosen: pairs 0 and 3; tie: pair 2 -> (2 + 0.5) / 4
    assert r["length_rule_accuracy"] == pytest.approx(0.625)
    assert r["length_rule_accuracy_se"] == pytest.approx(math.sqrt(0.625 * 0.375 / 4))
    assert r["length_ties"] == pytest.approx(0.25)


def test_length_rule_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="two \\[n\\] lists"):
        length_rule_accuracy([1, 2], [1])


def test_logistic_fit_recovers_known_coefficients():
    # Outcomes drawn exactly at their probabilities: a large sample of fractional labels
    # equal to sigmoid(a + b x) makes the fit return (a, b) up to the tiny ridge.
    x = np.linspace(-1, 1, 201)
    p = 1 / (1 + np.exp(-(0.4 + 1.5 * x)))
    a, b = fit_length_logistic(p, x)
    assert a == pytest.approx(0.4, abs=1e-2) and b == pytest.approx(1.5, abs=2e-2)


def test_length_only_wins_are_removed():
    # The challenger wins exactly when it is longer, loses when shorter, and at equal length
    # wins half: the raw win rate is high, the length-controlled one is one half.
    diffs = [8, 8, 8, 8, 8, 8, -8, -8, 0, 0]
    outcomes = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0]
    groups = list(range(10))
    lc = length_controlled_win_rate(outcomes, diffs, groups, bootstrap=200)
    assert np.mean(outcomes) == pytest.approx(0.7)
    assert lc["lc_win_rate"] == pytest.approx(0.5, abs=0.02)
    assert lc["length_slope"] > 3
    assert lc["lc_win_rate_ci95_low"] < 0.5 < lc["lc_win_rate_ci95_high"]


def test_a_win_that_is_not_length_survives():
    # Equal win rates at every length: the control changes nothing.
    rng = np.random.default_rng(0)
    diffs = rng.integers(-10, 11, 400)
    outcomes = (rng.random(400) < 0.7).astype(float)
    lc = length_controlled_win_rate(outcomes, diffs, np.arange(400) // 2, bootstrap=300)
    assert lc["lc_win_rate"] == pytest.approx(outcomes.mean(), abs=0.03)
    assert lc["lc_win_rate_ci95_low"] > 0.6
    assert lc["lc_win_rate_se"] == pytest.approx(math.sqrt(0.21 / 200), rel=0.5)  # 200 prompts


def test_no_length_difference_gives_the_raw_win_rate_and_reproducible_interval():
    outcomes, diffs, groups = [1, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]
    a = length_controlled_win_rate(outcomes, diffs, groups, bootstrap=50, seed=3)
    b = length_controlled_win_rate(outcomes, diffs, groups, bootstrap=50, seed=3)
    assert a["lc_win_rate"] == pytest.approx(0.75, abs=1e-3) and a["length_scale"] == 0.0
    assert a == b


def test_separable_outcomes_stay_finite():
    lc = length_controlled_win_rate([1, 1, 1], [1, 2, 3], [0, 1, 2], bootstrap=20)
    assert 0.5 < lc["lc_win_rate"] < 1.0 and math.isfinite(lc["length_slope"])


def test_bad_outcomes_are_refused():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        length_controlled_win_rate([2.0], [1], [0])
    with pytest.raises(ValueError, match="no pairs"):
        length_controlled_win_rate([], [], [])


def test_head_to_head_reports_the_length_controlled_win_rate():
    def row(policy, prompt, reward, length):
        return SampleRow(policy, prompt, 0, "p", "r", reward, 0.0, length, True)

    # The challenger wins every pair it is longer in and loses the rest.
    sft = [row("sft", i, 0.0, 10) for i in range(8)]
    ppo = [row("ppo", i, 1.0 if i < 6 else -1.0, 20 if i < 6 else 5) for i in range(8)]
    c = head_to_head(sft, ppo)
    assert c["win_rate"] == pytest.approx(0.75)
    assert c["lc_win_rate"] < c["win_rate"] - 0.1
    assert {"lc_win_rate_se", "lc_win_rate_ci95_low", "lc_win_rate_ci95_high", "length_slope"} <= set(c)
