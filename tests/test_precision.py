"""Precision is chosen for the machine: bf16 only where its matmuls are native; an explicit setting wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning import precision
from rlhf_lightning.stages import run_stage

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend to run on a CPU with the given flags (and no GPU)."""

    def pretend(flags: set[str]):
        precision.cpu_bf16_native.cache_clear()
        monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)

    yield pretend
    precision.cpu_bf16_native.cache_clear()


@pytest.mark.parametrize(
    "flags,expected",
    [({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed"), ({"avx2", "amx_bf16"}, "bf16-mixed"),
     ({"avx2", "fma"}, "32-true"), ({"avx2", "avx512f"}, "32-true")],
)  # fmt: skip
def test_bf16_only_where_the_cpu_has_native_bf16(cpu_flags, flags, expected):
    cpu_flags(flags)
    chosen, reason = precision.auto_precision()
    assert chosen == expected
    assert reason.startswith("CPU")


def test_without_cpu_flags_a_timing_probe_decides(monkeypatch):
    precision.cpu_bf16_native.cache_clear()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: None)
    monkeypatch.setattr(precision, "_bf16_probe", lambda: False)
    assert precision.cpu_bf16_native() is False
    precision.cpu_bf16_native.cache_clear()


TINY_SFT = ["-c", str(REPO_ROOT / "configs" / "tiny" / "sft.yaml"), "--trainer.max_steps", "1"]


def test_an_unset_precision_is_chosen_for_the_machine_and_logged(cpu_flags, caplog):
    cpu_flags({"avx2"})
    with caplog.at_level("INFO"):
        cli = run_stage("sft", [*TINY_SFT, "--trainer.precision", "null"], run=False)  # as if unset
    assert cli.trainer.precision == "32-true"
    assert "precision: 32-true (chosen for this machine" in caplog.text


def test_an_explicit_precision_wins(cpu_flags, caplog):
    cpu_flags({"avx2"})
    with caplog.at_level("INFO"):
        cli = run_stage("sft", [*TINY_SFT, "--trainer.precision", "bf16-true"], run=False)
    assert cli.trainer.precision == "bf16-true"
    assert "precision: bf16-true (set by trainer.precision)" in caplog.text
