"""Preference encoding: each response encoded once, C(K,2) comparisons indexed across the batch."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.data.formats import PreferenceRow, SkipRow, to_preference_row
from rlhf_lightning.data.preference import PreferenceDataModule, collate_preferences, preference_example
from rlhf_lightning.data.render import encode_pair
from rlhf_lightning.errors import DataFormatError

USER = [{"role": "user", "content": "Name a fruit"}]


@pytest.fixture
def module(tiny_tokenizer):
    dm = PreferenceDataModule(train="unused.jsonl", tokenizer="tiny:llama", max_length=64, batch_size=2)
    dm.tokenizer = tiny_tokenizer
    return dm


def test_k4_row_gives_4_sequences_and_6_pairs(module, tiny_tokenizer):
    responses = ["apple", "pear", "fig", "plum tree"]
    example = module.encode(PreferenceRow(USER, responses))
    prompt_ids, _ = encode_pair(tiny_tokenizer, USER, "x")
    assert len(example["sequences"]) == 4
    for seq, text in zip(example["sequences"], responses):
        assert seq == prompt_ids + encode_pair(tiny_tokenizer, USER, text)[1]
        assert seq[-1] == tiny_tokenizer.eos_token_id
    assert example["response_lengths"] == [6, 5, 4, 10]  # bytes + EOS
    assert example["margin"] is None

    batch = module.collate([example])
    assert batch["input_ids"].shape == (4, len(prompt_ids) + 10)
    assert batch["pairs"].tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert batch["groups"].tolist() == [0] * 6
    assert batch["margins"].tolist() == [0.0] * 6
    assert (batch["pairs"][:, 0] < batch["pairs"][:, 1]).all()  # the winner is listed first (better)
    assert batch["response_lengths"].tolist() == [6.0, 5.0, 4.0, 10.0]


def test_batch_of_two_rows_offsets_groups_and_margins(module, tiny_tokenizer):
    k4 = module.encode(PreferenceRow(USER, ["a", "bb", "ccc", "dddd"]))
    pair = module.encode(PreferenceRow("Q: ", ["yes", "no"], margin=1.5))
    batch = module.collate([pair, k4])
    assert batch["input_ids"].shape[0] == 6
    assert batch["pairs"].tolist() == [[0, 1], [2, 3], [2, 4], [2, 5], [3, 4], [3, 5], [4, 5]]
    assert batch["groups"].tolist() == [0, 1, 1, 1, 1, 1, 1]
    assert batch["margins"].tolist() == [1.5, 0, 0, 0, 0, 0, 0]
    pad_id = tiny_tokenizer.pad_token_id
    lengths = batch["attention_mask"].sum(1).tolist()
    for i, seq in enumerate(pair["sequences"] + k4["sequences"]):
        assert lengths[i] == len(seq)
        assert batch["input_ids"][i, : len(seq)].tolist() == seq  # right padded
        assert (batch["input_ids"][i, len(seq) :] == pad_id).all()
    assert batch["input_ids"][0, :3].tolist() == tiny_tokenizer("Q: ", add_special_tokens=False)["input_ids"]


def test_collate_dtypes():
    batch = collate_preferences([preference_example([1], [[2], [3]], 0.5, 8)], pad_token_id=0)
    assert batch["pairs"].dtype == torch.long and batch["groups"].dtype == torch.long
    assert batch["margins"].dtype == torch.float and batch["response_lengths"].dtype == torch.float
    assert batch["margins"].tolist() == [0.5]


def test_shared_prompt_layout_holds_each_prompt_once_and_restarts_positions_after_it():
    examples = [
        preference_example([1, 2], [[3, 4], [5]], None, 8),
        preference_example([6], [[7], [8, 9]], None, 8),
    ]
    batch = collate_preferences(examples, pad_token_id=0, share_prompt=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["segments"].tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 2, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert batch["response_rows"].tolist() == [0, 0, 1, 1]
    assert batch["response_starts"].tolist() == [2, 4, 1, 2]
    assert batch["pairs"].tolist() == [[0, 1], [2, 3]]  # the same indices as one row per response


def test_truncation_cuts_every_response_to_the_room_left():
    example = preference_example([1, 2, 3], [[4, 5, 6, 7], [8, 9], [4, 5, 9, 9]], None, max_length=6)
    assert example["sequences"] == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 8, 9], [1, 2, 3, 4, 5, 9]]
    assert example["response_lengths"] == [3, 2, 3]


def test_identical_after_truncation_is_skipped():
    with pytest.raises(SkipRow) as info:
        preference_example([1, 2, 3], [[4, 5, 6, 7], [4, 5, 9]], None, max_length=5)
    assert info.value.reason == "responses identical after truncation to max_length"
    with pytest.raises(SkipRow) as info:
        preference_example([1, 2, 3], [[4], [5]], None, max_length=3)
    assert info.value.reason == "prompt fills max_length"


def test_datamodule_counts_both_kinds_of_skip(write_jsonl):
    common = "x" * 30
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "responses": ["one", "two", "three"]},
        {"prompt": "r", "chosen": common + " good", "rejected": common + " bad"},  # same first 31 tokens
        {"prompt": "s", "chosen": "same", "rejected": "same"},
        {"prompt": "t" * 40, "chosen": "a", "rejected": "b"},
    ]
    dm = PreferenceDataModule(
        train=str(write_jsonl(rows)), tokenizer="tiny:llama", max_length=32, batch_size=8
    )
    with pytest.warns(UserWarning, match="skipped rows"):
        dm.setup("fit")
    assert dm.skipped == {
        "identical responses": 1,
        "prompt fills max_length": 1,
        "responses identical after truncation to max_length": 1,
    }
    assert len(dm.train_data) == 2
    assert dm.example_length(dm.train_data[1]) == sum(len(s) for s in dm.train_data[1]["sequences"])
    batches = list(dm.train_dataloader())
    assert len(batches) == 1
    assert batches[0]["input_ids"].shape[0] == 5 and batches[0]["pairs"].shape == (4, 2)


def test_tied_scores_give_no_comparison(module):
    """Scores [9, 7, 7, 1]: the two 7s are not compared, every other pair is (5 of the 6)."""
    row = to_preference_row({"prompt": USER, "responses": ["b", "a", "c", "d"], "scores": [7, 9, 7, 1]}, "t")
    batch = module.collate([module.encode(row)])
    assert batch["pairs"].tolist() == [[0, 1], [0, 2], [0, 3], [1, 3], [2, 3]]
    assert batch["groups"].tolist() == [0] * 5


def test_ignored_columns_are_named_once_and_kept_rows_load(write_jsonl):
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "id": 1, "source": "web"},
        {"prompt": "q", "responses": ["one", "two"], "scores": [1, 2], "id": 2},
    ]
    dm = PreferenceDataModule(
        train=str(write_jsonl(rows)), tokenizer="tiny:llama", max_length=64, batch_size=8
    )
    with pytest.warns(
        UserWarning, match=r"ignored column\(s\) 'id', 'source' \(a preference row is read from"
    ) as record:
        dm.setup("fit")
    assert sum("ignored column" in str(w.message) for w in record) == 1
    assert len(dm.train_data) == 2


def test_a_misread_ranking_fails_at_setup_naming_file_row_and_field(write_jsonl):
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "responses": ["bad", "ok", "best"], "ranking": [2, 1, 0]},
    ]
    path = write_jsonl(rows)
    dm = PreferenceDataModule(train=str(path), tokenizer="tiny:llama", max_length=64, batch_size=8)
    with pytest.raises(DataFormatError, match=rf"{path.name} row 2: field 'ranking'"):
        dm.setup("fit")
