"""scripts/decode_speed.py on a tiny model: the figures it reports are consistent with each other."""

from __future__ import annotations

import json


def test_decode_speed_reports_steps_tokens_and_the_share_of_the_bandwidth_bound(
    script, tmp_path, write_jsonl
):
    prompts = write_jsonl(
        [{"prompt": f"Tell me about {w}"} for w in ("tea", "snow", "owls")], "prompts.jsonl"
    )
    out = tmp_path / "decode.json"
    args = ["--model", "tiny:llama", "--prompts", str(prompts), "--batches", "2", "4", "--new_tokens", "5"]
    summary = script("decode_speed").main(
        [*args, "--precision", "32-true", "--repeats", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == summary
    assert summary["precision"] == "32-true" and summary["cpu"]
    assert summary["read_bandwidth_gb_s"] > 0 and summary["weight_bytes"] > 0
    assert [r["batch"] for r in summary["results"]] == [2, 4]  # 4 prompts from 3: the list repeats
    for r in summary["results"]:
        assert 1 <= r["steps"] <= 5 and r["steps"] <= r["tokens"] <= r["batch"] * 5
        assert r["steps_per_s"] == r["steps"] / r["seconds"]
        assert abs(r["share_of_bound"] - r["steps_per_s"] / summary["bound_steps_per_s"]) < 1e-12
    assert summary["step_decoder"] is True
    through_transformers = script("decode_speed").main(
        [*args, "--precision", "32-true", "--repeats", "1", "--no_step_decoder", "--out", str(out)]
    )
    assert through_transformers["step_decoder"] is False
    # the same seed and fp32 numbers up to rounding: the same tokens either way
    assert [r["tokens"] for r in through_transformers["results"]] == [r["tokens"] for r in summary["results"]]
