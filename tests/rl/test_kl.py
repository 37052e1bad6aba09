"""KL estimators on hand numbers and by Monte Carlo; the fixed and adaptive KL coefficients."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate


def test_k1_k3_hand_numbers():
    # pi = 0.5, pi_ref = 0.25: k1 = log 0.5 - log 0.25 = log 2; r = pi_ref / pi = 0.5, k3 = (0.5 - 1) - log 0.5
    logp = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.3)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25), math.log(0.5), math.log(0.3)], dtype=torch.float64)
    k1 = kl_estimate(logp, ref, "k1")
    k3 = kl_estimate(logp, ref, "k3")
    torch.testing.assert_close(k1, torch.tensor([math.log(2), -math.log(2), 0.0], dtype=torch.float64))
    # second token: r = 2, k3 = 1 - log 2; equal probabilities: 0
    expected_k3 = [-0.5 + math.log(2), 1.0 - math.log(2), 0.0]
    torch.testing.assert_close(k3, torch.tensor(expected_k3, dtype=torch.float64))
    assert float(k1[1]) < 0 < float(k3[1])  # k1 can be negative, k3 cannot


def test_k3_never_negative():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=g, dtype=torch.float64) * 5
    ref = torch.randn(10_000, generator=g, dtype=torch.float64) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k2")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_estimators_unbiased_for_categorical(estimator):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # KL(p || q) ~= 0.4134
    g = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimates = kl_estimate(p.log()[tokens], q.log()[tokens], estimator)
    # Standard errors with 200k samples: k1 ~0.0017, k3 ~0.0015; 0.01 is > 5 sigma.
    assert float(estimates.mean()) == pytest.approx(exact, abs=0.01)
    assert float(estimates.std() / math.sqrt(len(tokens))) < 0.003


def test_adaptive_controller_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    # KL 6.6: e = 6.6 / 6 - 1 = 0.1 (inside the clip); beta = 0.1 * (1 + 0.1 * 64 / 1000) = 0.10064
    ctl.update(6.6, 64)
    assert ctl.value == pytest.approx(0.10064)
    # KL 60: e = 9 -> clipped to 0.2; beta = 0.10064 * (1 + 0.2 * 100 / 1000) = 0.10064 * 1.02
    ctl.update(60.0, 100)
    assert ctl.value == pytest.approx(0.10064 * 1.02)
    # KL 0: e = -1 -> clipped to -0.2; beta *= 1 - 0.2 * 500 / 1000 = 0.9
    ctl.update(0.0, 500)
    assert ctl.value == pytest.approx(0.10064 * 1.02 * 0.9)
    # KL exactly on target: no change
    before = ctl.value
    ctl.update(6.0, 10_000)
    assert ctl.value == pytest.approx(before)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.05, target=1.0, horizon=100)
    for kl in (3.0, 2.0, 0.5):
        ctl.update(kl, 8)
    state = ctl.state_dict()
    restored = AdaptiveKLController(0.05, target=1.0, horizon=100)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(0.3, 8)
    restored.update(0.3, 8)
    assert restored.value == ctl.value


def test_fixed_controller_does_not_change():
    ctl = FixedKLController(0.2)
    for kl in (0.0, 100.0, -5.0, float("nan")):
        ctl.update(kl, 1000)
    assert ctl.value == 0.2
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.2
