"""Padding and length grouping, so compute is spent on tokens rather than pads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

IGNORE_INDEX = -100


def pad(sequences: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    """Stack ``sequences`` into one tensor, padding each to the longest on the right (or left)."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            if left:
                out[i, width - len(s) :] = torch.as_tensor(s)
            else:
                out[i, : len(s)] = torch.as_tensor(s)
    return out


def mask_of(sequences: Sequence[Sequence[int]], left: bool = False) -> Tensor:
    """The attention mask matching :func:`pad`."""
    return pad([[1] * len(s) for s in sequences], 0, left=left)


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which neighbours have similar lengths.

    Indices are shuffled, cut into mega-batches of ``group_size`` batches, and sorted by length inside
    each, so a batch holds similar lengths while epochs still differ. Under DDP Lightning wraps this
    sampler and hands each rank every world-size-th index, which keeps the grouping.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_size: int = 16, seed: int = 0):
        self.lengths = list(lengths)
        self.chunk = max(1, batch_size * group_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.chunk):
            yield from sorted(order[start : start + self.chunk], key=lambda i: -self.lengths[i])
