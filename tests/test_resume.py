"""Fault tolerance of a PPO run: SIGKILL and SIGTERM mid-run, resume with ``--ckpt_path last``."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY_PPO = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "ppo.yaml"
EPOCHS = 4
ITERATIONS = EPOCHS * 16 // 4  # 16 prompts in batches of 4 per epoch
STEPS_PER_ITERATION = 4 * 2  # ppo_epochs x (batch 4 / minibatch 2)


def _command(exports: dict, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "rlhf_lightning", "ppo", "fit", "-c", str(TINY_PPO),
        "--model.init_args.policy", str(exports["policy"]),
        "--model.init_args.reward_model", str(exports["reward"]),
        "--model.init_args.minibatch_size", "2",
        "--model.init_args.export_dir", str(out / "export"),
        "--data.init_args.train", str(exports["prompts"]),
        "--data.init_args.val", "null",
        "--data.init_args.batch_size", "4",
        "--trainer.limit_train_batches", "1.0",
        "--trainer.max_epochs", str(EPOCHS),
        "--trainer.enable_checkpointing", "true",
        "--trainer.callbacks+", "lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(out / "checkpoints"),
        "--trainer.callbacks.every_n_train_steps", str(STEPS_PER_ITERATION),
        "--trainer.callbacks.save_last", "true",
        "--trainer.callbacks.save_top_k", "0",
        "--trainer.callbacks+", "rlhf_lightning.callbacks.CheckpointOnStop",
        "--trainer.logger.init_args.save_dir", str(out / "tb"),
        *extra,
    ]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / "model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _rollouts(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["ppo_state"]["rollouts"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(_command(tiny_exports, out))
    return out


def _start_and_signal(tiny_exports, out: Path, sig: int, delay: float) -> tuple[int, str]:
    """Start a run, send ``sig`` ``delay`` seconds after its first checkpoint, and wait for it to end;
    returns its exit status and standard error."""
    process = subprocess.Popen(_command(tiny_exports, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before its first checkpoint"
    time.sleep(delay)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr.decode(errors="replace")


def test_two_seeded_runs_match(uninterrupted, tiny_exports, tmp_path):
    _run(_command(tiny_exports, tmp_path))
    _assert_same_weights(_weights(uninterrupted), _weights(tmp_path))


def test_sigkill_then_resume_continues_to_the_uninterrupted_result(uninterrupted, tiny_exports, tmp_path):
    _start_and_signal(tiny_exports, tmp_path, signal.SIGKILL, delay=random.uniform(0.0, 0.8))
    assert not (tmp_path / "export").exists(), "a killed run must not leave an export"
    saved = _rollouts(tmp_path / "checkpoints" / "last.ckpt")
    assert 1 <= saved < ITERATIONS
    _run(_command(tiny_exports, tmp_path, "--ckpt_path", "last"))
    assert _rollouts(tmp_path / "checkpoints" / "last.ckpt") == ITERATIONS
    _assert_same_weights(_weights(uninterrupted), _weights(tmp_path))
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporary export directories left behind: {leftovers}"


def test_sigterm_saves_a_checkpoint_between_iterations_and_resumes(uninterrupted, tiny_exports, tmp_path):
    code, stderr = _start_and_signal(tiny_exports, tmp_path, signal.SIGTERM, delay=0.0)
    assert code == 143, stderr[-2000:]  # 128 + SIGTERM: a stopped run is not a success
    assert "stopped by SIGTERM" in stderr and "--ckpt_path last" in stderr
    assert not (tmp_path / "export").exists(), "an interrupted run must not export a half-trained policy"
    saved = _rollouts(tmp_path / "checkpoints" / "last.ckpt")
    assert 1 <= saved < ITERATIONS
    _run(_command(tiny_exports, tmp_path, "--ckpt_path", "last"))
    _assert_same_weights(_weights(uninterrupted), _weights(tmp_path))


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to a child process")
def test_ctrl_c_saves_a_checkpoint_and_resumes(uninterrupted, tiny_exports, tmp_path):
    code, stderr = _start_and_signal(tiny_exports, tmp_path, signal.SIGINT, delay=0.0)
    assert code == 130, stderr[-2000:]
    assert "stopped by SIGINT" in stderr
    assert 1 <= _rollouts(tmp_path / "checkpoints" / "last.ckpt") < ITERATIONS
    _run(_command(tiny_exports, tmp_path, "--ckpt_path", "last"))
    _assert_same_weights(_weights(uninterrupted), _weights(tmp_path))
