"""scripts/benchmark.py's arithmetic: model FLOPs by hand, iteration clock, the ratio table."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig


@pytest.fixture(scope="module")
def bench(script):
    return script("benchmark")


CONFIG = LlamaConfig(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=10,
)


def test_forward_flops_by_hand(bench):
    # per layer: q,o 2*8*8 + k,v 2*8*4 + gate,up,down 3*8*16 = 128 + 64 + 384 = 576 weights; 2 layers
    body = 2 * 576
    # 5 tokens, average context 3: attention 2 layers * 2*8*3 = 96 per token; head on 2 tokens: 8*10
    expected = 2 * body * 5 + 2 * 96 * 5 + 2 * 8 * 10 * 2
    assert bench.forward_flops(CONFIG, tokens=5, context=3, head_tokens=2) == expected


def test_a_shared_critic_or_none_needs_fewer_flops_than_a_separate_one(bench):
    stats = [{"response_length": 10.0}]
    lengths = {"ppo_prompt_tokens": 20.0, "sft_prompt_tokens": 30.0}
    separate = bench.step_flops("ppo4", CONFIG, stats, lengths)
    shared = bench.step_flops("ppo4", CONFIG, stats, lengths, critic_body=False)
    critic = bench.forward_flops(CONFIG, 8 * 30, 30, 0)  # rollout batch 8 x (prompt 20 + response 10)
    assert separate - shared == pytest.approx(critic * (1 + 4 * 3))  # one rollout forward + 4 epochs fwd/bwd


def test_dpo_step_flops_count_the_reference_forward_unless_precomputed(bench):
    stats = [{"tokens": 16 * 50.0}]  # 8 pairs = 16 sequences of 50 tokens, 30 of them prompt
    lengths = {"sft_prompt_tokens": 30.0}
    live = bench.step_flops("dpo", CONFIG, stats, lengths)
    precomputed = bench.step_flops("dpo", CONFIG, stats, lengths, reference=False)
    forward = bench.forward_flops(CONFIG, 800, 50, 16 * 20)  # the head on the 20 response positions per row
    assert live == pytest.approx(4 * forward) and precomputed == pytest.approx(3 * forward)


def test_clock_times_and_table(bench):
    clock = bench.StepClock()
    clock.marks = [0.0, 1.0, 3.0, 6.0]
    assert clock.times(warmup=1) == [2.0, 3.0]
    row = {"stage": "ppo1", "time_ratio": 0.5, "memory_ratio": 0.6}
    common = {"samples_per_s": 1.0, "tokens_per_s": 10.0, "mfu": 0.4}
    row["ours"] = {"median_s": 5.0, "peak_rss_gb": 3.0, "precision": "bf16-mixed", **common}
    row["trl"] = {"median_s": 10.0, "peak_rss_gb": 5.0, "precision": "32-true", **common}
    lines = bench.table([row]).splitlines()
    assert lines[2].startswith("| PPO update, 1 epoch | ours | bf16-mixed | 5.00 |")
    assert lines[2].endswith("| **0.50** | **0.60** |")
    assert "| TRL 1.12 | 32-true | 10.00 |" in lines[3]


def test_merge_gives_rows_of_one_side_ratios_against_trl_fp32(bench):
    trl_fp32 = {"stage": "ppo4", "trl": {"median_s": 40.0, "peak_rss_gb": 8.0, "precision": "32-true"}}
    trl_bf16 = {"stage": "ppo4", "trl": {"median_s": 30.0, "peak_rss_gb": 8.0, "precision": "bf16-mixed"}}
    ours = {"stage": "ppo4", "ours": {"median_s": 10.0, "peak_rss_gb": 4.0, "precision": "bf16-mixed"}}
    rows = bench.merge([[trl_bf16], [trl_fp32], [ours]])
    assert rows[2]["time_ratio"] == 0.25 and rows[2]["memory_ratio"] == 0.5
    assert "time_ratio" not in rows[0]


def test_matmul_rates_stay_within_their_budget_on_a_slow_dtype(bench):
    """A dtype without native support (bf16 on an AVX2 CPU: ~400x slower than fp32) is timed on small
    matrices instead of stalling the script: with a 10 ms budget no size reaches 2048^2."""
    import time

    began = time.perf_counter()
    rates = bench.matmul_rates(budget_s=0.01)
    assert time.perf_counter() - began < 5
    for dtype in ("fp32", "bf16"):
        assert rates[dtype] > 0
        assert 128 <= rates[f"{dtype}_size"] < 2048
