"""The reward stage: it learns a synthetic preference through the CLI, and K-way rows cost K sequences."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from rlhf_lightning.cli import main
from rlhf_lightning.data.formats import PreferenceRow
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.render import completion_text, prompt_text
from rlhf_lightning.rl.ranking import all_pairs

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "reward.yaml"
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "table",
    "music",
    "light",
    "paper",
    "chair",
    "bread",
    "plant",
]


def _preference_rows(n: int, seed: int) -> list[dict]:
    """The chosen response thanks the user; the rejected one, of the same length, does not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me about {a}"}],
                "chosen": f"{b} {a}, thanks",
                "rejected": f"{b} {a}, sorry!",
            }
        )
    return rows


def test_reward_fit_learns_a_keyword_preference(tmp_path, write_jsonl, read_scalars):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_lightning.lm import sequence_scores
    from rlhf_lightning.models import load_reward_model

    train = write_jsonl(_preference_rows(72, seed=0), "train.jsonl")
    val = write_jsonl(_preference_rows(24, seed=1), "val.jsonl")
    logs, export = tmp_path / "logs", tmp_path / "export"
    code = main(
        [
            "reward",
            "fit",
            "-c",
            str(CONFIG),
            "--model.init_args.model",
            "tiny:llama",
            "--model.init_args.learning_rate",
            "3e-3",
            "--model.init_args.export_dir",
            str(export),
            "--data.init_args.train",
            str(train),
            "--data.init_args.val",
            str(val),
            "--data.init_args.max_length",
            "64",
            "--data.init_args.batch_size",
            "8",
            "--trainer.max_epochs",
            "3",
            "--trainer.limit_train_batches",
            "1.0",
            "--trainer.logger.init_args.save_dir",
            str(logs),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert code == 0

    scalars = read_scalars(logs)
    for tag in (
        "train/loss",
        "train/preference_accuracy",
        "val/loss",
        "val/preference_accuracy",
        "val/margin",
    ):
        assert tag in scalars, sorted(scalars)
    assert len(scalars["train/loss"]) == 27  # 72 rows / 8 per batch * 3 epochs
    accuracy = [v for _, v in scalars["val/preference_accuracy"]]
    assert len(accuracy) == 3 and accuracy[-1] >= 0.8
    val_loss = [v for _, v in scalars["val/loss"]]
    assert val_loss[-1] < 0.5 < 0.6931  # below the loss of a reward that ignores the responses
    assert scalars["val/margin"][-1][1] > 1.0

    stats = json.loads((export / "reward_stats.json").read_text())
    assert stats["source"] == "validation"
    assert set(stats) >= {"mean", "std"}
    assert abs(stats["mean"]) < 1e6 and stats["std"] > 0.0

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    ours = load_reward_model(str(export)).eval()

    def score(prompt, response) -> float:
        text = prompt_text(tokenizer, prompt) + completion_text(tokenizer, prompt, response)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        assert ids["input_ids"][0, -1].item() == tokenizer.eos_token_id
        with torch.no_grad():
            logits = model(**ids).logits
            assert logits.shape == (1, 1)
            # the exported classifier scores as the training code does
            assert sequence_scores(ours, ids["input_ids"], ids["attention_mask"]).item() == pytest.approx(
                logits.item(), abs=1e-4
            )
        return logits.item()

    held_out = [("Describe the moon", "moon silver"), ("What is rain?", "rain water"), ("Say hi", "hi hi")]
    for question, body in held_out:
        prompt = [{"role": "user", "content": question}]
        assert score(prompt, f"{body}, thanks") > score(prompt, f"{body}, sorry!")


def test_k_way_row_loss_equals_its_pairs_through_the_module(tmp_path, write_jsonl):
    from rlhf_lightning.modules.reward import RewardModule

    module = RewardModule(model="tiny:llama", export_dir=None)
    module.eval()
    responses = ["A full answer, thanks!", "An answer.", "Meh", "no idea at all, honestly"]
    prompt = [{"role": "user", "content": "How do I boil an egg?"}]
    data = PreferenceDataModule(
        train=str(write_jsonl([{"prompt": prompt, "responses": responses}])), tokenizer="tiny:llama"
    )
    data.setup("fit")

    (example,) = data.train_data
    k_way = data.collate([example])
    assert k_way["input_ids"].shape[0] == 4  # each response encoded once
    assert k_way["pairs"].shape == (6, 2)

    with torch.no_grad():
        loss, rewards, chosen, rejected = module._step(k_way)
        assert rewards.shape == (4,)
        assert chosen.shape == rejected.shape == (6,)
        pair_losses, pair_batch_examples = [], []
        for w, lo in all_pairs(4):
            pair_example = data.encode(PreferenceRow(prompt, [responses[w], responses[lo]]))
            pair_batch_examples.append(pair_example)
            pair_loss, pair_rewards, _, _ = module._step(data.collate([pair_example]))
            assert pair_rewards.tolist() == pytest.approx([rewards[w].item(), rewards[lo].item()], abs=1e-5)
            pair_losses.append(pair_loss.item())
        # all C(4,2) pairs as 6 prompts of one batch: 12 sequences, the same mean
        pooled_loss, *_ = module._step(data.collate(pair_batch_examples))

    assert len(set(round(x, 4) for x in pair_losses)) > 1  # the rewards differ, so the check is not vacuous
    assert loss.item() == pytest.approx(sum(pair_losses) / 6, abs=1e-5)
    assert pooled_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    # the winner of every comparison is the earlier response
    expected = torch.stack([rewards[w] - rewards[lo] for w, lo in all_pairs(4)])
    assert torch.allclose(chosen - rejected, expected)


def test_k_way_row_weighs_as_one_prompt_in_a_batch(write_jsonl):
    from rlhf_lightning.modules.reward import RewardModule
    from rlhf_lightning.rl.ranking import bradley_terry_loss

    module = RewardModule(model="tiny:llama", export_dir=None).eval()
    rows = [
        {"prompt": "Q1: ", "responses": ["a b c", "d e", "f", "g h i j"]},
        {"prompt": "Q2: ", "chosen": "yes", "rejected": "no", "margin": 0.5},
    ]
    data = PreferenceDataModule(train=str(write_jsonl(rows)), tokenizer="tiny:llama")
    data.setup("fit")
    batch = data.collate(data.train_data)
    assert batch["input_ids"].shape[0] == 6
    assert batch["groups"].tolist() == [0] * 6 + [1]
    with torch.no_grad():
        loss, rewards, _, _ = module._step(batch)
    per_pair = bradley_terry_loss(
        rewards[batch["pairs"][:, 0]], rewards[batch["pairs"][:, 1]], batch["margins"]
    )
    assert batch["margins"].tolist() == [0.0] * 6 + [0.5]
    assert loss.item() == pytest.approx(((per_pair[:6].mean() + per_pair[6]) / 2).item(), abs=1e-6)
