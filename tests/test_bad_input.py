"""The bad-input matrix: every DataModule and the CLI answer bad input with an error naming where and
what (or a documented, counted skip), raised before any training starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.errors import (
    ConfigurationError,
    DataFormatError,
    DataSourceError,
    InputError,
    ModelLoadError,
)

USER = [{"role": "user", "content": "Hi?"}]
GOOD_SFT = {"prompt": USER, "completion": "Hello!"}
GOOD_PAIR = {"prompt": USER, "chosen": "Hello!", "rejected": "Go away."}
MODULES = {"sft": SFTDataModule, "preference": PreferenceDataModule, "prompts": PromptDataModule}


def _jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


# (id, datamodule, file name, file bytes, expected error type, regex the message must match)
ERRORS = [
    ("missing-file", "sft", None, None, DataSourceError, r"data file '.*nope\.jsonl' does not exist"),
    ("empty-file", "sft", "data.jsonl", b"", DataSourceError, r"data\.jsonl: no rows"),
    ("blank-lines-only", "sft", "data.jsonl", b"\n\n", DataSourceError, r"no rows"),
    ("invalid-json", "sft", "data.jsonl", _jsonl([GOOD_SFT, "{oops"]), DataSourceError, r"data\.jsonl row 2: invalid JSON"),
    ("not-utf8", "sft", "data.jsonl", b'{"text": "caf\xe9"}\n', DataSourceError, r"data\.jsonl line 1: not valid UTF-8"),
    ("unknown-suffix", "sft", "data.txt", b"hello", DataSourceError, r"unknown file type '\.txt'"),
    ("json-not-a-list", "sft", "data.json", b'{"a": 1}', DataSourceError, r"expected a JSON list of rows"),
    ("row-not-object", "sft", "data.jsonl", _jsonl([[1, 2]]), DataFormatError, r"row 1: a row must be a JSON object, got list"),
    ("no-sft-fields", "sft", "data.jsonl", _jsonl([{"question": "x"}]), DataFormatError, r"row 1: no SFT fields found \(has \['question'\]\)"),
    ("empty-completion", "sft", "data.jsonl", _jsonl([{"prompt": "x", "completion": "  "}]), DataFormatError, r"row 1: field 'completion' is empty"),
    ("prompt-wrong-type", "sft", "data.jsonl", _jsonl([{"prompt": 3, "completion": "y"}]), DataFormatError, r"row 1: field 'prompt' must be a string, got int"),
    ("message-without-content", "sft", "data.jsonl", _jsonl([{"messages": [{"role": "user"}]}]), DataFormatError, r"messages\[0\] \(user\) has no string 'content'"),
    ("last-turn-not-assistant", "sft", "data.jsonl", _jsonl([{"messages": USER}]), DataFormatError, r"last message of 'messages' must be the assistant's"),
    ("csv-missing-column", "sft", "data.csv", b"prompt\nhello\n", DataFormatError, r"data\.csv row 1: no SFT fields found"),
    ("missing-rejected", "preference", "data.jsonl", _jsonl([{"prompt": "x", "chosen": "y"}]), DataFormatError, r"row 1: no 'rejected' field"),
    ("empty-chosen", "preference", "data.jsonl", _jsonl([{"prompt": "x", "chosen": "", "rejected": "z"}]), DataFormatError, r"row 1: field 'chosen' is empty"),
    ("ranking-ties", "preference", "data.jsonl", _jsonl([{"prompt": "x", "responses": ["a", "b"], "ranks": [1, 1]}]), DataFormatError, r"'ranks' has ties \[1, 1\]"),
    ("ranking-one-response", "preference", "data.jsonl", _jsonl([{"prompt": "x", "responses": ["a"]}]), DataFormatError, r"a ranking needs at least 2 responses, got 1"),
    ("ranks-wrong-length", "preference", "data.jsonl", _jsonl([{"prompt": "x", "responses": ["a", "b"], "ranks": [1]}]), DataFormatError, r"'ranks' must be a list of 2 integers"),
    ("finished-wrong-type", "preference", "data.jsonl", _jsonl([{"prompt": "x", "responses": ["a", "b"], "finished": [1, 0]}]), DataFormatError, r"'finished' must be a list of 2 booleans"),
    ("margin-not-number", "preference", "data.jsonl", _jsonl([{**GOOD_PAIR, "margin": "big"}]), DataFormatError, r"'margin' must be a number, got str"),
    ("implicit-prompts-differ", "preference", "data.jsonl", _jsonl([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}]), DataFormatError, r"do not share the same conversation"),
    ("implicit-not-transcripts", "preference", "data.jsonl", _jsonl([{"chosen": "yes", "rejected": "no"}]), DataFormatError, r"must be full HH transcripts or message lists"),
    ("all-rows-identical", "preference", "data.jsonl", _jsonl([{"prompt": "x", "chosen": "same", "rejected": "same"}]), DataFormatError, r"every row was skipped \(\{'identical responses': 1\}\)"),
    ("no-prompt", "prompts", "data.jsonl", _jsonl([{"completion": "x"}]), DataFormatError, r"row 1: no prompt found"),
    ("only-assistant-turn", "prompts", "data.jsonl", _jsonl([{"messages": [{"role": "assistant", "content": "x"}]}]), DataFormatError, r"holds only an assistant turn"),
    ("not-a-dataset-dir", "sft", "somedir/", None, DataSourceError, r"is a directory but not a saved `datasets` dataset"),
]  # fmt: skip


def _source(tmp_path: Path, name, content) -> str:
    if name is None:
        return str(tmp_path / "nope.jsonl")
    if name.endswith("/"):
        (tmp_path / name).mkdir()
        return str(tmp_path / name)
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_data_raises_a_clear_error_at_setup(case, tmp_path):
    _, kind, name, content, error, pattern = case
    module = MODULES[kind](train=_source(tmp_path, name, content), tokenizer="tiny:llama")
    with pytest.raises(error, match=pattern):
        module.setup("fit")
    assert issubclass(error, InputError)


# (id, datamodule, rows, max_length, expected skip counts)
SKIPS = [
    ("sft-prompt-fills-max-length", "sft", [GOOD_SFT, {"prompt": "x" * 80, "completion": "y"}], 48, {"prompt fills max_length": 1}),
    ("preference-identical", "preference", [GOOD_PAIR, {"prompt": "x", "chosen": "same", "rejected": "same "}], 256, {"identical responses": 1}),
    ("preference-identical-after-truncation", "preference", [{"prompt": "x", "chosen": "Hello!", "rejected": "Go away."}, {"prompt": "x", "chosen": "abcd1", "rejected": "abcd2"}], 5, {"responses identical after truncation to max_length": 1}),
    ("prompt-too-long", "prompts", [{"prompt": USER}, {"prompt": "x" * 300}], 64, {"prompt longer than max_length": 1}),
]  # fmt: skip


@pytest.mark.parametrize("case", SKIPS, ids=[c[0] for c in SKIPS])
def test_rows_without_signal_are_skipped_and_counted(case, tmp_path):
    _, kind, rows, max_length, expected = case
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl(rows))
    module = MODULES[kind](train=str(path), tokenizer="tiny:llama", max_length=max_length)
    with pytest.warns(UserWarning, match="skipped rows"):
        module.setup("fit")
    assert module.skipped == expected
    assert len(module.train_data) == len(rows) - sum(expected.values())


@pytest.mark.parametrize(
    "kwargs,pattern",
    [({"max_length": 1}, r"data\.max_length must be at least 2"), ({"batch_size": 0}, r"data\.batch_size must be"),
     ({"val_fraction": 1.5}, r"data\.val_fraction must be in \[0, 1\)")],
)  # fmt: skip
def test_impossible_data_options_are_configuration_errors(kwargs, pattern):
    with pytest.raises(ConfigurationError, match=pattern):
        SFTDataModule(train="x.jsonl", tokenizer="tiny:llama", **kwargs)


@pytest.mark.parametrize(
    "name,pattern",
    [("./no/such/dir", r"model directory './no/such/dir' does not exist"),
     ("bundled:NoSuchModel", r"unknown bundled model 'bundled:NoSuchModel'"),
     ("tiny:gpt", r"unknown tiny model 'tiny:gpt'"),
     ("", r"a model name must be a non-empty string")],
)  # fmt: skip
def test_unloadable_model_names(name, pattern):
    from rlhf_lightning.models import load_causal_lm

    with pytest.raises(ModelLoadError, match=pattern):
        load_causal_lm(name)


def test_a_hub_id_that_cannot_be_reached_offline(monkeypatch):
    from rlhf_lightning.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelLoadError, match=r"cannot load 'no-such-org/no-such-model'.*hub could not provide it"
    ):
        load_tokenizer("no-such-org/no-such-model")


def test_the_cli_reports_bad_input_in_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_jsonl([GOOD_SFT, {"prompt": "x", "completion": ""}]))
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "sft.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_lightning", "sft", "fit", "-c", str(config), "--data.init_args.train", str(bad),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"), "--model.init_args.export_dir", str(tmp_path / "export")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "rlhf-lightning sft: error: bad.jsonl row 2: field 'completion' is empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "export").exists()


def test_the_dpo_stage_reports_bad_preference_rows_like_the_reward_stage(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_bytes(
        _jsonl([GOOD_PAIR, {"prompt": "x", "responses": ["bad", "ok", "best"], "ranking": [2, 1, 0]}])
    )
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "dpo.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_lightning", "dpo", "fit", "-c", str(config), "--data.init_args.train", str(bad),
         "--model.init_args.model", "tiny:llama", "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"),
         "--model.init_args.export_dir", str(tmp_path / "export")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "rlhf-lightning dpo: error: prefs.jsonl row 2:" in result.stderr and "'ranking'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "export").exists()
