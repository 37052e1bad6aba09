"""SFT encoding: loss on completion tokens only, EOS at the end, truncation, skips, padding, grouping."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf_lightning.data.batching import IGNORE_INDEX, LengthGroupedSampler, mask_of, pad
from rlhf_lightning.data.formats import SFTRow, SkipRow
from rlhf_lightning.data.render import encode_pair
from rlhf_lightning.data.sft import SFTDataModule, sft_example

USER = [{"role": "user", "content": "Say apple"}]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def module(tiny_tokenizer):
    dm = SFTDataModule(train="unused.jsonl", tokenizer="tiny:llama", max_length=64, batch_size=2)
    dm.tokenizer = tiny_tokenizer
    return dm


def test_chat_row_masks_prompt_and_keeps_completion_ids(module, tiny_tokenizer):
    tok = tiny_tokenizer
    example = module.encode(SFTRow(USER, "apple!"))
    prompt = _ids(tok, "<|im_start|>user\nSay apple<|im_end|>\n<|im_start|>assistant\n")
    completion = _ids(tok, "apple!") + [tok.eos_token_id]
    assert tok.eos_token_id == 257 and tok.convert_tokens_to_ids("<|im_start|>") == 258
    assert prompt[0] == 258 and prompt.count(257) == 1  # specials are single tokens
    assert len(completion) == 7
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert example["labels"][-1] == tok.eos_token_id
    assert tok.decode(example["input_ids"][len(prompt) :]) == "apple!<|im_end|>"
    # the prompt is exactly what generation starts from
    assert prompt == tok.apply_chat_template(
        USER, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_string_row_is_verbatim_plus_eos(module, tiny_tokenizer):
    tok = tiny_tokenizer
    example = module.encode(SFTRow("Q: 2+2?\nA:", " 4"))
    prompt = _ids(tok, "Q: 2+2?\nA:")
    assert len(prompt) == 10  # one byte per token
    assert example["input_ids"] == prompt + _ids(tok, " 4") + [tok.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * 10 + _ids(tok, " 4") + [257]


def test_plain_text_row_has_no_masked_tokens(module, tiny_tokenizer):
    example = module.encode(SFTRow("", "hello"))
    assert example["labels"] == example["input_ids"] == _ids(tiny_tokenizer, "hello") + [257]


def test_prompt_and_completion_are_encoded_separately(tiny_tokenizer):
    prompt_ids, completion_ids = encode_pair(tiny_tokenizer, USER, "apple")
    assert (
        tiny_tokenizer.decode(prompt_ids) == "<|im_start|>user\nSay apple<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(completion_ids) == "apple<|im_end|>"


def test_truncation_keeps_at_least_one_completion_token():
    prompt, completion = [5, 6, 7], [10, 11, 12, 13]
    assert sft_example(prompt, completion, max_length=5) == {
        "input_ids": [5, 6, 7, 10, 11],
        "labels": [IGNORE_INDEX] * 3 + [10, 11],
    }
    assert sft_example(prompt, completion, max_length=4) == {
        "input_ids": [5, 6, 7, 10],
        "labels": [IGNORE_INDEX] * 3 + [10],
    }
    assert sft_example(prompt, completion, max_length=100)["input_ids"] == prompt + completion


@pytest.mark.parametrize("max_length", [2, 3])
def test_prompt_filling_max_length_is_skipped(max_length):
    with pytest.raises(SkipRow) as info:
        sft_example([5, 6, 7], [10], max_length=max_length)
    assert info.value.reason == "prompt fills max_length"


def test_datamodule_counts_skipped_rows(write_jsonl):
    rows = [{"prompt": f"Say {w}", "completion": w} for w in ["apple", "pear", "plum", "fig", "kiwi", "lime"]]
    rows.append({"prompt": "x" * 40, "completion": "too long"})  # 40 byte tokens >= max_length 32
    rows.append({"prompt": "y" * 31, "completion": "truncated to one token"})
    path = write_jsonl(rows)
    dm = SFTDataModule(
        train=str(path), tokenizer="tiny:llama", max_length=32, batch_size=2, val_fraction=0.25
    )
    with pytest.warns(UserWarning, match="skipped rows: 1 × prompt fills max_length"):
        dm.setup("fit")
    assert dm.skipped == {"prompt fills max_length": 1}
    assert len(dm.train_data) + len(dm.val_data) == 7
    assert len(dm.val_data) == 2  # round(0.25 * 8 rows read)
    assert all(len(e["input_ids"]) <= 32 for e in dm.train_data + dm.val_data)
    assert all(any(label != IGNORE_INDEX for label in e["labels"]) for e in dm.train_data + dm.val_data)


def test_datamodule_all_rows_skipped_is_an_error(write_jsonl):
    path = write_jsonl([{"prompt": "x" * 40, "completion": "y"}])
    dm = SFTDataModule(train=str(path), tokenizer="tiny:llama", max_length=16)
    with pytest.raises(ValueError, match="every row was skipped"):
        dm.setup("fit")


def test_datamodule_validates_arguments():
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        SFTDataModule(train="x.jsonl", max_length=1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        SFTDataModule(train="x.jsonl", batch_size=0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        SFTDataModule(train="x.jsonl", val_fraction=1.0)


def test_collate_pads_right(module, tiny_tokenizer):
    short = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}
    long = {"input_ids": [4, 5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8]}
    batch = module.collate([short, long])
    pad_id = tiny_tokenizer.pad_token_id
    assert pad_id == 256 != tiny_tokenizer.eos_token_id
    assert batch["input_ids"].tolist() == [[1, 2, 3, pad_id, pad_id], [4, 5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 6, 7, 8]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_left_and_mask():
    assert pad([[1], [2, 3, 4]], 0, left=True).tolist() == [[0, 0, 1], [2, 3, 4]]
    assert mask_of([[1], [2, 3, 4]], left=True).tolist() == [[0, 0, 1], [1, 1, 1]]
    assert pad([[], [7, 8]], 9).tolist() == [[9, 9], [7, 8]]


def test_train_dataloader_batches_are_padded_to_their_longest_row(write_jsonl):
    rows = [{"prompt": "p" * n, "completion": "c" * n} for n in range(1, 21)]
    dm = SFTDataModule(train=str(write_jsonl(rows)), tokenizer="tiny:llama", max_length=64, batch_size=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == 20
    for b in batches:
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
        real = b["attention_mask"].bool()
        assert (b["input_ids"][~real] == 256).all()
        assert (b["labels"][~real] == IGNORE_INDEX).all()


def test_length_grouped_sampler_is_a_grouped_permutation():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    batch_size, group_size = 8, 4
    sampler = LengthGroupedSampler(lengths, batch_size, group_size=group_size, seed=3)
    order = list(sampler)
    assert len(sampler) == 1000
    assert sorted(order) == list(range(1000))
    assert order == list(sampler)  # deterministic for a seed and epoch
    chunk = batch_size * group_size
    for start in range(0, 1000, chunk):
        got = [lengths[i] for i in order[start : start + chunk]]
        assert got == sorted(got, reverse=True)

    def padding(order):
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    assert padding(order) < 0.4 * padding(shuffled)  # about 0.27 here

    sampler.set_epoch(1)
    next_epoch = list(sampler)
    assert sorted(next_epoch) == list(range(1000)) and next_epoch != order
