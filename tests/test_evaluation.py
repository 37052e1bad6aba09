"""The evaluation's statistics on hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from rlhf_lightning.evaluation import outcome_interval, win_rate, win_rate_interval


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


def test_outcome_interval_by_hand():
    # one outcome per prompt: the usual normal approximation with the n-1 variance
    outcomes = [1.0, 1.0, 0.0, 1.0]
    low, high = outcome_interval(outcomes, ["a", "b", "c", "d"])
    se = (sum((o - 0.75) ** 2 for o in outcomes) / 3 / 4) ** 0.5
    assert (low, high) == pytest.approx((0.75 - 1.959964 * se, min(1.0, 0.75 + 1.959964 * se)))
    # outcomes of one prompt are one observation: two prompts that each agree with themselves
    assert outcome_interval([1.0, 1.0, 0.0, 0.0], ["a", "a", "b", "b"]) == pytest.approx((0.0, 1.0))
    assert outcome_interval([1.0, 1.0, 1.0], ["a", "b", "c"]) == (1.0, 1.0)
    # unequal groups: the mean is over outcomes (2/3 here), each group weighted by its size
    low, high = outcome_interval([1.0, 1.0, 0.0], ["a", "a", "b"])
    half = 1.959964 * (2 * ((2 - 2 * 2 / 3) ** 2 + (0 - 2 / 3) ** 2) / 9) ** 0.5
    assert (low, high) == pytest.approx((max(0.0, 2 / 3 - half), min(1.0, 2 / 3 + half)))


def test_a_single_prompt_has_no_spread():
    assert win_rate_interval([1.0], [0.0]) == (1.0, 1.0)


def test_versus_gives_a_judged_policys_figures_and_its_verdict_without_the_samples():
    from rlhf_lightning.evaluation import versus

    report = {
        "policies": {"ppo": {"gold_score": 4.0, "gold_score_se": 0.1, "examples": [{"gold": 4.0}]}},
        "win_rates": {"ppo_vs_sft": 0.6, "ppo_vs_base": 0.7},
        "win_rate_intervals": {"ppo_vs_sft": [0.5, 0.7], "ppo_vs_base": [0.6, 0.8]},
        "outcomes": {
            "ppo_vs_sft": {"wins": 3, "ties": 0, "losses": 2},
            "ppo_vs_base": {"wins": 4, "ties": 0, "losses": 1},
        },
    }
    assert versus(report, "ppo") == {
        "gold_score": 4.0,
        "gold_score_se": 0.1,
        "win_rate": 0.6,
        "win_rate_interval": [0.5, 0.7],
        "outcomes": {"wins": 3, "ties": 0, "losses": 2},
    }
    assert versus(report, "ppo", "base")["win_rate"] == 0.7


def test_gold_terms_are_each_terms_mean_contribution():
    from rlhf_lightning.annotator import SimulatedAnnotator
    from rlhf_lightning.evaluation import gold_terms

    annotator = SimulatedAnnotator()
    prompts = ["Explain volcanoes in one sentence.", "Describe rain in one sentence."]
    texts = ["Volcanoes are wonderful mountains that erupt.", "It rains rains rains rains."]
    finished = [True, False]
    terms = gold_terms(annotator, prompts, texts, finished)
    each = [annotator.weighted_components(p, t, f) for p, t, f in zip(prompts, texts, finished)]
    assert terms == {term: pytest.approx((each[0][term] + each[1][term]) / 2) for term in each[0]}
    assert terms["finished"] == 0.5  # one of the two ended with EOS, weight 1
    gold = [annotator.score(p, t, f) for p, t, f in zip(prompts, texts, finished)]
    assert sum(terms.values()) == pytest.approx(sum(gold) / 2)


def test_decided_by_counts_each_win_and_loss_under_the_term_with_the_largest_weighted_difference():
    from rlhf_lightning.evaluation import decided_by, pair_outcomes

    policy = [
        {"warmth": 0.5, "on_topic": 1.5, "finished": 1.0},  # wins on warmth (+0.5) over its pair
        {"warmth": 0.0, "on_topic": 0.75, "finished": 1.0},  # loses on on_topic (-0.75), gains warmth +0.2
        {"warmth": 0.5, "on_topic": 1.5, "finished": 1.0},  # tie: left out
        {"warmth": 0.0, "on_topic": 1.5, "finished": 1.0},  # wins on finished (+1) though warmth -0.3
    ]
    sft = [
        {"warmth": 0.0, "on_topic": 1.5, "finished": 1.0},
        {"warmth": -0.2, "on_topic": 1.5, "finished": 1.0},
        {"warmth": 0.5, "on_topic": 1.5, "finished": 1.0},
        {"warmth": 0.3, "on_topic": 1.5, "finished": 0.0},
    ]
    outcomes = pair_outcomes([sum(t.values()) for t in policy], [sum(t.values()) for t in sft])
    assert outcomes == [1.0, 0.0, 0.5, 1.0]
    assert decided_by(policy, sft, outcomes) == {
        "wins": {"warmth": 1, "finished": 1},
        "losses": {"on_topic": 1},
    }


def test_the_annotators_deciding_term_is_the_decisive_term_of_its_weighted_components():
    from rlhf_lightning.annotator import SimulatedAnnotator, decisive_term

    annotator = SimulatedAnnotator()
    prompt = "Explain volcanoes in one sentence."
    responses = ["Volcanoes are wonderful mountains that erupt.", "Volcanoes are mountains that erupt."]
    a, b = (annotator.weighted_components(prompt, r) for r in responses)
    assert annotator.deciding_term(prompt, responses) == decisive_term(a, b) == "warmth"
