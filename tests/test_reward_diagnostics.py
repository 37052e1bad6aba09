"""scripts/reward_diagnostics.py: accuracy by deciding term, and what the training labels carry."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhf_lightning.annotator import SimulatedAnnotator


def test_bradley_terry_fit_recovers_the_weights_that_drew_the_labels(script):
    diag = script("reward_diagnostics")
    rng = random.Random(0)
    true_w = [2.0, -1.0]
    diffs = []
    for _ in range(20000):
        d = [rng.gauss(0, 1), rng.gauss(0, 1)]
        p = 1 / (1 + math.exp(-(true_w[0] * d[0] + true_w[1] * d[1])))
        diffs.append(d if rng.random() < p else [-d[0], -d[1]])  # winner minus loser
    w = diag.fit_bradley_terry(torch.tensor(diffs, dtype=torch.float64), l2=0.0)
    assert w.tolist() == pytest.approx(true_w, rel=0.05)


def test_ranking_differences_are_winner_minus_loser(script):
    diag = script("reward_diagnostics")
    annotator = SimulatedAnnotator()
    prompt = "Explain volcanoes in one sentence."
    row = {
        "prompt": [{"role": "user", "content": prompt}],
        "responses": ["Cats purr.", "Volcanoes are mountains that erupt.", "Volcanoes erupt"],
        "ranks": [3, 1, 2],
        "finished": [True, True, False],
    }
    f = [diag.term_features(annotator, prompt, r, fin) for r, fin in zip(row["responses"], row["finished"])]
    expected = [
        [a - b for a, b in zip(f[1], f[0])],  # rank 1 beat rank 3
        [a - b for a, b in zip(f[2], f[0])],  # rank 2 beat rank 3
        [a - b for a, b in zip(f[1], f[2])],  # rank 1 beat rank 2
    ]
    assert diag.ranking_differences([row], annotator).tolist() == expected


def test_ranking_pairs_index_winner_then_loser(script):
    diag = script("reward_diagnostics")
    rows = [{"responses": ["a", "b", "c"], "ranks": [3, 1, 2]}, {"responses": ["d", "e"], "ranks": [1, 2]}]
    assert diag.ranking_pairs(rows) == [(0, 1, 0), (0, 2, 0), (0, 1, 2), (1, 0, 1)]


def test_probe_scores_recover_the_feature_that_decides(script):
    diag = script("reward_diagnostics")
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=gen) * torch.tensor([1.0, 5.0, 0.1, 3.0, 1.0, 1.0])
    pairs = torch.randint(0, 200, (2000, 2), generator=gen)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    winner_first = features[pairs[:, 0], 2] > features[pairs[:, 1], 2]  # a small-scale feature decides
    train = torch.where(winner_first[:, None], pairs, pairs.flip(1))
    scores = diag.probe_scores(features, train, l2=1e-3)
    ranks = scores.argsort().argsort().double()
    assert torch.corrcoef(torch.stack([ranks, features[:, 2].argsort().argsort().double()]))[0, 1] > 0.99


def test_end_to_end_on_a_tiny_reward_model(script, tiny_exports, tmp_path):
    diag = script("reward_diagnostics")
    annotator = SimulatedAnnotator()
    topics = ["volcanoes", "glaciers", "comets", "tides", "magnets", "deserts"]
    train, held_out = [], []
    for topic in topics:
        prompt = f"Explain {topic} in one sentence."
        responses = [f"{topic.capitalize()} are wonderful.", f"{topic.capitalize()} exist", "Cats purr."]
        finished = [True, False, True]
        gold = [annotator.score(prompt, r, f) for r, f in zip(responses, finished)]
        order = sorted(range(3), key=lambda i: -gold[i])
        train.append({
            "prompt": [{"role": "user", "content": prompt}], "responses": responses,
            "ranks": [order.index(i) + 1 for i in range(3)], "finished": finished,
        })  # fmt: skip
        held_out.append({
            "prompt": [{"role": "user", "content": prompt}], "responses": [responses[0], responses[2]],
            "finished": [True, True],
        })  # fmt: skip
    paths = {}
    for name, rows in (("train", train), ("held_out", held_out)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "diag.json"
    report = diag.main([
        "--reward", str(tiny_exports["reward"]), "--train", str(paths["train"]),
        "--held_out", str(paths["held_out"]), "--output", str(out),
        "--val", str(paths["train"]), "--probe_model", str(tiny_exports["policy"]), "--probe_layers", "0", "2",
    ])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["pairs"] == len(topics)
    fit = report["rubric_terms_fitted_to_the_training_labels"]
    assert fit["accuracy"] == 1.0 and set(fit["by_deciding_term"]) == {"on_topic"}
    rm = report["reward_model"]
    assert rm["by_deciding_term"]["on_topic"]["pairs"] == len(topics)
    assert 0.0 <= rm["accuracy"] <= 1.0 and rm["interval"][0] <= rm["accuracy"] <= rm["interval"][1]
    probe = report["backbone_probe"]
    assert {(r["layer"], r["reading"]) for r in probe["by_layer"]} == {
        (layer, reading) for layer in (0, 2) for reading in ("last", "mean+last")
    }
    chosen = probe["chosen"]
    assert chosen["validation"] == max(r["validation"] for r in probe["by_layer"])
    assert 0.0 <= chosen["accuracy"] <= 1.0 and set(chosen["by_deciding_term"]) == {"on_topic"}
    curve = probe["learning_curve"]
    assert [p["rankings"] for p in curve] == [1, 2, 3, 6]  # round(fraction * 6), at least one
    assert [p["comparisons"] for p in curve] == [3, 6, 9, 18]
