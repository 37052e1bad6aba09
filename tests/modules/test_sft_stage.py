"""The SFT stage end to end through the CLI on the tiny model: it learns, logs and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf_lightning.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "sft.yaml"
USER = [{"role": "user", "content": "Say apple"}]


def test_sft_fit_learns_logs_and_exports(tmp_path, write_jsonl, read_scalars):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = {"prompt": USER, "completion": [{"role": "assistant", "content": "apple apple apple!"}]}
    train, val = write_jsonl([row] * 24, "train.jsonl"), write_jsonl([row] * 8, "val.jsonl")
    logs, export = tmp_path / "logs", tmp_path / "export"
    code = main(
        [
            "sft",
            "fit",
            "-c",
            str(CONFIG),
            "--data.init_args.train",
            str(train),
            # the config's own data (bundled) and sizes are not what this test is about: pin them
            "--data.init_args.val",
            str(val),
            "--data.init_args.max_length",
            "64",
            "--data.init_args.batch_size",
            "4",
            "--trainer.max_epochs",
            "2",
            "--trainer.logger.init_args.save_dir",
            str(logs),
            "--model.init_args.export_dir",
            str(export),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert code == 0

    scalars = read_scalars(logs)
    for tag in (
        "train/loss",
        "train/perplexity",
        "train/token_accuracy",
        "val/loss",
        "val/perplexity",
        "val/token_accuracy",
    ):
        assert tag in scalars, sorted(scalars)
    train_loss = [v for _, v in scalars["train/loss"]]
    # 24 training rows, batch 4, 2 epochs
    assert len(train_loss) == 12
    assert train_loss[0] > 5.0  # about log(259) = 5.56 for a random model
    assert train_loss[-1] < train_loss[0] - 1.5
    val_loss = [v for _, v in scalars["val/loss"]]
    assert len(val_loss) == 2 and val_loss[-1] < val_loss[0]
    val_ppl = [v for _, v in scalars["val/perplexity"]]
    assert val_ppl[-1] == pytest.approx(float(torch.tensor(val_loss[-1]).exp()), rel=1e-4)
    accuracy = [v for _, v in scalars["train/token_accuracy"]]
    assert accuracy[-1] > accuracy[0] and accuracy[-1] > 0.5
    assert all(0.0 <= v <= 1.0 for _, v in scalars["val/token_accuracy"])

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    prompt = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **encoded, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, encoded["input_ids"].shape[1] :]
    assert len(new) >= 1
    assert tokenizer.decode(new).startswith("a")  # it learned how the answer starts
