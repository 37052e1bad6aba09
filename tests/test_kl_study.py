"""scripts/kl_study.py end to end on tiny models: one PPO run per beta, one evaluation, in-run curves."""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_kl_study_trains_each_beta_and_judges_all_in_one_evaluation(script, tiny_run, tmp_path, write_jsonl):
    script, run = script("kl_study"), tiny_run
    prompts = write_jsonl([{"prompt": f"Tell me about {w}"} for w in ("tea", "snow", "owls")], "eval.jsonl")
    out = tmp_path / "kl"
    args = [
        "--run_dir",
        str(run),
        "--out",
        str(out),
        "--ppo_config",
        str(REPO_ROOT / "configs/tiny/ppo.yaml"),
    ]
    args += ["--eval_prompts", str(prompts), "--betas", "0", "0.5", "--iterations", "2"]
    script.main([*args, "--extra", "--model.init_args.learning_rate", "1e-3"])

    summary = json.loads((out / "kl_study.json").read_text())
    assert summary["n_prompts"] == 3 and summary["iterations"] == 2
    assert [r["beta"] for r in summary["results"]] == [0.0, 0.5]
    for r in summary["results"]:
        low, high = r["win_rate_interval"]
        assert 0 <= low <= r["win_rate"] <= high <= 1
        assert sum(r["outcomes"].values()) == 3
        assert r["gold_score_se"] >= 0
        curves = r["curves"]  # GoldJudge's verdict every 2 rollouts of 8 episodes, read back from TensorBoard
        assert curves["episodes"] == [16.0]
        assert curves["low"][0] <= curves["win_rate"][0] <= curves["high"][0]
    for beta in ("0", "0.5"):
        (saved,) = (out / "tb" / f"beta_{beta}").rglob("config.yaml")  # what the run was given
        import yaml

        init_args = yaml.safe_load(saved.read_text())["model"]["init_args"]
        assert init_args["kl_coef"] == float(beta) and init_args["learning_rate"] == 1e-3
    assert (out / "kl_study.png").stat().st_size > 0

    # a second call trains nothing again: it reuses the exports
    exports = {b: (out / f"beta_{b}" / "export" / "config.json").stat().st_mtime for b in ("0", "0.5")}
    script.main(args)
    assert exports == {
        b: (out / f"beta_{b}" / "export" / "config.json").stat().st_mtime for b in ("0", "0.5")
    }
