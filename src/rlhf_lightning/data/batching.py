"""Padding and length grouping, so compute is spent on tokens rather than pads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

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


def left_padded(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts for generation: ids left-padded to the longest, and their attention mask."""
    return pad(sequences, pad_token_id, left=True), mask_of(sequences, left=True)


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


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of stateful loaders in each checkpoint and restores it on
    ``--ckpt_path``; without it a run resumed mid-epoch would start the epoch's batches over (PPO would
    see its first prompts twice and the run would no longer match an uninterrupted one). The loader
    counts the batches it handed out in the current epoch (Lightning fetches a sized loader's batches as
    it trains on them, so that count is the number trained on when a checkpoint is written). On resume
    the next iteration over the same sampler epoch skips them (same order: the samplers are seeded).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._handed_out = 0
        self._resume: dict | None = None

    def _sampler_epoch(self) -> int:
        sampler = self.sampler
        return int(getattr(sampler, "epoch", getattr(getattr(sampler, "sampler", None), "epoch", 0)))

    def __iter__(self):
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self._sampler_epoch():
            skip = self._resume["batches"]
        self._resume = None
        self._handed_out = 0
        iterator = super().__iter__()
        for _ in range(min(skip, len(self))):
            next(iterator)
            self._handed_out += 1
        for batch in iterator:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._sampler_epoch(), "batches": self._handed_out}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
