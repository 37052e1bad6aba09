"""Critic-free advantages from groups of samples of the same prompt.

A rollout holds ``k`` consecutive samples of each prompt. Each sample's score is compared with the
other samples of its own prompt, so no value model is needed to say what the prompt alone is worth:

- RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 6): the baseline of a sample is the mean score of
  the other ``k - 1`` samples, an unbiased leave-one-out estimate;
- GRPO (Shao et al. 2024, DeepSeekMath, section 4.1.2): scores standardised within the group; Dr. GRPO
  (Liu et al. 2025) drops the division by the group's standard deviation, which weights prompts whose
  samples barely differ as much as prompts whose samples differ a lot.
"""

from __future__ import annotations

from torch import Tensor


def groups(scores: Tensor, k: int) -> Tensor:
    """``(n,)`` scores as ``(n / k, k)``: one row per prompt, its ``k`` consecutive samples."""
    if k < 2:
        raise ValueError(f"a group baseline needs at least 2 samples per prompt, got k={k}")
    if scores.dim() != 1 or scores.shape[0] % k:
        raise ValueError(f"expected a 1-d tensor of groups of {k} samples, got shape {tuple(scores.shape)}")
    return scores.view(-1, k)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """``A_i = r_i - mean_{j != i} r_j`` within each group of ``k``: ``(n,)`` from ``(n,)`` scores."""
    g = groups(scores, k)
    leave_one_out = (g.sum(-1, keepdim=True) - g) / (k - 1)
    return (g - leave_one_out).reshape(-1)


def grpo_advantages(scores: Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """``(r_i - mean) / (std + eps)`` within each group of ``k`` (``scale=False``: ``r_i - mean``, Dr. GRPO).

    The standard deviation is the sample one (Bessel's correction), as in the GRPO implementations; a
    group whose scores are all equal gets advantage 0 either way.
    """
    g = groups(scores, k)
    centred = g - g.mean(-1, keepdim=True)
    if scale:
        centred = centred / (g.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)
