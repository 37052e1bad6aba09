"""RLOO and GRPO advantages and the k3 KL loss on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.rl.group_advantages import grpo_advantages, rloo_advantages
from rlhf_lightning.rl.losses import kl_loss


def test_rloo_leave_one_out_baseline():
    # one prompt, scores 1, 2, 6: baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    got = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3)
    torch.testing.assert_close(got, torch.tensor([-3.0, -1.5, 4.5]))


def test_rloo_with_two_samples_is_the_difference_and_groups_do_not_mix():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0])  # two prompts of K=2; the second is tied
    torch.testing.assert_close(rloo_advantages(scores, 2), torch.tensor([-2.0, 2.0, 0.0, 0.0]))


def test_grpo_standardises_within_the_group():
    # scores 1, 2, 6: mean 3, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7)
    got = grpo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, eps=0.0)
    torch.testing.assert_close(got, torch.tensor([-2.0, -1.0, 3.0]) / math.sqrt(7))
    # Dr. GRPO: centred only
    torch.testing.assert_close(
        grpo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, scale=False), torch.tensor([-2.0, -1.0, 3.0])
    )


def test_grpo_with_two_samples_and_an_all_equal_group():
    scores = torch.tensor([0.0, 2.0, 5.0, 5.0])
    # K=2: mean 1, sample std sqrt(2): advantages -+1/sqrt(2); the tied group gets 0, not NaN
    got = grpo_advantages(scores, 2, eps=0.0)
    torch.testing.assert_close(got[:2], torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    assert torch.isnan(got[2:]).all()  # eps=0 divides 0 by 0: the default eps exists for this
    torch.testing.assert_close(grpo_advantages(scores, 2)[2:], torch.zeros(2))


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_advantages_sum_to_zero_per_group(fn):
    scores = torch.randn(12, generator=torch.Generator().manual_seed(0))
    sums = fn(scores, 4).view(3, 4).sum(-1)
    torch.testing.assert_close(sums, torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_arithmetic_is_checked(fn):
    with pytest.raises(ValueError, match="groups of 4"):
        fn(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.zeros(6), 1)


def test_k3_kl_loss_by_hand():
    # log r = ref - new; k3 = exp(log r) - 1 - log r, averaged over the unmasked tokens
    new = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    k3 = [math.exp(-0.5) - 1 + 0.5, 0.0]
    assert kl_loss(new, ref, mask).item() == pytest.approx(sum(k3) / 2)
    # zero, with zero gradient, where the policy equals its reference
    same = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    loss = kl_loss(same, same.detach(), torch.ones(1, 2))
    loss.backward()
    assert loss.item() == 0.0 and same.grad.abs().max().item() == 0.0
