"""``rlhf-lightning pipeline``: SFT -> reward model -> PPO -> evaluation, each export feeding the next.

Every stage is the stage's own LightningCLI run on its own config, with the pipeline's overrides:
exports go to ``<run_dir>/<stage>/export``, TensorBoard logs to ``<run_dir>/tb/<stage>``. A stage whose
export exists is not redone (exports are written atomically, so an export that exists is complete):
re-running the same command resumes after the last finished stage.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.cli import run_stage
from rlhf_lightning.evaluation import EvaluationOptions, evaluate


def _done(export: Path) -> bool:
    return (export / "config.json").exists()


def run_pipeline(
    run_dir: str = "runs/pipeline",
    base_model: str = "bundled:SmolLM2-135M-Instruct",
    sft_config: str = "configs/sft.yaml",
    reward_config: str = "configs/reward.yaml",
    ppo_config: str = "configs/ppo.yaml",
    sft_overrides: list[str] | None = None,
    reward_overrides: list[str] | None = None,
    ppo_overrides: list[str] | None = None,
    evaluation: EvaluationOptions | None = None,
    annotator_temperature: float | None = None,
) -> dict:
    """Run the whole recipe; returns the evaluation report.

    Args:
        run_dir: Folder of the run: exports, TensorBoard logs, timings and the report.
        base_model: The model SFT starts from (also judged in the evaluation).
        sft_config: LightningCLI config of the SFT stage.
        reward_config: LightningCLI config of the reward stage (its model is the SFT export).
        ppo_config: LightningCLI config of the PPO stage (its policy is the SFT export, its reward
            model the reward export).
        sft_overrides: Extra ``--key value`` arguments for the SFT stage.
        reward_overrides: Extra arguments for the reward stage.
        ppo_overrides: Extra arguments for the PPO stage.
        evaluation: How the held-out evaluation samples and judges.
        annotator_temperature: Label-noise temperature of the annotator (``None``: the calibrated value
            in the bundled demo data's manifest).
    """
    run = Path(run_dir)
    tb = run / "tb"
    exports = {stage: run / stage / "export" for stage in ("sft", "reward", "ppo")}
    timings_file = run / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    stages = {
        "sft": (sft_config, ["--model.init_args.model", base_model], sft_overrides),
        "reward": (reward_config, ["--model.init_args.model", str(exports["sft"])], reward_overrides),
        "ppo": (
            ppo_config,
            [
                "--model.init_args.policy",
                str(exports["sft"]),
                "--model.init_args.reward_model",
                str(exports["reward"]),
            ],
            ppo_overrides,
        ),
    }
    for stage, (config, links, overrides) in stages.items():
        if _done(exports[stage]):
            rank_zero_info(f"[pipeline] {stage}: export {exports[stage]} exists, stage skipped")
            continue
        rank_zero_info(f"[pipeline] {stage}: rlhf-lightning {stage} fit -c {config}")
        args = [
            "fit",
            "-c",
            config,
            *links,
            "--model.init_args.export_dir",
            str(exports[stage]),
            "--trainer.default_root_dir",
            str(run / stage),
            "--trainer.logger.class_path",
            "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir",
            str(tb),
            "--trainer.logger.init_args.name",
            stage,
            *(overrides or []),
        ]
        began = time.time()
        run_stage(stage, args)
        gc.collect()
        timings[stage] = time.time() - began
        run.mkdir(parents=True, exist_ok=True)
        timings_file.write_text(json.dumps(timings, indent=2))

    if annotator_temperature is None:
        from rlhf_lightning.demo_data import load_manifest

        annotator_temperature = load_manifest()["annotator"]["temperature"]
    rank_zero_info("[pipeline] evaluation on held-out prompts")
    began = time.time()
    policies = {"ppo": str(exports["ppo"]), "sft": str(exports["sft"]), "base": base_model}
    report = evaluate(
        policies, str(exports["sft"]), str(exports["reward"]), evaluation, annotator_temperature
    )
    timings["evaluation"] = time.time() - began
    timings_file.write_text(json.dumps(timings, indent=2))
    (run / "evaluation.json").write_text(json.dumps(report, indent=2))

    from rlhf_lightning.report import write_report

    path = write_report(run, report, timings, tb / "ppo")
    print(path.read_text())
    print(f"report: {path}  TensorBoard: tensorboard --logdir {tb}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlhf-lightning pipeline``."""
    from jsonargparse import auto_cli

    auto_cli(run_pipeline, args=argv, as_positional=False, prog="rlhf-lightning pipeline")
    return 0
