"""scripts/compare_methods.py end to end on tiny models: every method trains, one evaluation judges all."""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_trains_each_method_and_writes_one_table(script, tiny_run, tmp_path, write_jsonl):
    script, run = script("compare_methods"), tiny_run
    prompts = write_jsonl(
        [{"prompt": f"Tell me about {w}"} for w in ("tea", "snow", "owls", "maps")], "eval.jsonl"
    )
    out = tmp_path / "compare"
    args = ["--run_dir", str(run), "--out", str(out), "--config_dir", str(REPO_ROOT / "configs" / "tiny")]
    script.main([*args, "--eval_prompts", str(prompts), "--budget_min", "5"])

    summary = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["ppo", "rloo", "grpo", "dpo"]
    for row in summary["rows"]:
        low, high = row["win_rate_interval"]
        assert 0 <= low <= row["win_rate"] <= high <= 1
        assert sum(row["outcomes"].values()) == 4  # one paired sample per held-out prompt
        assert row["train_min"] > 0 and row["peak_rss_gb"] > 0.1
        assert (out / row["method"] / "export" / "config.json").exists()
    import yaml

    (saved,) = (out / "tb" / "rloo").rglob("config.yaml")  # what the RLOO run was given (LightningCLI's copy)
    config = yaml.safe_load(saved.read_text())
    assert config["data"]["init_args"]["batch_size"] == 2  # 8 prompts x 1 for PPO: 2 prompts x 4 samples
    assert config["model"]["init_args"]["advantage_estimator"] == "rloo"
    assert config["trainer"]["max_time"] == "00:00:05:00"
    assert (out / "comparison.png").stat().st_size > 0
    table = (out / "comparison.md").read_text()
    assert len(table.strip().splitlines()) == 7  # header, rule, 4 methods, SFT

    # a second call trains nothing again: it reuses the exports and timings
    before = {m: (out / m / "timing.json").read_text() for m in ("ppo", "dpo")}
    script.main([*args, "--eval_prompts", str(prompts), "--methods", "ppo", "dpo"])
    assert before == {m: (out / m / "timing.json").read_text() for m in ("ppo", "dpo")}
