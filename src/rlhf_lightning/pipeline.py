"""``rlhf-lightning pipeline``: SFT -> reward model -> PPO -> evaluation, each export feeding the next.

Every stage is the stage's own LightningCLI run on a copy of its config, written to
``<run_dir>/<stage>/config.yaml`` with the run's paths filled in: the previous stages' exports as
inputs, the export at ``<run_dir>/<stage>/export``, TensorBoard logs under ``<run_dir>/tb/<stage>``,
checkpoints under ``<run_dir>/<stage>/checkpoints``. Re-running the same command resumes: a stage whose
export exists is not redone (exports are written atomically, so one that exists is complete), and a
stage that was stopped continues from its ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.evaluation import EvaluationOptions, evaluate
from rlhf_lightning.stages import run_stage


def release_memory() -> None:
    """Hand memory a finished stage freed back to the system, so the next stage starts from a low RSS.

    glibc keeps freed heap pages for reuse; ``malloc_trim`` returns them (a no-op elsewhere).
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _done(export: Path) -> bool:
    return (export / "config.json").exists()


def write_stage_config(
    config: str, stage_dir: Path, tb: Path, stage: str, inputs: dict, export: Path
) -> Path:
    """A copy of a stage's config with the run's inputs and output paths filled in."""
    import yaml

    content = yaml.safe_load(Path(config).read_text()) or {}
    init_args = content.setdefault("model", {}).setdefault("init_args", {})
    init_args.update(inputs)
    init_args["export_dir"] = str(export)
    trainer = content.setdefault("trainer", {})
    trainer["default_root_dir"] = str(stage_dir)
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tb), "name": stage},
    }
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(stage_dir / "checkpoints")
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / "config.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def sample_like_ppo(options: EvaluationOptions, ppo_config: Path) -> EvaluationOptions:
    """Evaluation samples the way PPO did (response length, temperature) unless told otherwise."""
    import yaml

    init_args = {}
    if ppo_config.exists():
        init_args = (yaml.safe_load(ppo_config.read_text()).get("model") or {}).get("init_args") or {}
    return replace(
        options,
        max_new_tokens=options.max_new_tokens or init_args.get("max_new_tokens"),
        temperature=options.temperature or init_args.get("temperature"),
    )


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
    judge_base: bool = True,
    start_from: str | None = None,
    precision: Literal["bf16-mixed", "32-true"] | None = None,
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
        start_from: A finished run's folder whose SFT and reward exports this run uses instead of
            training its own: its PPO stage and evaluation run anew, so PPO variants (another config, a
            reward function) compare from the same starting point.
        judge_base: Also sample and judge the base model in the evaluation (``ppo_vs_base``): one more
            policy to sample, about a third more evaluation time.
        precision: Precision of every stage and the evaluation (``None``: chosen for the machine,
            bf16-mixed where bf16 matmuls are native, else 32-true; a stage's overrides still win).
            ``32-true`` on any CPU runs the path an AVX2-only CPU takes.
    """
    run = Path(run_dir)
    tb = run / "tb"
    exports = {stage: run / stage / "export" for stage in ("sft", "reward", "ppo")}
    if start_from is not None:
        for stage in ("sft", "reward"):
            exports[stage] = Path(start_from) / stage / "export"
            if not _done(exports[stage]):
                raise ConfigurationError(f"start_from: {exports[stage]} is not a finished export")
    timings_file = run / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    run.mkdir(parents=True, exist_ok=True)
    stages = {
        "sft": (sft_config, {"model": base_model}, sft_overrides),
        "reward": (reward_config, {"model": str(exports["sft"])}, reward_overrides),
        "ppo": (
            ppo_config,
            {"policy": str(exports["sft"]), "reward_model": str(exports["reward"])},
            ppo_overrides,
        ),
    }
    for stage, (config, inputs, overrides) in stages.items():
        if _done(exports[stage]):
            rank_zero_info(f"[pipeline] {stage}: export {exports[stage]} exists, stage skipped")
            continue
        stage_config = write_stage_config(config, run / stage, tb, stage, inputs, exports[stage])
        forced = ["--trainer.precision", precision] if precision else []
        args = ["fit", "-c", str(stage_config), *forced, *(overrides or [])]
        if (run / stage / "checkpoints" / "last.ckpt").exists():
            args += ["--ckpt_path", "last"]
        rank_zero_info(f"[pipeline] {stage}: rlhf-lightning {stage} {' '.join(args)}")
        began = time.time()
        run_stage(stage, args)
        release_memory()
        timings[stage] = timings.get(stage, 0.0) + time.time() - began
        timings_file.write_text(json.dumps(timings, indent=2))

    if annotator_temperature is None:
        from rlhf_lightning.demo_data import load_manifest

        annotator_temperature = load_manifest()["annotator"]["temperature"]
    rank_zero_info("[pipeline] evaluation on held-out prompts")
    began = time.time()
    policies = {"ppo": str(exports["ppo"]), "sft": str(exports["sft"])}
    if judge_base:
        policies["base"] = base_model
    evaluation = sample_like_ppo(evaluation or EvaluationOptions(), run / "ppo" / "config.yaml")
    if precision and evaluation.precision is None:
        evaluation = replace(evaluation, precision=precision)
    report = evaluate(
        policies, str(exports["sft"]), str(exports["reward"]), evaluation, annotator_temperature
    )
    timings["evaluation"] = time.time() - began
    timings_file.write_text(json.dumps(timings, indent=2))
    (run / "evaluation.json").write_text(json.dumps(report, indent=2))

    from rlhf_lightning.report import write_report

    peak_rss_gb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    )  # KiB on Linux; GB = 10^9 bytes
    path = write_report(run, report, timings, tb / "ppo", peak_rss_gb)
    print(path.read_text())
    print(f"report: {path}  TensorBoard: tensorboard --logdir {tb}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlhf-lightning pipeline``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="rlhf-lightning pipeline", description=__doc__)
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="a pipeline YAML (configs/pipeline.yaml)"
    )
    parser.add_function_arguments(run_pipeline)
    args = parser.parse_args(argv)
    args.pop("config", None)
    run_pipeline(**parser.instantiate_classes(args).as_dict())
    return 0
