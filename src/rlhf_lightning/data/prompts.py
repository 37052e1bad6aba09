"""Prompts for PPO rollouts, left-padded for generation; optional held-out preferences for validation.

The DataModule yields prompts only: responses are generated inside ``PPOModule.training_step``, so
they always come from the current policy, and under DDP each rank gets its own shard of prompts.
"""

from __future__ import annotations

from rlhf_lightning.data.base import TextDataModule
from rlhf_lightning.data.batching import left_padded
from rlhf_lightning.data.formats import PreferenceRow, PromptRow, SkipRow, to_preference_row, to_prompt_row
from rlhf_lightning.data.preference import collate_preferences, encode_preference
from rlhf_lightning.data.render import encode, prompt_text, user_text
from rlhf_lightning.errors import ConfigurationError


class PromptDataModule(TextDataModule):
    """Prompts in any format of ``rlhf_lightning.data.formats`` (messages go through the chat template).

    ``batch_size`` is the rollout batch on each device: prompts per PPO iteration. ``max_length``
    bounds the prompt; longer prompts are skipped and counted. ``val`` takes *preference* data
    (any preference format): during PPO the reward model's and the policy's preference accuracy on it
    are logged.

    Args:
        val_max_length: Longest prompt + response of a validation preference row, in tokens.
    """

    parse_row = staticmethod(to_prompt_row)
    parse_val_row = staticmethod(to_preference_row)

    def __init__(
        self, train: str = "bundled:prompts_train", max_length: int = 256, val_max_length: int = 512, **kwargs
    ):
        super().__init__(train=train, max_length=max_length, **kwargs)
        if self.val_fraction:
            raise ConfigurationError(
                "data.val_fraction does not apply to prompts: validation takes preference pairs (data.val)"
            )
        self.val_max_length = val_max_length

    def encode(self, row: PromptRow) -> dict:
        ids = encode(self.tokenizer, prompt_text(self.tokenizer, row.prompt))
        if not ids:
            raise SkipRow("empty prompt")
        if len(ids) > self.max_length:
            raise SkipRow("prompt longer than max_length")
        return {"input_ids": ids, "text": user_text(row.prompt)}

    def collate(self, examples: list[dict]) -> dict:
        """Left-padded ``input_ids`` and ``attention_mask``, and ``prompt_texts`` (the last user turn, for
        callbacks that judge responses by text)."""
        input_ids, attention_mask = left_padded(
            [e["input_ids"] for e in examples], self.tokenizer.pad_token_id
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_texts": [e.get("text", "") for e in examples],
        }

    def encode_val(self, row: PreferenceRow) -> dict:
        return encode_preference(self.tokenizer, row, self.val_max_length)

    def collate_val(self, examples: list[dict]) -> dict:
        return collate_preferences(examples, self.tokenizer.pad_token_id)
