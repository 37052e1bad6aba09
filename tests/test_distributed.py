"""Every stage under Lightning's DDP strategy with 2 CPU processes (gloo), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"

HELPERS = '''
import hashlib, json, os
from lightning.pytorch import Callback


class ParamDigest(Callback):
    """Writes a digest of the trainable parameters of each rank after fit."""

    def on_fit_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, p in sorted(pl_module.named_parameters()):
            if p.requires_grad:
                digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
        path = os.path.join(os.environ["OUT_DIR"], f"rank{trainer.global_rank}.digest")
        open(path, "w").write(digest.hexdigest())


class ValidationMetrics(Callback):
    """Rank 0 writes the logged validation metrics."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            open(os.path.join(os.environ["OUT_DIR"], "metrics.json"), "w").write(json.dumps(metrics))
'''


def _run(stage: str, args: list[str], out: Path, devices: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_helpers.py").write_text(HELPERS)
    env = {
        **os.environ,
        "PYTHONPATH": f"{out}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OUT_DIR": str(out),
    }
    command = [
        sys.executable,
        "-m",
        "rlhf_lightning",
        stage,
        *args,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.logger.init_args.save_dir",
        str(out / "tb"),
    ]
    if devices > 1:
        command += ["--trainer.strategy", "ddp"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]


def _stage_args(stage: str, exports: dict, out: Path) -> list[str]:
    common = [
        "-c",
        str(TINY_CONFIGS / f"{stage}.yaml"),
        "--model.init_args.export_dir",
        str(out / "export"),
        "--trainer.max_epochs",
        "1",
        "--trainer.callbacks+",
        "ddp_helpers.ParamDigest",
    ]
    models = {
        "sft": ["--model.init_args.model", str(exports["policy"])],
        "reward": ["--model.init_args.model", str(exports["policy"])],
        "dpo": ["--model.init_args.model", str(exports["policy"])],
        "ppo": [
            "--model.init_args.policy",
            str(exports["policy"]),
            "--model.init_args.reward_model",
            str(exports["reward"]),
            "--trainer.limit_train_batches",
            "2",
        ],
    }
    train, batch_size = {
        "sft": ("sft_data", 4),
        "reward": ("preferences", 2),
        "dpo": ("preferences", 2),
        "ppo": ("prompts", 4),
    }[stage]
    return [
        "fit",
        *common,
        *models[stage],
        "--data.init_args.train",
        str(exports[train]),
        "--data.init_args.val",
        "null",
        "--data.init_args.batch_size",
        str(batch_size),
    ]


CRITIC_FREE = ["--model.init_args.advantage_estimator", "rloo", "--model.init_args.samples_per_prompt", "2"]


@pytest.mark.parametrize(
    ("stage", "extra"),
    [("sft", []), ("reward", []), ("ppo", []), ("ppo", CRITIC_FREE), ("dpo", [])],
    ids=["sft", "reward", "ppo", "rloo", "dpo"],
)
def test_stage_on_two_ddp_processes_keeps_ranks_identical(stage, extra, tiny_exports, tmp_path):
    _run(stage, _stage_args(stage, tiny_exports, tmp_path) + extra, tmp_path, devices=2)
    digests = [(tmp_path / f"rank{r}.digest").read_text() for r in (0, 1)]
    assert digests[0] == digests[1], "trained parameters differ between the two ranks"
    exports = [p for p in tmp_path.iterdir() if "export" in p.name]
    assert [p.name for p in exports] == ["export"], f"expected exactly one export, found {exports}"
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_reward_validation_on_two_processes_equals_one(tiny_exports, tmp_path):
    metrics = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        args = [
            "validate",
            "-c",
            str(TINY_CONFIGS / "reward.yaml"),
            "--model.init_args.model",
            str(tiny_exports["reward"]),
            "--data.init_args.train",
            str(tiny_exports["preferences"]),
            "--data.init_args.val",
            str(tiny_exports["preferences"]),
            "--data.init_args.batch_size",
            "2",
            "--trainer.callbacks+",
            "ddp_helpers.ValidationMetrics",
        ]
        _run("reward", args, out, devices)
        metrics[devices] = json.loads((out / "metrics.json").read_text())
    assert metrics[1]["val/preference_accuracy"] == pytest.approx(
        metrics[2]["val/preference_accuracy"], abs=1e-6
    )
    assert metrics[1]["val/loss"] == pytest.approx(metrics[2]["val/loss"], rel=1e-5)
    assert metrics[1]["val/rewards_chosen"] == pytest.approx(metrics[2]["val/rewards_chosen"], rel=1e-5)
