"""scripts/reward_learning_curve.py: the noise-free relabelling that separates label noise from model limits."""

from __future__ import annotations

import json

from rlhf_lightning.annotator import SimulatedAnnotator
from rlhf_lightning.data.render import user_text
from rlhf_lightning.data.sources import BUNDLED_DIR


def test_noise_free_ranks_follow_the_gold_score_and_keep_everything_else(script):
    row = {
        "prompt": [{"role": "user", "content": "Explain volcanoes in one sentence."}],
        "responses": [
            "I hate this.",  # off topic, negative
            "Volcanoes are wonderful mountains where melted rock erupts.",  # on topic, warm, finished
            "Volcanoes volcanoes volcanoes volcanoes",  # on topic, repetitive, unfinished
        ],
        "ranks": [1, 3, 2],
        "finished": [True, True, False],
        "source": "metadata stays",
    }
    relabelled = script("reward_learning_curve").noise_free(row)
    annotator = SimulatedAnnotator()
    gold = [
        annotator.score("Explain volcanoes in one sentence.", r, f)
        for r, f in zip(row["responses"], row["finished"])
    ]
    assert gold[1] > gold[2] > gold[0]
    assert relabelled["ranks"] == [3, 1, 2]
    assert {k: v for k, v in relabelled.items() if k != "ranks"} == {
        k: v for k, v in row.items() if k != "ranks"
    }


def test_noise_free_agrees_with_the_bundled_validation_rankings(script):
    # preferences_val was written in the noise-free order by the demo-data recipe: relabelling keeps it
    curve = script("reward_learning_curve")
    rows = [
        json.loads(line) for line in (BUNDLED_DIR / "preferences_val.jsonl").read_text().splitlines()[:10]
    ]
    annotator = SimulatedAnnotator()
    for row in rows:
        gold_ranks = curve.noise_free(row, annotator)["ranks"]
        # equal gold scores may be ordered either way; every strict gold preference must match
        gold = [
            annotator.score(user_text(row["prompt"]), r, f) for r, f in zip(row["responses"], row["finished"])
        ]
        for a in range(len(gold)):
            for b in range(len(gold)):
                if gold[a] > gold[b]:
                    assert row["ranks"][a] < row["ranks"][b] and gold_ranks[a] < gold_ranks[b]
