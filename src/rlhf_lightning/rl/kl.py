"""The KL penalty to the reference policy: per-token estimators and the coefficient's controllers."""

from __future__ import annotations

from torch import Tensor


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    ``k1 = log pi - log pi_ref`` is unbiased but can be negative; ``k3 = (r - 1) - log r`` with
    ``r = pi_ref / pi`` is unbiased and never negative (Schulman, "Approximating KL divergence", 2020).
    """
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k3":
        return logr.exp() - 1 - logr
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Steers the KL toward ``target`` (Ziegler et al. 2019, section 2.2).

    After each rollout of ``n_steps`` episodes: ``e = clip(KL / target - 1, -0.2, 0.2)`` and
    ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(value: float, target: float | None, horizon: int) -> FixedKLController:
    """A fixed coefficient, or one steered toward ``target`` when it is given."""
    if target is None:
        return FixedKLController(value)
    return AdaptiveKLController(value, target, horizon)
