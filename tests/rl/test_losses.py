"""PPO's clipped policy and value losses on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.rl.losses import masked_mean, policy_loss, value_loss


def _policy(ratios, advantages, mask=None, clip_range=0.2):
    logratio = torch.log(torch.tensor([ratios], dtype=torch.float64))
    old = torch.full_like(logratio, -1.3)
    adv = torch.tensor([advantages], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool) if mask is None else torch.tensor([mask])
    return policy_loss(old + logratio, old, adv, mask, clip_range)


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipped"),
    [
        # inside [0.8, 1.2]: plain -A r, no clipping
        (1.1, 2.0, -2.2, 0.0),
        (0.9, -1.0, 0.9, 0.0),
        # A > 0, r above 1 + eps: -A * 1.2 (no credit for pushing further), the clip is active
        (1.5, 2.0, -2.4, 1.0),
        # A > 0, r below 1 - eps: the unclipped -A r = -1.0 is the larger (pessimistic) term, clip inactive
        (0.5, 2.0, -1.0, 0.0),
        # A < 0, r below 1 - eps: -A * 0.8 = 0.8 (no credit for pushing further down), clip active
        (0.5, -1.0, 0.8, 1.0),
        # A < 0, r above 1 + eps: the unclipped -A r = 1.5 is larger, clip inactive
        (1.5, -1.0, 1.5, 0.0),
    ],
)
def test_policy_loss_single_token(ratio, advantage, loss, clipped):
    value, stats = _policy([ratio], [advantage])
    assert float(value) == pytest.approx(loss)
    assert float(stats["clipfrac"]) == pytest.approx(clipped)
    assert float(stats["ratio"]) == pytest.approx(ratio)
    assert float(stats["approxkl"]) == pytest.approx(0.5 * math.log(ratio) ** 2)


def test_policy_loss_batch_mean_and_stats():
    ratios = [1.1, 1.5, 0.5, 0.5]
    advantages = [2.0, 2.0, 2.0, -1.0]
    # per token: -2.2, -2.4, -1.0, 0.8 -> mean -1.2; clip active on tokens 2 and 4 -> 0.5
    loss, stats = _policy(ratios, advantages)
    assert float(loss) == pytest.approx((-2.2 - 2.4 - 1.0 + 0.8) / 4)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    logs = [math.log(r) for r in ratios]
    assert float(stats["approxkl"]) == pytest.approx(0.5 * sum(x * x for x in logs) / 4)
    assert float(stats["ratio"]) == pytest.approx(sum(ratios) / 4)


def test_policy_loss_ignores_masked_positions():
    mask = [True, False, True, False]
    loss, stats = _policy([1.1, 1.5, 0.5, 0.5], [2.0, 2.0, 2.0, -1.0], mask)
    # tokens 1 and 3 only: -2.2 and -1.0
    assert float(loss) == pytest.approx(-1.6)
    assert float(stats["clipfrac"]) == pytest.approx(0.0)
    assert float(stats["approxkl"]) == pytest.approx(0.25 * (math.log(1.1) ** 2 + math.log(0.5) ** 2))
    # Anything at masked positions (even inf ratios or huge advantages) changes nothing.
    loss2, stats2 = _policy([1.1, 50.0, 0.5, 1e-6], [2.0, -1e6, 2.0, 1e6], mask)
    assert float(loss2) == pytest.approx(float(loss))
    for key in stats:
        assert float(stats2[key]) == pytest.approx(float(stats[key]))


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    old = torch.zeros(1, 2, dtype=torch.float64)
    new = torch.log(torch.tensor([[1.1, 1.5]], dtype=torch.float64)).requires_grad_(True)
    loss, _ = policy_loss(new, old, torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.ones(1, 2), 0.2)
    loss.backward()
    # d/dlogp of mean(-A * exp(logp)) for the unclipped token: -A r / 2 = -0.55; clipped token: 0
    torch.testing.assert_close(new.grad, torch.tensor([[-0.55, 0.0]], dtype=torch.float64))


def _value(values, old_values, returns, mask=None, clip=0.2):
    def row(x):
        return torch.tensor([x], dtype=torch.float64)

    mask = torch.ones(1, len(values), dtype=torch.bool) if mask is None else torch.tensor([mask])
    return value_loss(row(values), row(old_values), row(returns), mask, clip)


def test_value_loss_unclipped_hand_worked():
    # |V - V_old| = 0.1 <= 0.2: clipped value equals V; loss = 0.5 * (1.1 - 1.5)^2 = 0.08
    loss, stats = _value([1.1], [1.0], [1.5])
    assert float(loss) == pytest.approx(0.08)
    assert float(stats["clipfrac"]) == 0.0


def test_value_loss_clipped_hand_worked():
    # V = 2.0 overshot the return 1.5 starting from V_old = 1.0; clip(V) = 1.2
    #   unclipped (2.0 - 1.5)^2 = 0.25, clipped (1.2 - 1.5)^2 = 0.09: max = 0.25 -> loss 0.125, clip inactive
    loss, stats = _value([2.0], [1.0], [1.5])
    assert float(loss) == pytest.approx(0.125)
    assert float(stats["clipfrac"]) == 0.0
    # V = 0.0 moved away from the return 1.5; clip(V) = 0.8 (V_old 1.0 - 0.2)
    #   unclipped (0 - 1.5)^2 = 2.25, clipped (0.8 - 1.5)^2 = 0.49 -> 1.125, inactive
    loss, stats = _value([0.0], [1.0], [1.5])
    assert float(loss) == pytest.approx(1.125)
    # V = 3.0 with return 3.0 and V_old = 1.0: clip(V) = 1.2
    #   unclipped 0, clipped (1.2 - 3)^2 = 3.24 -> loss 1.62, the clip is active (pessimistic term)
    loss, stats = _value([3.0], [1.0], [3.0])
    assert float(loss) == pytest.approx(1.62)
    assert float(stats["clipfrac"]) == 1.0


def test_value_loss_batch_and_mask():
    # tokens: (1.1, 1.0, 1.5) -> 0.16; (3.0, 1.0, 3.0) -> 3.24; masked junk ignored
    loss, stats = _value([1.1, 3.0, 100.0], [1.0, 1.0, -100.0], [1.5, 3.0, 7.0], [True, True, False])
    assert float(loss) == pytest.approx(0.5 * (0.16 + 3.24) / 2)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert float(masked_mean(values, mask)) == pytest.approx(10.0 / 3)
    assert float(masked_mean(values, torch.zeros_like(mask))) == 0.0  # no valid token: 0, not NaN
