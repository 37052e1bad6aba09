"""Demonstrations for supervised fine-tuning, with the loss on completion tokens only."""

from __future__ import annotations

from rlhf_lightning.data.base import TextDataModule
from rlhf_lightning.data.batching import IGNORE_INDEX, mask_of, pad
from rlhf_lightning.data.formats import SFTRow, SkipRow, to_sft_row
from rlhf_lightning.data.render import encode_pair


def sft_example(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> dict:
    """Input ids and labels (prompt masked with -100), completion truncated to fit ``max_length``.

    A prompt that leaves no room for a single completion token is skipped: it would teach nothing.
    """
    room = max_length - len(prompt_ids)
    if room < 1:
        raise SkipRow("prompt fills max_length")
    completion_ids = completion_ids[:room]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


class SFTDataModule(TextDataModule):
    """Demonstrations in any SFT format (see ``rlhf_lightning.data.formats``).

    Rows longer than ``max_length`` lose the end of their completion; rows whose prompt alone fills
    ``max_length`` are skipped and counted. Training batches are length-grouped and padded only to
    their longest row.
    """

    parse_row = staticmethod(to_sft_row)

    def __init__(self, train: str = "bundled:sft_train", **kwargs):
        super().__init__(train=train, **kwargs)

    def encode(self, row: SFTRow) -> dict:
        prompt_ids, completion_ids = encode_pair(self.tokenizer, row.prompt, row.completion)
        return sft_example(prompt_ids, completion_ids, self.max_length)

    def collate(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": pad(ids, self.tokenizer.pad_token_id),
            "attention_mask": mask_of(ids),
            "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
        }
