"""The whole pipeline on tiny configs: every stage, the evaluation, the report and its plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_lightning.cli import main

TINY_PIPELINE = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "pipeline.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline")
    assert main(["pipeline", "-c", str(TINY_PIPELINE), "--run_dir", str(run)]) == 0
    return run


def test_pipeline_writes_every_export(run_dir):
    for stage in ("sft", "ppo"):
        AutoModelForCausalLM.from_pretrained(run_dir / stage / "export")
    reward = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "export")
    assert reward.config.num_labels == 1
    assert json.loads((run_dir / "reward" / "export" / "reward_stats.json").read_text())["std"] > 0


def test_each_stage_ran_from_a_config_that_chains_the_exports(run_dir):
    import yaml

    reward = yaml.safe_load((run_dir / "reward" / "config.yaml").read_text())
    assert reward["model"]["init_args"]["model"] == str(run_dir / "sft" / "export")
    ppo = yaml.safe_load((run_dir / "ppo" / "config.yaml").read_text())
    assert ppo["model"]["init_args"]["policy"] == str(run_dir / "sft" / "export")
    assert ppo["model"]["init_args"]["reward_model"] == str(run_dir / "reward" / "export")


def test_report_and_plots(run_dir, read_scalars):
    report = (run_dir / "report.md").read_text()
    for heading in ("| goal |", "## Policies on held-out prompts", "## Win rates", "ppo_curves.png"):
        assert heading in report
    for plot in ("ppo_curves.png", "evaluation.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = json.loads((run_dir / "evaluation.json").read_text())
    assert set(figures["policies"]) == {"ppo", "sft", "base"}
    assert 0.0 <= figures["win_rates"]["ppo_vs_sft"] <= 1.0
    assert 0.0 <= figures["reward_model_accuracy"] <= 1.0
    assert figures["n_samples"] == figures["n_prompts"] == 240  # one sample per held-out prompt
    low, high = figures["win_rate_intervals"]["ppo_vs_sft"]
    counts = figures["outcomes"]["ppo_vs_sft"]
    assert sum(counts.values()) == 240
    assert figures["win_rates"]["ppo_vs_sft"] == pytest.approx((counts["wins"] + counts["ties"] / 2) / 240)
    assert f"{counts['wins']} wins, {counts['ties']} ties, {counts['losses']} losses" in report
    assert low <= figures["win_rates"]["ppo_vs_sft"] <= high
    for policy in figures["policies"].values():  # the rubric's terms add up to the gold score
        assert sum(policy["gold_terms"].values()) == pytest.approx(policy["gold_score"])
    assert "Gold score by rubric term" in report
    decided = figures["decided_by"]["ppo_vs_sft"]  # every win and every loss has its deciding term
    assert sum(decided["wins"].values()) == counts["wins"]
    assert sum(decided["losses"].values()) == counts["losses"]
    assert "the rubric term that decided them" in report
    scalars = read_scalars(run_dir / "tb" / "ppo")
    assert len(scalars["objective/scores"]) == 4


def test_a_finished_pipeline_is_not_redone(run_dir):
    before = (run_dir / "ppo" / "export" / "model.safetensors").stat().st_mtime_ns
    assert main(["pipeline", "-c", str(TINY_PIPELINE), "--run_dir", str(run_dir)]) == 0
    assert (run_dir / "ppo" / "export" / "model.safetensors").stat().st_mtime_ns == before


def test_a_stopped_pipeline_says_so_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """SIGTERM during a stage: the pipeline reports the stop, how to resume, and exits 128 + 15."""
    from rlhf_lightning import pipeline
    from rlhf_lightning.errors import StageStopped

    def stopped(stage, args):
        raise StageStopped(stage, "SIGTERM", None)

    monkeypatch.setattr(pipeline, "run_stage", stopped)
    assert main(["pipeline", "-c", str(TINY_PIPELINE), "--run_dir", str(tmp_path)]) == 143
    err = capsys.readouterr().err
    assert "the sft stage was stopped by SIGTERM" in err
    assert "To resume, run the same command" in err
    assert not (tmp_path / "evaluation.json").exists()


def test_precision_is_passed_to_every_stage_before_its_overrides(tmp_path, monkeypatch):
    """--precision 32-true (an AVX2-only CPU's path on any machine) goes to each stage as
    --trainer.precision, ahead of the stage's own overrides, which therefore still win."""
    from rlhf_lightning import pipeline
    from rlhf_lightning.errors import StageStopped

    calls = []

    def record(stage, args):
        calls.append((stage, args))
        raise StageStopped(stage, "SIGTERM", None)

    monkeypatch.setattr(pipeline, "run_stage", record)
    args = ["pipeline", "-c", str(TINY_PIPELINE), "--run_dir", str(tmp_path), "--precision", "32-true"]
    assert main([*args, "--sft_overrides", json.dumps(["--trainer.max_steps", "1"])]) == 143
    [(stage, stage_args)] = calls
    assert stage == "sft"
    assert stage_args[3:] == ["--trainer.precision", "32-true", "--trainer.max_steps", "1"]


def test_a_ppo_variant_starts_from_another_runs_exports(run_dir, tmp_path):
    """--start_from: the SFT and reward exports of a finished run, a new PPO stage (here on the annotator's
    gold reward) and a new evaluation, in one command."""
    import yaml

    variant = tmp_path / "gold"
    reward_function = "--model.init_args.reward_function.class_path=rlhf_lightning.rewards.AnnotatorReward"
    args = ["pipeline", "-c", str(TINY_PIPELINE), "--run_dir", str(variant), "--start_from", str(run_dir)]
    args += ["--judge_base", "false", "--precision", "32-true"]
    assert main([*args, "--ppo_overrides", json.dumps([reward_function])]) == 0
    assert not (variant / "sft").exists() and not (variant / "reward").exists()
    ppo = yaml.safe_load((variant / "ppo" / "config.yaml").read_text())["model"]["init_args"]
    assert ppo["policy"] == str(run_dir / "sft" / "export")
    figures = json.loads((variant / "evaluation.json").read_text())
    assert set(figures["policies"]) == {"ppo", "sft"}
    assert figures["precision"] == "32-true"  # --precision reaches the evaluation
    AutoModelForCausalLM.from_pretrained(variant / "ppo" / "export")


def test_start_from_a_run_without_exports_is_a_clear_error(tmp_path, capsys):
    args = [
        "pipeline",
        "-c",
        str(TINY_PIPELINE),
        "--run_dir",
        str(tmp_path / "b"),
        "--start_from",
        str(tmp_path),
    ]
    assert main(args) == 2
    assert f"start_from: {tmp_path / 'sft' / 'export'} is not a finished export" in capsys.readouterr().err


def test_a_finished_stage_leaves_nothing_alive(tmp_path):
    """The pipeline runs the stages one after another in one process: a finished stage must free its
    models (jsonargparse's context variable kept the last one alive, gigabytes on the real model)."""
    import gc

    from lightning.pytorch import LightningModule

    from rlhf_lightning.stages import run_stage

    def modules() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, LightningModule)}

    before = modules()
    args = [
        "fit",
        "-c",
        str(TINY_PIPELINE.parent / "sft.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.export_dir={tmp_path / 'export'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_train_batches=1",
        "--trainer.max_epochs=1",
    ]
    run_stage("sft", args)
    assert (tmp_path / "export" / "config.json").exists()
    assert modules() <= before
