"""Whitening (normalising to zero mean and unit variance) over the valid tokens of the global batch."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_moments(values: Tensor, mask: Tensor, all_reduce=None) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of ``values`` where ``mask`` is set.

    ``all_reduce(tensor)`` sums a tensor over processes; with it the moments are those of the union of
    every rank's tokens, so data-parallel whitening equals whitening the global batch.
    """
    mask = mask.to(values.dtype)
    sums = torch.stack([(values * mask).sum(), (values.pow(2) * mask).sum(), mask.sum()])
    if all_reduce is not None:
        sums = all_reduce(sums)
    count = sums[2].clamp(min=1)
    mean = sums[0] / count
    return mean, (sums[1] / count - mean.pow(2)).clamp(min=0)


def whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce=None, eps: float = 1e-8
) -> Tensor:
    """``(x - mean) / std`` over masked positions; ``shift_mean=False`` keeps the mean (for rewards)."""
    mean, var = masked_moments(values, mask, all_reduce)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)
