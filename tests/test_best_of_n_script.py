"""scripts/best_of_n.py end to end on tiny models: one sampling pass, curves for both selectors, a
trained policy's point read from an evaluation output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_best_of_n_curves_and_policy_point(script, tiny_run, tmp_path, write_jsonl):
    best_of_n = script("best_of_n")
    prompts = write_jsonl([{"prompt": f"Tell me about {w}"} for w in ("tea", "snow", "owls")], "val.jsonl")
    evaluation = tmp_path / "ppo_eval.json"
    evaluation.write_text(json.dumps({
        "options": {"prompts": str(prompts)},
        "n_samples": 12,
        "policies": {"ppo": {"kl_to_sft": 1.5, "gold_score": 3.4}, "sft": {"kl_to_sft": 0.0, "gold_score": 3.0}},
        "win_rates": {"ppo_vs_sft": 0.6},
        "win_rate_intervals": {"ppo_vs_sft": [0.5, 0.7]},
    }))  # fmt: skip
    out = tmp_path / "bon"
    args = ["--run_dir", str(tiny_run), "--prompts", str(prompts), "--n", "3", "--opponents", "2"]
    args += ["--ppo_config", str(REPO_ROOT / "configs/tiny/ppo.yaml"), "--out", str(out)]
    best_of_n.main([*args, "--policy", f"ppo={evaluation}"])

    summary = json.loads((out / "best_of_n.json").read_text())
    assert (out / "best_of_n.png").stat().st_size > 0
    assert summary["n_prompts"] == 3 and summary["pool"] == 3 and summary["opponents"] == 2
    by_gold, by_proxy = summary["best_of_n"]["gold"], summary["best_of_n"]["proxy"]
    assert [r["n"] for r in by_gold] == [1, 2, 3]  # powers of 2 and the pool size
    assert by_gold[0]["kl"] == 0.0 and by_gold[1]["kl"] == pytest.approx(0.19314718)
    # best-of-1 is sampling whatever the selector; choosing by gold never lowers the expected gold
    assert by_gold[0]["gold"]["mean"] == pytest.approx(by_proxy[0]["gold"]["mean"])
    golds = [r["gold"]["mean"] for r in by_gold]
    assert golds == sorted(golds)
    assert by_gold[0]["gold_gain"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert by_gold[2]["gold_gain"]["mean"] == pytest.approx(golds[2] - golds[0])
    assert all(r["gold"]["mean"] <= g + 1e-9 for r, g in zip(by_proxy, golds))
    proxies = [r["proxy"] for r in by_proxy]
    assert proxies == sorted(proxies)
    for r in by_gold + by_proxy:
        low, high = r["win_rate"]["interval"]
        assert 0.0 <= low <= r["win_rate"]["mean"] <= high <= 1.0
        assert sum(r["gold_terms"].values()) == pytest.approx(r["gold"]["mean"])
    agreement = summary["proxy_agreement_on_sft_samples"]
    assert agreement["pairs"] <= 3 * 3  # C(3, 2) pairs per prompt, gold ties left out
    samples = json.loads((out / "samples.json").read_text())
    assert [len(s) for s in samples] == [5, 5, 5]
    [point] = summary["policies"]
    assert point["name"] == "ppo" and point["kl"] == 1.5 and point["gold_gain"] == pytest.approx(0.4)

    # the same samples, scored again by a reward model: the pool and prompts are the earlier run's
    again = tmp_path / "rescored"
    best_of_n.main(["--run_dir", str(tiny_run), "--samples_from", str(out), "--out", str(again)])
    rescored_summary = json.loads((again / "best_of_n.json").read_text())
    assert (rescored_summary["pool"], rescored_summary["opponents"]) == (3, 2)
    assert rescored_summary["prompts"] == str(prompts)
    assert -1.0 <= rescored_summary["rescoring"]["correlation_with_stored_scores"] <= 1.0
    rescored = json.loads((again / "samples.json").read_text())
    assert [[s["response"] for s in p] for p in rescored] == [[s["response"] for s in p] for p in samples]
    expected = best_of_n.rescore([s for p in samples for s in p], str(tiny_run / "reward" / "export"))
    assert [s["proxy"] for p in rescored for s in p] == pytest.approx(expected)
    by_gold_before, by_gold_after = summary["best_of_n"]["gold"], rescored_summary["best_of_n"]["gold"]
    assert [r["gold"] for r in by_gold_after] == [r["gold"] for r in by_gold_before]  # gold's choice stays
    assert [r["win_rate"] for r in by_gold_after] == [r["win_rate"] for r in by_gold_before]


def test_proxy_agreement_by_hand(script):
    def sample(gold, proxy, warmth):
        return {"gold": gold, "proxy": proxy, "terms": {"warmth": warmth, "on_topic": gold - warmth}}

    pools = [
        [sample(3.0, 0.1, 0.0), sample(4.0, 0.5, 0.0), sample(4.0, -1.0, 0.8)],
        [sample(2.0, 0.3, 0.5), sample(1.0, 0.3, 0.3)],
    ]
    # prompt 0: (3, 4) agrees, decided by topic (1 against 0 warmth); (3, 4') disagrees, decided by warmth
    # (0.8 against 0.2); (4, 4') a gold tie, left out. Prompt 1: a proxy tie, half, decided by topic
    agreement = script("best_of_n").proxy_agreement(pools)
    assert agreement["pairs"] == 3 and agreement["accuracy"] == pytest.approx(1.5 / 3)
    assert agreement["by_deciding_term"] == {
        "on_topic": {"pairs": 2, "accuracy": 0.75},
        "warmth": {"pairs": 1, "accuracy": 0.0},
    }


def test_a_policy_evaluated_on_other_prompts_is_refused(script, tmp_path):
    evaluation = tmp_path / "ppo_eval.json"
    evaluation.write_text(json.dumps({"options": {"prompts": "bundled:eval_prompts"}}))
    with pytest.raises(SystemExit, match="not on 'bundled:prompts_val'"):
        script("best_of_n").policy_point("ppo", evaluation, "bundled:prompts_val")
