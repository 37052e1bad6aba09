"""Best-of-n sampling as a yardstick: its expected scores and its KL, estimated from samples of one policy.

Best-of-n draws ``n`` responses from a policy and keeps the one a selector (a reward model, or the gold
judge) scores highest. It needs no training, and its KL to the sampled policy has a closed form, so it
draws the frontier a trained policy can be read against: gold gained per nat of KL. Selected by a proxy
reward model, gold rises more slowly than the proxy, or falls, where the proxy is wrong (Gao et al. 2022,
"Scaling Laws for Reward Model Overoptimization", which plots best-of-n this way).

From ``m`` samples of a prompt, the mean over every ``n``-subset (``n <= m``, an unbiased estimate of the
best-of-``n`` expectation) needs no enumeration: sorted by the selector, the ``i``-th lowest sample
(0-based) is the best of ``C(i, n-1)`` of the ``C(m, n)`` subsets. Against a sample of the policy itself,
best-of-``n`` wins at most ``n / (n + 1)`` of the time (Beirami et al. 2024; exactly that when the
selector is the judge and scores never tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_of_n_kl(n: int) -> float:
    """``log n - (n - 1) / n`` nats: the KL of best-of-``n`` to the sampled policy as the literature quotes
    it (Gao et al. 2022 plot against it); Beirami et al. (2024) show it is an upper bound on the exact KL."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(selector: Sequence[float], n: int) -> list[float]:
    """Per sample, the probability that best-of-``n`` over a uniformly drawn ``n``-subset of the samples
    keeps it (they sum to 1). Among equal selector scores the earlier sample is kept."""
    m = len(selector)
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs 1 <= n <= the number of samples ({m})")
    # ascending by score; among equals the later sample sorts lower, so the earlier one wins the subset
    order = sorted(range(m), key=lambda i: (selector[i], -i))
    total = math.comb(m, n)
    weights = [0.0] * m
    for rank, index in enumerate(order):
        weights[index] = math.comb(rank, n - 1) / total
    return weights


def best_of_n_mean(selector: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected ``values`` of the sample best-of-``n`` keeps by ``selector`` (same order, one prompt)."""
    return sum(w * v for w, v in zip(best_of_n_weights(selector, n), values, strict=True))
