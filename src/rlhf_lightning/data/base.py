"""What every DataModule of the project shares: sources, splits, the tokenizer, counted skips."""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from rlhf_lightning.data.batching import LengthGroupedSampler, ResumableDataLoader
from rlhf_lightning.data.formats import SkipRow
from rlhf_lightning.data.sources import read_rows
from rlhf_lightning.errors import ConfigurationError, DataFormatError
from rlhf_lightning.models import DEFAULT_MODEL, load_tokenizer


class TextDataModule(LightningDataModule):
    """Reads rows from sources, encodes them once in ``setup`` and batches them.

    Args:
        train: Training data: a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a ``datasets``
            directory, ``bundled:<name>``, or a hub dataset id.
        val: Validation data, in the same forms. ``None`` splits ``val_fraction`` off ``train``.
        tokenizer: Model name whose tokenizer encodes the data; the CLI links it to the model's.
        max_length: Longest sequence (prompt + response) in tokens; longer rows are handled as the
            stage documents (truncated or skipped, and counted).
        batch_size: Rows per batch on each device.
        val_fraction: Fraction of ``train`` held out for validation when ``val`` is ``None``.
        train_split: Split to read from a hub dataset or ``DatasetDict`` directory for ``train``.
        val_split: Split to read for ``val``.
        num_workers: DataLoader worker processes.
        seed: Seed of the ``val_fraction`` split and of the batch order.
        group_by_length: Batch training rows of similar length together (shuffled in groups) so
            little compute goes to pads.
        trust_remote_code: Allow a hub tokenizer to run its own code (off: only turn on for repos you trust).
    """

    parse_row: Any = None  # a function (record, where) -> canonical row, set by each subclass
    parse_val_row: Any = None  # the same for validation rows, when they differ (PPO: preferences)

    def __init__(
        self,
        train: str,
        val: str | None = None,
        tokenizer: str = DEFAULT_MODEL,
        max_length: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.0,
        train_split: str = "train",
        val_split: str = "test",
        num_workers: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if max_length < 2:
            raise ConfigurationError(f"data.max_length must be at least 2, got {max_length}")
        if batch_size < 1:
            raise ConfigurationError(f"data.batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigurationError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.train_source, self.val_source = train, val
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_split, self.val_split = train_split, val_split
        self.num_workers = num_workers
        self.seed = seed
        self.group_by_length = group_by_length
        self.trust_remote_code = trust_remote_code
        self.tokenizer = None
        self.train_data: list[dict] | None = None
        self.val_data: list[dict] | None = None
        self.skipped: dict[str, int] = {}

    # -- to be provided by each stage ------------------------------------------------------------
    def encode(self, row: Any) -> dict:
        """Token ids of one canonical row; raise :class:`SkipRow` to drop it (counted)."""
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict:
        """One batch of encoded rows."""
        raise NotImplementedError

    def encode_val(self, row: Any) -> dict:
        """Token ids of one validation row (by default as :meth:`encode`)."""
        return self.encode(row)

    def collate_val(self, examples: list[dict]) -> dict:
        """One validation batch (by default as :meth:`collate`)."""
        return self.collate(examples)

    def example_length(self, example: dict) -> int:
        """Tokens in an encoded row, for length grouping."""
        return len(example["input_ids"])

    # -- shared machinery ------------------------------------------------------------------------
    def _count(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def _encode_all(self, rows: list, source: str, encode) -> list[dict]:
        out, skipped = [], {}
        for row in rows:
            try:
                out.append(encode(row))
            except SkipRow as skip:
                skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
        self._count(skipped)
        if not out:
            raise DataFormatError(f"{source}: every row was skipped ({skipped}); nothing left to use")
        return out

    def load_rows(self, source: str, split: str, parse) -> list:
        rows, skipped = read_rows(source, parse, split)
        self._count(skipped)
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        parse = type(self).parse_row
        train_rows = self.load_rows(self.train_source, self.train_split, parse)
        if self.val_source is not None:
            val_rows = self.load_rows(self.val_source, self.val_split, type(self).parse_val_row or parse)
        elif self.val_fraction > 0 and type(self).parse_val_row is None:
            order = list(range(len(train_rows)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, round(self.val_fraction * len(train_rows)))
            held = set(order[:n_val])
            val_rows = [r for i, r in enumerate(train_rows) if i in held]
            train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        else:
            val_rows = []
        self.train_data = self._encode_all(train_rows, self.train_source, self.encode)
        self.val_data = (
            self._encode_all(val_rows, self.val_source or "val split", self.encode_val) if val_rows else []
        )
        if self.skipped:
            detail = ", ".join(f"{n} × {reason}" for reason, n in sorted(self.skipped.items()))
            rank_zero_warn(f"{type(self).__name__}: skipped rows: {detail}")

    def _loader(self, data: list[dict], shuffle: bool, sampler=None, collate=None) -> DataLoader:
        loader_class = ResumableDataLoader if shuffle else DataLoader  # training loaders resume mid-epoch
        return loader_class(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate or self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.group_by_length:
            lengths = [self.example_length(e) for e in self.train_data]
            sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
        return self._loader(self.train_data, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_data:
            return []
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each row on exactly one rank (Lightning's default sampler repeats rows to even the shards),
            # so metrics reduced over ranks equal the single-process ones.
            sampler = UnrepeatedDistributedSampler(self.val_data, shuffle=False)
        return self._loader(self.val_data, shuffle=False, sampler=sampler, collate=self.collate_val)
