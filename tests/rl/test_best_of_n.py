"""Best-of-n estimates against hand-worked subsets and a brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from rlhf_lightning.rl.best_of_n import best_of_n_kl, best_of_n_mean, best_of_n_weights


def brute_force_weights(selector: list[float], n: int) -> list[float]:
    """Every n-subset, the earliest of its highest-scoring samples kept."""
    subsets = list(itertools.combinations(range(len(selector)), n))
    weights = [0.0] * len(selector)
    for subset in subsets:
        best = max(subset, key=lambda i: (selector[i], -i))
        weights[best] += 1 / len(subsets)
    return weights


def test_weights_by_hand():
    # subsets of 2 of scores (3, 1, 2): {0,1} keeps 0, {0,2} keeps 0, {1,2} keeps 2
    assert best_of_n_weights([3.0, 1.0, 2.0], 2) == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert best_of_n_weights([3.0, 1.0, 2.0], 1) == pytest.approx([1 / 3] * 3)  # best-of-1 = sampling
    assert best_of_n_weights([3.0, 1.0, 2.0], 3) == pytest.approx([1.0, 0.0, 0.0])
    assert best_of_n_weights([1.0, 1.0], 2) == pytest.approx([1.0, 0.0])  # a tie keeps the earlier sample


def test_weights_match_every_subset_with_ties():
    rng = random.Random(0)
    for _ in range(20):
        m = rng.randint(1, 7)
        selector = [float(rng.randint(0, 3)) for _ in range(m)]  # many ties
        for n in range(1, m + 1):
            weights = best_of_n_weights(selector, n)
            assert weights == pytest.approx(brute_force_weights(selector, n))
            assert sum(weights) == pytest.approx(1.0)


def test_mean_reads_values_of_the_selected_sample():
    # the proxy picks sample 0 over 1 and 2 over 1; the values are what a judge says of them
    assert best_of_n_mean([3.0, 1.0, 2.0], [0.0, 10.0, 6.0], 2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="best-of-4"):
        best_of_n_weights([1.0, 2.0], 4)


def test_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    with pytest.raises(ValueError):
        best_of_n_kl(0)
