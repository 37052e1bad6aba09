"""The bundled demo data is consistent: K responses, valid rankings, no prompt shared across splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_lightning.data.formats import to_preference_row, to_prompt_row, to_sft_row
from rlhf_lightning.data.sources import BUNDLED_DIR, read_rows
from rlhf_lightning.demo_data import FILES, demo_prompts, load_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (BUNDLED_DIR / f"{name}.jsonl").read_text().splitlines()]


def _prompt(row: dict) -> str:
    return row["prompt"][-1]["content"]


def test_manifest_records_the_recipe_and_sizes():
    manifest = load_manifest()
    assert manifest["command"].startswith("python scripts/make_demo_data.py")
    assert manifest["sampling"]["model"] == "bundled:SmolLM2-135M-Instruct"
    assert manifest["sampling"]["k"] == 4  # held-out prompts; training prompts get 4 and then 8 more
    assert manifest["sampling"]["added_training_responses"] == [{"k": 4, "seed": 1}, {"k": 8, "seed": 2}]
    assert manifest["demo_candidates"] == 8
    assert manifest["annotator"]["expected_agreement"] == pytest.approx(0.726, abs=1e-3)
    for name in FILES:
        assert manifest["sizes"][name] == len(_rows(name)), name


@pytest.mark.parametrize(
    "name,parse", [("sft_train", to_sft_row), ("sft_val", to_sft_row), ("preferences_train", to_preference_row),
                   ("preferences_val", to_preference_row), ("prompts_train", to_prompt_row),
                   ("eval_prompts", to_prompt_row), ("eval_preferences", to_preference_row)],
)  # fmt: skip
def test_every_bundled_file_parses_without_skips(name, parse):
    rows, skipped = read_rows(f"bundled:{name}", parse)
    assert len(rows) == load_manifest()["sizes"][name]
    assert skipped == {}


def test_rankings_have_k_responses_and_strict_ranks():
    sampling = load_manifest()["sampling"]
    k = sampling["k"] + sum(r["k"] for r in sampling.get("added_training_responses", []))
    assert k == 16
    for row in _rows("preferences_train") + _rows("preferences_val"):
        n = len(row["responses"])
        assert 2 <= n <= k
        assert sorted(row["ranks"]) == list(range(1, n + 1))
        assert len(row["finished"]) == n


def test_demonstrations_are_the_best_finished_of_the_first_candidates():
    from rlhf_lightning.annotator import SimulatedAnnotator

    annotator = SimulatedAnnotator()
    n = load_manifest()["demo_candidates"]
    samples = {s["prompt"]: s for s in _rows("samples")}
    for row in _rows("sft_train")[:40]:
        sample = samples[_prompt(row)]
        i = sample["responses"].index(row["completion"])
        assert i < n and sample["finished"][i]
        finished = [t for t, f in zip(sample["responses"][:n], sample["finished"][:n]) if f]
        assert annotator.score(_prompt(row), row["completion"]) == max(
            annotator.score(_prompt(row), t) for t in finished
        )


def test_no_prompt_leaks_between_training_and_held_out_data():
    train = {_prompt(r) for name in ("sft_train", "sft_val", "preferences_train", "preferences_val",
                                     "prompts_train") for r in _rows(name)}  # fmt: skip
    held_out = {_prompt(r) for name in ("eval_prompts", "eval_preferences") for r in _rows(name)}
    assert train and held_out
    assert not train & held_out


def test_held_out_pairs_are_ordered_by_the_noise_free_gold_score():
    from rlhf_lightning.annotator import SimulatedAnnotator

    annotator = SimulatedAnnotator()
    for row in _rows("eval_preferences")[:60]:
        better, worse = row["responses"]
        gold = [annotator.score(_prompt(row), t, f) for t, f in zip(row["responses"], row["finished"])]
        assert gold[0] > gold[1]
        assert row["gold_margin"] == pytest.approx(gold[0] - gold[1], abs=1e-9)


def test_demo_prompts_are_distinct_and_cover_every_task():
    prompts = demo_prompts(200)
    assert len({p["text"] for p in prompts}) == 200
    assert {p["task"] for p in prompts} == {"explain", "advice", "support", "creative", "compare"}


def test_held_out_prompts_are_about_topics_no_training_prompt_mentions():
    from rlhf_lightning.demo_data import split_fills

    fills = split_fills()
    for key in ("t", "a", "e"):
        assert fills["held_out"][key] and fills["train"][key]
        assert not set(fills["held_out"][key]) & set(fills["train"][key])
    train_text = " ".join(_prompt(r) for name in ("prompts_train", "prompts_val") for r in _rows(name))
    for row in _rows("eval_prompts"):
        assert _prompt(row) not in train_text
    held_out_subjects = [s for key in ("t", "a", "e") for s in fills["held_out"][key]]
    for row in _rows("prompts_train"):
        text = _prompt(row)
        assert not any(f" {s} " in f" {text.rstrip('.?')} " for s in held_out_subjects), text


def test_the_sampling_settings_are_the_ppo_stages():
    import yaml

    ppo = yaml.safe_load((REPO_ROOT / "configs" / "ppo.yaml").read_text())["model"]["init_args"]
    sampling = load_manifest()["sampling"]
    assert sampling["max_new_tokens"] == ppo["max_new_tokens"]
    assert sampling["temperature"] == ppo["temperature"]
    assert sampling["top_p"] == 1.0


def test_the_recipe_adds_rounds_of_responses_and_keeps_demonstrations_to_the_first(tmp_path):
    from rlhf_lightning.demo_data import add_training_responses, annotate_and_split, sample_demo_responses

    sample_demo_responses(tmp_path, "tiny:llama", n_prompts=12, n_eval=3, k=2, max_new_tokens=6)
    add_training_responses(tmp_path, 1, seed=1)
    add_training_responses(tmp_path, 3, seed=2)
    manifest = annotate_and_split(tmp_path, demo_candidates=2)
    assert manifest["sampling"]["added_training_responses"] == [{"k": 1, "seed": 1}, {"k": 3, "seed": 2}]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {len(s["responses"]) for s in samples if s["split"] == "train"} == {6}
    assert {len(s["responses"]) for s in samples if s["split"] == "held_out"} == {2}
    by_prompt = {s["prompt"]: s for s in samples}
    demos = [
        json.loads(line) for name in ("sft_train", "sft_val") for line in (tmp_path / f"{name}.jsonl").open()
    ]
    for demo in demos:
        assert demo["completion"] in by_prompt[_prompt(demo)]["responses"][:2]
