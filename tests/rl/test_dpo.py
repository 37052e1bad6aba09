"""DPO's losses against values worked out by hand."""

import math

import pytest
import torch

from rlhf_lightning.rl.dpo import dpo_loss, implicit_rewards, logratio_gap

LOGPS = torch.tensor([-1.0, -3.0, -2.0, -2.5])
REF = torch.tensor([-1.5, -2.0, -2.0, -2.0])
PAIRS = torch.tensor([[0, 1], [2, 3]])


def test_logratio_gap_and_implicit_rewards():
    # log-ratios 0.5, -1, 0, -0.5: gaps 0.5 - (-1) = 1.5 and 0 - (-0.5) = 0.5
    assert logratio_gap(LOGPS, REF, PAIRS).tolist() == [1.5, 0.5]
    assert implicit_rewards(LOGPS, REF, 0.1).tolist() == pytest.approx([0.05, -0.1, 0.0, -0.05])


def test_sigmoid_loss():
    loss = dpo_loss(torch.tensor([1.5, 0.5]), beta=0.1)
    # -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957; -log sigmoid(0.05) = 0.668460
    assert loss.tolist() == pytest.approx([0.620957, 0.668460], abs=1e-6)


def test_a_zero_gap_costs_log_2():
    assert dpo_loss(torch.zeros(3), beta=0.5).tolist() == pytest.approx([math.log(2)] * 3)


def test_conservative_dpo_label_smoothing():
    loss = dpo_loss(torch.tensor([1.5]), beta=0.1, label_smoothing=0.1)
    # 0.9 * log(1 + e^-0.15) + 0.1 * log(1 + e^0.15) = 0.9 * 0.620957 + 0.1 * 0.770957
    assert loss.item() == pytest.approx(0.635957, abs=1e-6)


def test_ipo_regresses_the_gap_to_one_over_two_beta():
    loss = dpo_loss(torch.tensor([1.5, 0.5, 5.0]), beta=0.1, loss_type="ipo")
    assert loss.tolist() == pytest.approx([12.25, 20.25, 0.0])  # (1.5 - 5)^2, (0.5 - 5)^2, at the target


def test_margin_offsets_the_sigmoid_loss():
    loss = dpo_loss(torch.tensor([1.5]), beta=0.1, margin=torch.tensor([0.05]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-6)  # 0.644397


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown DPO loss_type 'hinge'"):
        dpo_loss(torch.zeros(1), beta=0.1, loss_type="hinge")
