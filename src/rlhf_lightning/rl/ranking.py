"""The reward model's loss: Bradley-Terry on pairs, and InstructGPT's ranking loss on K-way rankings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Per-pair ``-log sigmoid(r_w - r_l - margin)`` (the margin as in Llama 2's reward model)."""
    return -F.logsigmoid(chosen - rejected - margin)


def all_pairs(k: int) -> list[tuple[int, int]]:
    """The C(k, 2) comparisons of a ranking listed best first: ``(winner, loser)`` positions."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def pair_accuracy(rewards: Tensor, pairs: Tensor) -> Tensor:
    """Per pair: 1 if the winner's reward is higher, 0.5 on a tie, 0 otherwise (``pairs``: winner, loser)."""
    return torch.sign(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).add(1.0).div(2.0)


def ranking_loss(rewards: Tensor, pairs: Tensor, groups: Tensor, margins: Tensor | None = None) -> Tensor:
    """InstructGPT's loss: per prompt, the mean Bradley-Terry loss of its C(K,2) pairs; then the mean over prompts.

    ``rewards``: one score per encoded response; ``pairs``: ``(P, 2)`` indices (winner, loser) into
    ``rewards``; ``groups``: ``(P,)`` the prompt each pair belongs to (0..G-1). Averaging inside a prompt
    first keeps a K=9 ranking from weighing 36 times a pair (Ouyang et al. 2022, section 3.5).
    """
    per_pair = bradley_terry_loss(
        rewards[pairs[:, 0]], rewards[pairs[:, 1]], 0.0 if margins is None else margins
    )
    return group_mean(per_pair, groups)


def group_mean(per_pair: Tensor, groups: Tensor) -> Tensor:
    """The mean over prompts of each prompt's mean pair loss (``groups``: the prompt of each pair, 0..G-1)."""
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, groups, per_pair)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1)
    return (sums / counts).mean()
