"""Direct Preference Optimization's losses (Rafailov et al. 2023) and two of its variants.

With ``h = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x))``, the difference of
the two responses' log-ratios to the reference (sums over each response's tokens):

- ``sigmoid`` (DPO, eq. 7): ``-log sigmoid(beta * h)``; with ``label_smoothing`` eps, conservative DPO
  (Mitchell 2023, "cDPO"): ``-(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)``, the loss
  of labels assumed flipped with probability eps;
- ``ipo`` (Azar et al. 2023, eq. 17): ``(h - 1 / (2 * beta))^2``, which regresses the log-ratio gap to a
  fixed target instead of pushing it to infinity on deterministic preferences.

A pair's ``margin`` (how much better the winner is, when the data says) offsets the sigmoid loss as in
ODPO (Amini et al. 2024): ``-log sigmoid(beta * h - margin)``. ``beta * (log pi - log pi_ref)`` is the
implicit reward of a response, which the metrics report.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def implicit_rewards(logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """``beta * (log pi(y|x) - log pi_ref(y|x))`` per response."""
    return beta * (logps - ref_logps)


def logratio_gap(logps: Tensor, ref_logps: Tensor, pairs: Tensor) -> Tensor:
    """``h`` of each ``(winner, loser)`` pair of indices into the per-response log-probabilities."""
    ratios = logps - ref_logps
    return ratios[pairs[:, 0]] - ratios[pairs[:, 1]]


def dpo_loss(
    gap: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    margin: Tensor | float = 0.0,
) -> Tensor:
    """Per-pair loss of the log-ratio gaps ``gap`` (see the module docstring)."""
    if loss_type == "sigmoid":
        logits = beta * gap - margin
        return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    if loss_type == "ipo":
        return (gap - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
