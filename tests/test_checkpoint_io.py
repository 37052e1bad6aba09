"""Checkpoints go straight to disk, atomically; every stage's CLI uses that writer."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from rlhf_lightning.checkpoint_io import StreamingCheckpointIO
from rlhf_lightning.errors import StorageError

TINY_SFT = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "sft.yaml"


def test_a_checkpoint_round_trips_without_lightnings_in_memory_copy(tmp_path, monkeypatch):
    import lightning.fabric.utilities.cloud_io as cloud_io

    def buffered(*args, **kwargs):
        raise AssertionError("went through the in-memory buffer")

    monkeypatch.setattr(cloud_io, "_atomic_save", buffered)
    io = StreamingCheckpointIO()
    checkpoint = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(checkpoint, path)
    loaded = io.load_checkpoint(path)
    assert loaded["epoch"] == 3
    torch.testing.assert_close(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    io = StreamingCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # "Can't pickle local object"
        io.save_checkpoint({"epoch": 2, "unpicklable": lambda: None}, path)
    assert io.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    io = StreamingCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def full_disk(obj, f, *args, **kwargs):  # what torch's zip writer raises when the disk fills up
        Path(f).write_bytes(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 187639296 vs 187639184"
        )

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        StorageError, match=r"could not write the checkpoint .*last\.ckpt .*MiB free"
    ) as error:
        io.save_checkpoint({"epoch": 2}, path)
    assert "the previous last.ckpt is intact" in str(error.value)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial file is gone


def test_every_stage_writes_checkpoints_this_way(tmp_path):
    from rlhf_lightning.stages import run_stage

    args = ["-c", str(TINY_SFT), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    cli = run_stage("sft", args, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is StreamingCheckpointIO


def test_the_cli_reports_a_refused_write_in_one_line_and_exits_1(monkeypatch, capsys):
    import rlhf_lightning.cli as cli

    def refused(stage, args):
        raise StorageError("could not write the checkpoint runs/sft/last.ckpt (...); 12 MiB free on its disk")

    monkeypatch.setattr(cli, "run_stage", refused)
    assert cli.main(["sft", "fit"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "rlhf-lightning sft: error: could not write the checkpoint runs/sft/last.ckpt (...); 12 MiB free on its disk"
    )
