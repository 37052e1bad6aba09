"""The simulated annotator: a rubric a person would agree with, calibrated noise, and a known exploit."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from rlhf_lightning.annotator import (
    INSTRUCTGPT_AGREEMENT,
    SimulatedAnnotator,
    accuracy_with_error,
    calibrate_temperature,
    error_for_accuracy,
    expected_agreement,
    truth_agreement,
)
from rlhf_lightning.data.sources import BUNDLED_DIR
from rlhf_lightning.demo_data import load_manifest

PROMPT = "Explain photosynthesis to a ten-year-old."
GOOD = "Photosynthesis is how plants make food from sunlight, water and air. It is a wonderful process!"


@pytest.fixture(scope="module")
def annotator():
    return SimulatedAnnotator()


def test_rubric_prefers_what_a_person_would(annotator):
    good = annotator.score(PROMPT, GOOD)
    assert good > annotator.score(PROMPT, "Cars are fast and roads are long.")  # off topic
    assert good > annotator.score(PROMPT, GOOD, finished=False)  # ran out of tokens
    assert good > annotator.score(PROMPT, "plants plants plants plants plants plants plants")  # repetitive
    assert good > annotator.score(
        PROMPT, GOOD + " " + " ".join(["More words about plants and light."] * 8)
    )  # long
    assert good > annotator.score(PROMPT, "Photosynthesis is a terrible, awful, hateful process.")  # hostile


def test_components_are_bounded(annotator):
    parts = annotator.components(PROMPT, GOOD)
    assert set(parts) == {"warmth", "on_topic", "concise", "finished", "fresh"}
    assert -1.0 <= parts["warmth"] <= annotator.rubric.warmth_cap
    assert all(0.0 <= parts[k] <= 1.0 for k in ("on_topic", "concise", "finished", "fresh"))
    assert parts["on_topic"] == pytest.approx(1.0)  # "photosynthesis": the prompt's only content word


def test_sentiment_stuffing_is_the_known_exploit(annotator):
    """Gushing raises VADER sentiment (what a proxy trained on warm answers learns to pay for) but not gold."""
    stuffed = GOOD + " Wonderful amazing great happy love joy wonderful amazing great happy love joy!"
    vader = annotator._vader.polarity_scores
    assert vader(stuffed)["compound"] > vader(GOOD)["compound"]
    assert annotator.score(PROMPT, stuffed) < annotator.score(PROMPT, GOOD)


def test_calibration_hits_the_target_agreement():
    rng = random.Random(0)
    gaps = [rng.gauss(0, 0.6) for _ in range(500)]
    temperature = calibrate_temperature(gaps, 0.73)
    assert expected_agreement(gaps, temperature) == pytest.approx(0.73, abs=1e-6)
    # two labels that each match the truth with probability p agree with probability p^2 + (1-p)^2
    p = truth_agreement(gaps, temperature)
    assert 0.8 < p < 0.86
    assert calibrate_temperature(gaps, 0.9) < temperature  # less noise, more agreement


def test_accuracy_with_gaussian_error_by_hand_and_by_simulation():
    # one pair with gap 1 and error sd 1 per score: the difference's error has sd sqrt(2),
    # so the order is right with probability Phi(1 / sqrt(2)) = 0.76025
    assert accuracy_with_error([1.0], 1.0) == pytest.approx(0.760250, abs=1e-6)
    assert accuracy_with_error([1.0, -1.0, 0.0], 1.0) == pytest.approx(0.760250, abs=1e-6)  # ties left out
    assert accuracy_with_error([0.3], 0.0) == 1.0
    rng = random.Random(0)
    gaps = [rng.gauss(0, 0.6) for _ in range(200)]
    simulated = sum(
        (g + rng.gauss(0, 0.4)) - rng.gauss(0, 0.4) > 0
        if g > 0
        else (g + rng.gauss(0, 0.4)) - rng.gauss(0, 0.4) < 0
        for g in gaps * 100
    ) / (len(gaps) * 100)
    assert accuracy_with_error(gaps, 0.4) == pytest.approx(simulated, abs=0.005)
    sigma = error_for_accuracy(gaps, 0.8)
    assert accuracy_with_error(gaps, sigma) == pytest.approx(0.8, abs=1e-6)
    assert error_for_accuracy(gaps, 0.9) < sigma  # higher accuracy, smaller error
    with pytest.raises(ValueError):
        error_for_accuracy(gaps, 0.4)


def test_two_labels_of_a_pair_agree_as_often_as_instructgpt_labelers():
    """Bradley-Terry draws on the bundled pairs, at the calibrated temperature: two independent labels
    of a pair agree ~72.6% of the time (InstructGPT's inter-labeler agreement)."""
    manifest = load_manifest()
    annotator = SimulatedAnnotator(temperature=manifest["annotator"]["temperature"])
    samples = [json.loads(line) for line in (BUNDLED_DIR / "samples.jsonl").read_text().splitlines()]
    samples = [s for s in samples if s["split"] == "train"]
    golds = [
        [annotator.score(s["prompt"], t, f) for t, f in zip(s["responses"], s["finished"]) if t]
        for s in samples
    ]
    pairs = [(a, b) for g in golds for a, b in itertools.combinations(g, 2) if a != b]
    rng = random.Random(1)
    draws = 20
    agree = sum(
        annotator.compare(a, b, rng) == annotator.compare(a, b, rng) for a, b in pairs for _ in range(draws)
    )
    n = len(pairs) * draws
    agreement = agree / n
    stderr = (agreement * (1 - agreement) / n) ** 0.5
    assert abs(agreement - INSTRUCTGPT_AGREEMENT) < 0.01 + 4 * stderr, agreement


def test_rank_is_a_permutation_whose_pairs_follow_bradley_terry():
    annotator = SimulatedAnnotator(temperature=0.5)
    rng = random.Random(0)
    golds = [1.0, 0.5, 0.0]
    wins = 0
    for _ in range(4000):
        order = annotator.rank(golds, rng)
        assert sorted(order) == [0, 1, 2]
        wins += order.index(0) < order.index(2)
    # Plackett-Luce with two items' marginal: P(0 before 2) is not exactly BT(0, 2) with a third item,
    # but it must favour the better item clearly and stay below certainty.
    assert 0.8 < wins / 4000 < 0.98


@pytest.mark.parametrize(
    "prompt",
    ["Explain volcanoes in one sentence.", "Name one fun fact about volcanoes.",
     "In a few words, what is a volcano? Keep it brief.", "Tell a two-sentence story about volcanoes.",
     "Summarize, in three short sentences, what volcanoes are for a ten-year-old."],
)  # fmt: skip
def test_on_topic_asks_for_the_topic_however_the_request_is_phrased(annotator, prompt):
    """Instruction and form words ("sentence", "fact", "story") are not topics; inflections match."""
    answer = "A volcano is a mountain that can erupt with hot lava, ash and gas."
    assert annotator.components(prompt, answer)["on_topic"] == pytest.approx(1.0)
    assert annotator.components(prompt, "Cats like to sleep in warm places.")["on_topic"] == 0.0


def test_topic_stems_match_inflections():
    from rlhf_lightning.annotator import mentions, stem, topic_words

    assert stem("volcanoes") == "volcano" and stem("butterflies") == "butterfly"
    assert stem("photosynthesis") == "photosynthesis" and stem("glass") == "glass"
    assert topic_words("Give me one quick tip for cooking.") == {"cook"}
    assert mentions("magnet", {"magnetic"}) and mentions("cook", {"cooks"}) and not mentions("cook", {"book"})


def test_weighted_components_sum_to_the_gold_score(annotator):
    prompt, response = "Explain volcanoes in one sentence.", "Volcanoes are wonderful mountains that erupt."
    parts = annotator.weighted_components(prompt, response, finished=False)
    assert sum(parts.values()) == annotator.score(prompt, response, finished=False)
    assert parts["finished"] == 0.0 and parts["on_topic"] == annotator.rubric.on_topic


@pytest.mark.parametrize(
    ("responses", "finished", "term"),
    [
        (["Volcanoes are mountains that erupt.", "Cats are animals that purr."], (True, True), "on_topic"),
        (
            ["Volcanoes are mountains that erupt.", "Volcanoes are mountains that erupt."],
            (True, False),
            "finished",
        ),
        (["Volcanoes are wonderful, lovely mountains.", "Volcanoes are mountains."], (True, True), "warmth"),
        (
            ["Volcanoes erupt.", "Volcanoes erupt erupt volcanoes erupt erupt volcanoes erupt."],
            (True, True),
            "fresh",
        ),
    ],
)
def test_the_deciding_term_is_the_largest_weighted_difference(annotator, responses, finished, term):
    prompt = "Explain volcanoes in one sentence."
    assert annotator.deciding_term(prompt, responses, finished) == term
    a, b = (annotator.weighted_components(prompt, r, f) for r, f in zip(responses, finished))
    assert abs(a[term] - b[term]) == max(abs(a[t] - b[t]) for t in a)
