"""Generalized Advantage Estimation against a plain Python loop and a hand-worked example."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.rl.gae import gae


def reference_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one episode at a time, in plain Python floats.

    An episode of ``n`` tokens ends after token ``n - 1``: the value after it is 0.
    """
    batch, time = len(rewards), len(rewards[0])
    advantages = [[0.0] * time for _ in range(batch)]
    for b in range(batch):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last = delta + gamma * lam * last
            advantages[b][t] = last
    returns = [
        [advantages[b][t] + (values[b][t] if t < lengths[b] else 0.0) for t in range(time)]
        for b in range(batch)
    ]
    return advantages, returns


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_python_loop_on_ragged_masks(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 0, 5, 3]
    batch, time = len(lengths), max(lengths)
    rewards = torch.randn(batch, time, generator=g, dtype=torch.float64)
    values = torch.randn(batch, time, generator=g, dtype=torch.float64)
    mask = torch.arange(time)[None, :] < torch.tensor(lengths)[:, None]

    advantages, returns = gae(rewards, values, mask, gamma, lam)

    expected_adv, expected_ret = reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_adv, dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor(expected_ret, dtype=torch.float64))


def test_gae_ignores_garbage_at_masked_positions():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rewards = torch.randn(3, 5, generator=g)
    values = torch.randn(3, 5, generator=g)
    advantages, returns = gae(rewards, values, mask, 0.97, 0.9)
    # Values and rewards past the end of an episode must not leak into it.
    noisy_rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e3))
    noisy_values = torch.where(mask, values, torch.full_like(values, -1e3))
    advantages2, returns2 = gae(noisy_rewards, noisy_values, mask, 0.97, 0.9)
    torch.testing.assert_close(advantages, advantages2)
    torch.testing.assert_close(returns, returns2)
    # Masked positions: zero advantage (and zero return).
    assert (advantages[~mask] == 0).all()
    assert (returns[~mask] == 0).all()
    # Valid positions: returns are the value targets advantages + values.
    torch.testing.assert_close(returns[mask], (advantages + values)[mask])


def test_gae_hand_worked_three_tokens():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma = 1, lam = 0.95; the value after the last token is 0.
    #   delta_2 = 1 + 1 * 0   - 0.7 = 0.3          A_2 = 0.3
    #   delta_1 = 0 + 1 * 0.7 - 0.6 = 0.1          A_1 = 0.1 + 0.95 * 0.3     = 0.385
    #   delta_0 = 0 + 1 * 0.6 - 0.5 = 0.1          A_0 = 0.1 + 0.95 * 0.385   = 0.46575
    #   returns = A + V = [0.96575, 0.985, 1.0]
    # A fourth, masked position holds junk that must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.46575, 0.385, 0.3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[0.96575, 0.985, 1.0, 0.0]], dtype=torch.float64))


def test_gae_discounted_hand_worked():
    # rewards [1, 2], values [0, 0], gamma = 0.5, lam = 0.5:
    #   A_1 = 2;  A_0 = delta_0 + gamma * lam * A_1 = (1 + 0.5 * 0 - 0) + 0.25 * 2 = 1.5
    advantages, returns = gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), 0.5, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.5, 2.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.5, 2.0]]))
