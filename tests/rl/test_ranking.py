"""Bradley-Terry and the InstructGPT ranking loss against hand-computed numbers."""

from __future__ import annotations

import itertools

import pytest
import torch

from rlhf_lightning.rl.ranking import all_pairs, bradley_terry_loss, ranking_loss

# -log(sigmoid(d)) = log(1 + exp(-d)), written out:
NLL = {
    3.0: 0.04858735157374206,
    2.5: 0.07888973429254963,
    2.0: 0.1269280110429725,
    1.0: 0.31326168751822286,
    0.5: 0.4740769841801067,
    0.0: 0.6931471805599453,
    -0.5: 0.9740769841801067,
    -1.0: 1.3132616875182228,
    -2.0: 2.1269280110429727,
}


@pytest.mark.parametrize(
    ("chosen", "rejected", "margin", "expected"),
    [
        (1.0, 0.0, 0.0, NLL[1.0]),
        (0.0, 0.0, 0.0, NLL[0.0]),
        (0.5, 1.5, 0.0, NLL[-1.0]),
        (-1.0, 1.0, 0.0, NLL[-2.0]),
        (5.0, 2.0, 0.0, NLL[3.0]),
        (2.0, 0.0, 1.0, NLL[1.0]),  # the margin is subtracted from the difference
        (1.0, 0.0, 3.0, NLL[-2.0]),
        (1.0, 0.0, -2.0, NLL[3.0]),
    ],
)
def test_bradley_terry_hand_computed(chosen, rejected, margin, expected):
    loss = bradley_terry_loss(torch.tensor([chosen]), torch.tensor([rejected]), margin)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_is_per_pair_with_tensor_margin():
    loss = bradley_terry_loss(
        torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.5])
    )
    assert loss.tolist() == pytest.approx([NLL[1.0], NLL[-1.0], NLL[0.5]], rel=1e-6)


def test_bradley_terry_stable_for_large_differences():
    loss = bradley_terry_loss(torch.tensor([200.0, -200.0]), torch.tensor([0.0, 0.0]))
    assert loss[0].item() == pytest.approx(0.0, abs=1e-30)
    assert loss[1].item() == pytest.approx(200.0)
    assert torch.isfinite(loss).all()


def test_all_pairs():
    assert all_pairs(2) == [(0, 1)]
    assert all_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert all_pairs(9) == list(itertools.combinations(range(9), 2))


def test_ranking_loss_of_one_row_is_the_mean_of_its_pairs():
    rewards = torch.tensor([2.0, 1.0, 1.5, -1.0])  # the ranking is best first; 1 and 2 are out of order
    pairs = torch.tensor(all_pairs(4))
    loss = ranking_loss(rewards, pairs, torch.zeros(6, dtype=torch.long))
    one_by_one = [
        bradley_terry_loss(rewards[w : w + 1], rewards[lo : lo + 1]).item() for w, lo in all_pairs(4)
    ]
    # differences: 1, 0.5, 3, -0.5, 2, 2.5
    assert one_by_one == pytest.approx(
        [NLL[1.0], NLL[0.5], NLL[3.0], NLL[-0.5], NLL[2.0], NLL[2.5]], rel=1e-6
    )
    assert loss.item() == pytest.approx(sum(one_by_one) / 6, rel=1e-6)


def test_ranking_loss_with_margins():
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.0])
    pairs = torch.tensor([[0, 1], [2, 3]])
    groups = torch.tensor([0, 1])
    loss = ranking_loss(rewards, pairs, groups, torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((NLL[1.0] + NLL[1.0]) / 2, rel=1e-6)
    assert ranking_loss(rewards, pairs, groups, None).item() == pytest.approx(
        (NLL[1.0] + NLL[2.0]) / 2, rel=1e-6
    )


def test_ranking_loss_weighs_each_prompt_equally():
    # prompt 0: a K=4 ranking whose 6 pairs all have difference 1 -> mean NLL[1.0]
    # prompt 1: one pair with difference -2 -> NLL[-2.0]
    rewards = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 2.0])
    k4 = [(0, 1), (1, 2), (2, 3), (0, 1), (1, 2), (2, 3)]  # reuse differences of exactly 1
    pairs = torch.tensor([*k4, (4, 5)])
    groups = torch.tensor([0] * 6 + [1])
    loss = ranking_loss(rewards, pairs, groups)
    assert loss.item() == pytest.approx((NLL[1.0] + NLL[-2.0]) / 2, rel=1e-6)
    pooled = (6 * NLL[1.0] + NLL[-2.0]) / 7
    assert abs(loss.item() - pooled) > 0.5  # not a mean over all 7 comparisons

    # and with the real C(4,2) pairs: group mean first, then the mean over prompts
    real = torch.tensor([*all_pairs(4), (4, 5)])
    loss = ranking_loss(rewards, real, groups)
    k4_mean = bradley_terry_loss(rewards[real[:6, 0]], rewards[real[:6, 1]]).mean().item()
    assert loss.item() == pytest.approx((k4_mean + NLL[-2.0]) / 2, rel=1e-6)


def test_ranking_loss_gradient_pushes_winners_up():
    rewards = torch.zeros(3, requires_grad=True)
    ranking_loss(rewards, torch.tensor(all_pairs(3)), torch.zeros(3, dtype=torch.long)).backward()
    # d/dr of mean(-log sigmoid(r_w - r_l)) at 0: each pair contributes -/+ 0.5 / 3
    assert rewards.grad.tolist() == pytest.approx([-1 / 3, 0.0, 1 / 3])
