"""The DPO stage: the first step's numbers, K-way rows, the reference options, and a tiny run that learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf_lightning.cli import main
from rlhf_lightning.data.formats import PreferenceRow
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.modules.dpo import DPOModule
from rlhf_lightning.rl.dpo import dpo_loss
from rlhf_lightning.rl.ranking import all_pairs

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "dpo.yaml"
PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]
RESPONSES = ["A full answer, thanks!", "An answer.", "Meh", "no idea at all, honestly"]


def _ranking(write_jsonl) -> PreferenceDataModule:
    data = PreferenceDataModule(
        train=str(write_jsonl([{"prompt": PROMPT, "responses": RESPONSES}])),
        tokenizer="tiny:llama",
        batch_size=1,
    )
    data.setup("fit")
    return data


def _moved(module: DPOModule) -> DPOModule:
    """The policy a little away from its reference, so losses and rewards are not all equal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def test_first_step_rewards_are_zero_and_the_loss_is_log_2(write_jsonl):
    module = DPOModule(model="tiny:llama", export_dir=None).eval()
    data = _ranking(write_jsonl)
    out = module._step(data.collate(data.train_data))
    assert out["chosen"].abs().max() == 0 and out["rejected"].abs().max() == 0
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["accuracies"].tolist() == [0.5] * 6  # every pair a tie


def test_k_way_row_loss_equals_its_pairs_fed_one_by_one(write_jsonl):
    module = _moved(DPOModule(model="tiny:llama", export_dir=None, beta=0.5).eval())
    data = _ranking(write_jsonl)
    with torch.no_grad():
        k_way = module._step(data.collate(data.train_data))
        pair_losses = []
        for w, lo in all_pairs(4):
            pair = data.collate([data.encode(PreferenceRow(PROMPT, [RESPONSES[w], RESPONSES[lo]]))])
            pair_losses.append(module._step(pair)["loss"].item())
    assert len({round(x, 4) for x in pair_losses}) > 1  # not vacuous: the pairs' losses differ
    assert k_way["loss"].item() == pytest.approx(sum(pair_losses) / 6, abs=1e-5)


def test_loss_options_reach_the_loss(write_jsonl):
    data = _ranking(write_jsonl)
    batch = data.collate(data.train_data)
    losses = {}
    for options in ({}, {"label_smoothing": 0.2}, {"loss_type": "ipo"}):
        module = _moved(DPOModule(model="tiny:llama", export_dir=None, beta=0.5, **options).eval())
        with torch.no_grad():
            out = module._step(batch)
            gap = (out["chosen"] - out["rejected"]) / 0.5
        expected = dpo_loss(
            gap, 0.5, options.get("loss_type", "sigmoid"), options.get("label_smoothing", 0.0)
        )
        assert out["loss"].item() == pytest.approx(expected.mean().item(), abs=1e-5)
        losses[str(options)] = out["loss"].item()
    assert len(set(losses.values())) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "applies to loss_type=sigmoid only"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ConfigurationError, match=message):
        DPOModule(model="tiny:llama", export_dir=None, **options)


def test_lora_reference_is_the_disabled_adapter(write_jsonl):
    module = DPOModule(model="tiny:llama", export_dir=None, lora={"r": 4, "alpha": 8}).eval()
    assert module.reference is None  # no second copy
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    data = _ranking(write_jsonl)
    with torch.no_grad():
        out = module._step(data.collate(data.train_data))
        with module.reference_model() as reference:
            assert reference is module.model
    assert (
        out["chosen"].abs().max() > 0
    )  # the adapter moved the policy away from the disabled-adapter reference


def _fit(tmp_path, train, val, *extra) -> int:
    return main(
        [
            "dpo", "fit", "-c", str(CONFIG),
            "--model.init_args.model", "tiny:llama",
            "--model.init_args.export_dir", str(tmp_path / "export"),
            "--data.init_args.train", str(train),
            "--data.init_args.val", str(val),
            "--data.init_args.max_length", "64",
            "--trainer.limit_train_batches", "1.0",
            "--trainer.limit_val_batches", "1.0",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--trainer.enable_progress_bar", "false",
            *extra,
        ]
    )  # fmt: skip


def _rows(n: int, seed: int) -> list[dict]:
    """The chosen response thanks the user; the rejected one, of the same length, does not."""
    import random

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "chair"]
    rows = []
    for _ in range(n):
        a, b = rng.sample(words, 2)
        rows.append(
            {"prompt": [{"role": "user", "content": f"Tell me about {a}"}], "chosen": f"{b} {a}, thanks",
             "rejected": f"{b} {a}, sorry!"}
        )  # fmt: skip
    return rows


def test_dpo_fit_raises_held_out_preference_accuracy_and_exports(tmp_path, write_jsonl, read_scalars):
    from transformers import AutoModelForCausalLM

    train, val = write_jsonl(_rows(64, 0), "train.jsonl"), write_jsonl(_rows(16, 1), "val.jsonl")
    assert _fit(tmp_path, train, val, "--trainer.max_epochs", "2", "--data.init_args.batch_size", "8") == 0
    scalars = read_scalars(tmp_path / "logs")
    for tag in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "val/preference_accuracy", "val/rewards/margins"):  # fmt: skip
        assert tag in scalars, sorted(scalars)
    # at the start the policy is its reference: every held-out pair ties (accuracy 0.5, test above)
    accuracy = [v for _, v in scalars["val/preference_accuracy"]]
    assert accuracy[-1] >= 0.9, accuracy
    assert scalars["val/rewards/margins"][-1][1] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.config.vocab_size > 0


def test_precomputed_reference_gives_the_same_training_and_holds_no_reference(write_jsonl):
    from lightning.pytorch import Callback, Trainer

    train, val = write_jsonl(_rows(16, 0), "train.jsonl"), write_jsonl(_rows(8, 1), "val.jsonl")

    class Record(Callback):
        def __init__(self):
            self.losses, self.reference = [], "unset"

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            self.reference = pl_module.reference

    runs = {}
    for precompute in (False, True):
        torch.manual_seed(0)
        module = DPOModule(
            model="tiny:llama", export_dir=None, learning_rate=1e-3, precompute_reference=precompute
        )
        data = PreferenceDataModule(
            train=str(train), val=str(val), tokenizer="tiny:llama", batch_size=4, seed=0
        )
        runs[precompute] = Record()
        Trainer(
            accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[runs[precompute]],
        ).fit(module, data)  # fmt: skip
    assert runs[True].reference is None and runs[False].reference is not None
    assert len(runs[True].losses) == 4
    assert runs[True].losses == pytest.approx(runs[False].losses, abs=1e-5)
    assert len(set(runs[True].losses)) > 1  # the policy moved: later steps differ


def test_checkpoints_hold_no_reference_weights(tmp_path, write_jsonl):
    train, val = write_jsonl(_rows(8, 0), "train.jsonl"), write_jsonl(_rows(4, 1), "val.jsonl")
    ckpt = tmp_path / "ckpt"
    code = _fit(
        tmp_path, train, val, "--trainer.enable_checkpointing", "true", "--trainer.callbacks+",
        "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", str(ckpt),
        "--trainer.callbacks.save_last", "true",
    )  # fmt: skip
    assert code == 0
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"] and not any(k.startswith("reference.") for k in state["state_dict"])
    module = DPOModule.load_from_checkpoint(ckpt / "last.ckpt", weights_only=True)
    assert module.reference is not None


def test_frozen_reference_stays_in_eval_mode_when_the_trainer_asks_for_training():
    module = DPOModule(model="tiny:llama", export_dir=None).train()
    assert module.model.training and not module.reference.training
