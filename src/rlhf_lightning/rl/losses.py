"""PPO's clipped surrogate objectives (Schulman et al. 2017) and the KL loss term, masked to response tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.rl.kl import kl_estimate


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss ``max(-A r, -A clip(r, 1-eps, 1+eps))`` with ``r = pi/pi_old``.

    Returns the loss and the statistics PPO users watch: ``approxkl`` (``0.5 * E[logratio^2]``),
    ``clipfrac`` (share of tokens where the clip was active) and the mean ``ratio``.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(logratio.pow(2), mask),
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2)``."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    losses = (values - returns).pow(2)
    losses_clipped = (values_clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((losses_clipped > losses).float(), mask)}
    return loss, stats


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """The KL to the reference as a loss term (GRPO, Shao et al. 2024, eq. 4): the mean over response
    tokens of the ``k3`` estimator, non-negative and differentiable in the policy's log-probs."""
    return masked_mean(kl_estimate(logprobs, ref_logprobs, "k3"), mask)
