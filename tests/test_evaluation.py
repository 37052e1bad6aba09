"""The evaluation's statistics on hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from rlhf_lightning.evaluation import win_rate, win_rate_interval


def test_win_rate_counts_ties_half():
    assert win_rate([3.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 0.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_interval_over_independent_prompts():
    a, b = [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]  # outcomes 1, 1, 1, 0
    mean, sd = 0.75, math.sqrt(((0.25**2) * 3 + 0.75**2) / 3)
    half = 1.959964 * sd / 2
    low, high = win_rate_interval(a, b)
    assert low == pytest.approx(mean - half) and high == pytest.approx(min(1.0, mean + half))


def test_interval_treats_samples_of_one_prompt_as_one_observation():
    outcomes = [1, 1, 1, 1, 0, 0, 1, 1]  # four prompts, two samples each: prompt means 1, 1, 0, 1
    a, b = [float(o) for o in outcomes], [0.5] * 8
    grouped = win_rate_interval(a, b, groups=[0, 0, 1, 1, 2, 2, 3, 3])
    independent = win_rate_interval(a, b)
    assert grouped[0] == pytest.approx(0.75 - 1.959964 * 0.5 / 2)  # sd of (1, 1, 0, 1) is 0.5
    sd = math.sqrt((6 * 0.25**2 + 2 * 0.75**2) / 7)
    assert independent[0] == pytest.approx(0.75 - 1.959964 * sd / math.sqrt(8))
    assert grouped[0] < independent[0]  # correlated samples of a prompt: a wider interval


def test_a_single_prompt_has_no_spread():
    assert win_rate_interval([1.0], [0.0]) == (1.0, 1.0)
