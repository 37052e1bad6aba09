"""Preference data: pairwise comparisons and K-way rankings, each response encoded once.

A batch element is one prompt with its K responses (K=2 for a pair). The collator lists the C(K,2)
comparisons as index pairs over the batch's responses, so a ranking costs K sequences, not 2*C(K,2).
The responses are laid out in one of two ways:

* one right-padded row per response (prompt + response): any model reads it;
* ``share_prompt``: one row per ranking, its prompt once and then every response, with ``segments``
  saying which part each token is and ``position_ids`` restarting each response where the prompt ends.
  With a block attention mask (``rlhf_lightning.lm.shared_prompt_mask``) every response sees the prompt
  and itself only, so the model computes exactly what the first layout gives while running the prompt
  once instead of K times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.data.base import TextDataModule
from rlhf_lightning.data.batching import mask_of, pad
from rlhf_lightning.data.formats import PreferenceRow, SkipRow, to_preference_row
from rlhf_lightning.data.render import encode_pair
from rlhf_lightning.rl.ranking import all_pairs


def preference_example(
    prompt_ids: list[int],
    response_ids: list[list[int]],
    margin: float | None,
    max_length: int,
    tiers: list[int] | None = None,
) -> dict:
    """Encoded sequences (prompt + each response, truncated to ``max_length``) of one ranking, best
    first; responses of one tier (``tiers``, from tied scores) are not compared.

    Skipped (and counted): a prompt that leaves no room for a response, and responses that become
    identical once truncated (the comparison would carry no signal).
    """
    room = max_length - len(prompt_ids)
    if room < 1:
        raise SkipRow("prompt fills max_length")
    responses = [r[:room] for r in response_ids]
    if len({tuple(r) for r in responses}) < len(responses):
        raise SkipRow("responses identical after truncation to max_length")
    return {
        "sequences": [prompt_ids + r for r in responses],
        "response_lengths": [len(r) for r in responses],
        "prompt_length": len(prompt_ids),
        "margin": margin,
        "tiers": tiers,
    }


def encode_preference(tokenizer, row: PreferenceRow, max_length: int) -> dict:
    """:func:`preference_example` of a canonical row: the prompt and each response, encoded once."""
    finished = row.finished or [True] * len(row.responses)
    encoded = [encode_pair(tokenizer, row.prompt, r, f) for r, f in zip(row.responses, finished)]
    return preference_example(encoded[0][0], [c for _, c in encoded], row.margin, max_length, row.tiers)


def share_prompt_layout(examples: list[dict], pad_token_id: int) -> dict:
    """One row per ranking: its prompt once, then each of its responses (see the module docstring).

    ``segments`` is 0 on the prompt, k on the k-th response of the row (from 1) and -1 on padding;
    ``response_rows`` and ``response_starts`` locate each response of the batch (in the flat order of
    the comparisons' indices) by row and first position.
    """
    rows, segments, positions, response_rows, response_starts = [], [], [], [], []
    for r, example in enumerate(examples):
        p = example["prompt_length"]
        ids, segment, position = list(example["sequences"][0][:p]), [0] * p, list(range(p))
        for k, sequence in enumerate(example["sequences"], start=1):
            response = sequence[p:]
            response_rows.append(r)
            response_starts.append(len(ids))
            ids += response
            segment += [k] * len(response)
            position += range(p, p + len(response))
        rows.append(ids)
        segments.append(segment)
        positions.append(position)
    return {
        "input_ids": pad(rows, pad_token_id),
        "attention_mask": mask_of(rows),
        "segments": pad(segments, -1),
        "position_ids": pad(positions, 0),
        "response_rows": torch.tensor(response_rows, dtype=torch.long),
        "response_starts": torch.tensor(response_starts, dtype=torch.long),
    }


def comparisons(examples: list[dict]) -> dict[str, Tensor]:
    """The comparisons of a batch of rankings (ties left out): ``pairs`` (winner, loser) as indices into
    the batch's responses in order, the ranking (``groups``) and ``margins`` of each."""
    pairs, groups, margins = [], [], []
    offset = 0
    for g, example in enumerate(examples):
        tiers = example.get("tiers")
        for winner, loser in all_pairs(len(example["sequences"])):
            if tiers is not None and tiers[winner] == tiers[loser]:
                continue  # tied scores: no comparison
            pairs.append((offset + winner, offset + loser))
            groups.append(g)
            margins.append(example["margin"] or 0.0)
        offset += len(example["sequences"])
    return {
        "pairs": torch.tensor(pairs, dtype=torch.long),
        "groups": torch.tensor(groups, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float),
    }


def collate_preferences(examples: list[dict], pad_token_id: int, share_prompt: bool = False) -> dict:
    """Index the comparisons of a batch of rankings (:func:`comparisons`) and lay out their responses:
    one row per response, or with ``share_prompt`` one row per ranking (:func:`share_prompt_layout`)."""
    sequences, lengths, prompt_lengths = [], [], []
    for example in examples:
        sequences.extend(example["sequences"])
        lengths.extend(example["response_lengths"])
        prompt_lengths.extend([example["prompt_length"]] * len(example["sequences"]))
    if share_prompt:
        layout = share_prompt_layout(examples, pad_token_id)
    else:
        layout = {"input_ids": pad(sequences, pad_token_id), "attention_mask": mask_of(sequences)}
    batch = {
        **layout,
        "response_lengths": torch.tensor(lengths, dtype=torch.float),
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
        **comparisons(examples),
    }
    if examples and all("ref_logps" in e for e in examples):  # per-response values a method stored (DPO)
        batch["ref_logps"] = torch.tensor([v for e in examples for v in e["ref_logps"]], dtype=torch.float)
    return batch


class PreferenceDataModule(TextDataModule):
    """Pairwise or K-way ranked preferences in any format of ``rlhf_lightning.data.formats``.

    ``batch_size`` counts prompts: a batch of 4 K=4 rankings encodes 16 sequences and 24 comparisons.
    Reusable by any preference-based method.

    Args:
        share_prompt: Lay out each ranking as one row, its prompt once followed by every response, each
            response attending to the prompt and itself only: the same rewards and log-probabilities
            (up to float rounding) for about half the tokens of K=8 rankings, and a third fewer for
            pairs with prompts as long as their responses. Needs a model with ``sdpa`` or ``eager``
            attention (Llama, Qwen, Mistral and most decoders in transformers). Off: one row per
            response, which any model reads.
    """

    parse_row = staticmethod(to_preference_row)

    def __init__(self, train: str = "bundled:preferences_train", share_prompt: bool = False, **kwargs):
        super().__init__(train=train, **kwargs)
        self.share_prompt = share_prompt

    def encode(self, row: PreferenceRow) -> dict:
        return encode_preference(self.tokenizer, row, self.max_length)

    def collate(self, examples: list[dict]) -> dict:
        return collate_preferences(examples, self.tokenizer.pad_token_id, self.share_prompt)

    def example_length(self, example: dict) -> int:
        return sum(len(s) for s in example["sequences"])
