"""Whitening over masked tokens, and moments that are global across data-parallel ranks."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.rl.whiten import masked_moments, whiten


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3 + 2
    lengths = torch.tensor([9, 1, 4, 7, 0, 5])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    return values, mask


def test_whiten_zero_mean_unit_std_over_mask():
    values, mask = _batch()
    out = whiten(values, mask)
    valid = out[mask]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-10)
    assert float(valid.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert (out[~mask] == 0).all()
    # Masked-out values do not influence the result.
    junk = torch.where(mask, values, torch.full_like(values, 1e6))
    torch.testing.assert_close(whiten(junk, mask), out)


def test_whiten_keep_mean():
    values, mask = _batch(1)
    out = whiten(values, mask, shift_mean=False)
    valid, original = out[mask], values[mask]
    assert float(valid.mean()) == pytest.approx(float(original.mean()), abs=1e-10)
    assert float(valid.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert (out[~mask] == 0).all()


def test_masked_moments_hand_numbers():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    mean, var = masked_moments(values, mask)
    assert float(mean) == pytest.approx(2.0)
    assert float(var) == pytest.approx(2.0 / 3)  # biased: ((-1)^2 + 0 + 1^2) / 3


def test_masked_moments_all_reduce_over_two_ranks():
    values, mask = _batch(2)
    first, second = (values[:3], mask[:3]), (values[3:], mask[3:])

    # Each "rank" contributes its local sums; record them with an all_reduce that returns them unchanged.
    local = []

    def record(sums):
        local.append(sums.clone())
        return sums

    masked_moments(*first, all_reduce=record)
    masked_moments(*second, all_reduce=record)
    sums_first, sums_second = local

    # all_reduce(sum) on rank 0 adds rank 1's sums, and vice versa: both ranks see the global moments.
    mean0, var0 = masked_moments(*first, all_reduce=lambda t: t + sums_second)
    mean1, var1 = masked_moments(*second, all_reduce=lambda t: t + sums_first)
    global_mean, global_var = masked_moments(values, mask)
    assert float(global_mean) == pytest.approx(float(values[mask].mean()))
    assert float(global_var) == pytest.approx(float(values[mask].var(unbiased=False)))
    for mean, var in ((mean0, var0), (mean1, var1)):
        torch.testing.assert_close(mean, global_mean)
        torch.testing.assert_close(var, global_var)
    # Without the all_reduce, each half only sees its own tokens (and the moments differ).
    assert float(masked_moments(*first)[0]) != pytest.approx(float(global_mean))

    # And whitening each half with the all-reduced moments equals whitening the whole batch.
    halves = torch.cat(
        [
            whiten(*first, all_reduce=lambda t: t + sums_second),
            whiten(*second, all_reduce=lambda t: t + sums_first),
        ]
    )
    torch.testing.assert_close(halves, whiten(values, mask))


def test_whiten_empty_mask_is_finite():
    values = torch.randn(2, 3)
    out = whiten(values, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(out).all() and (out == 0).all()
