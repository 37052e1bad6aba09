"""The experience one PPO rollout produces, and the minibatches the update reads from it.

Per-token tensors are ``(episodes, response tokens)`` and line up with ``responses``: position ``t``
is about the ``t``-th response token. ``input_ids`` holds the (left-padded) prompt and the response,
so the response starts at column ``start``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

PER_TOKEN = ("responses", "mask", "logprobs", "ref_logprobs", "kl", "entropy", "non_score_reward")
PER_TOKEN += ("values", "advantages", "returns")
PER_EPISODE = ("raw_scores", "scores")


@dataclass
class Experience:
    """One rollout: the episodes, what the models said about them, and their advantages.

    Attributes:
        input_ids: ``(B, start + T)`` prompt and response tokens.
        attention_mask: ``(B, start + T)`` 1 on real tokens.
        start: The column of the first response token.
        responses: ``(B, T)`` sampled tokens (pad after EOS).
        mask: ``(B, T)`` True on real response tokens (up to and including EOS).
        logprobs: Log-probabilities of the responses under the policy that sampled them (zero where masked).
        raw_scores: ``(B,)`` the reward model's (or function's) scores as it returned them.
        scores: ``(B,)`` the scores PPO optimises (normalised, missing-EOS penalty applied).
        kl: Per-token KL estimate to the reference (zero where masked).
        entropy: Per-token entropy of the sampling distribution (zero where masked).
        non_score_reward: Per-token reward besides the score: ``-beta * kl`` when the KL is in the
            reward, else zero.
        ref_logprobs: The reference's log-probabilities (kept only when the KL is a loss term).
        values: The critic's values (``gae`` only).
        advantages: Per-token advantages (set by the estimator).
        returns: The value targets (``gae`` only).
        prompt_texts: The prompts' texts, one per episode, when the data carries them.
        trunk: ``(B, start + T, hidden)`` the hidden states the policy's frozen lower blocks computed,
            when they are shared with the reference (the update then runs the upper blocks only).
    """

    input_ids: Tensor
    attention_mask: Tensor
    start: int
    responses: Tensor
    mask: Tensor
    logprobs: Tensor
    raw_scores: Tensor
    scores: Tensor
    kl: Tensor
    entropy: Tensor
    non_score_reward: Tensor
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    prompt_texts: list[str] | None = None
    trunk: Tensor | None = None

    def __len__(self) -> int:
        return self.responses.shape[0]

    def is_finite(self) -> bool:
        """No NaN/inf in anything the update reads."""
        watched = (self.scores, self.advantages, self.returns, self.logprobs)
        return all(bool(torch.isfinite(t).all()) for t in watched if t is not None)

    def minibatch(self, idx: Tensor) -> Experience:
        """Episodes ``idx``, with the columns that are padding in every one of them trimmed on both sides."""
        mask, attention = self.mask[idx], self.attention_mask[idx]
        first = int((attention[:, : self.start].sum(0) > 0).nonzero()[0]) if self.start > 0 else 0
        width = int(mask.sum(-1).max())
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("prompt_texts", "trunk"):
                continue
            if f.name in PER_TOKEN:
                out[f.name] = value[idx][:, :width]
            elif f.name in PER_EPISODE:
                out[f.name] = value[idx]
        texts = self.prompt_texts
        return replace(
            self,
            **out,
            input_ids=self.input_ids[idx][:, first : self.start + width],
            attention_mask=attention[:, first : self.start + width],
            start=self.start - first,
            trunk=None if self.trunk is None else self.trunk[idx][:, first : self.start + width],
            prompt_texts=[texts[i] for i in idx.tolist()] if texts is not None else None,
        )

    def metrics(self) -> dict[str, Tensor]:
        """The rollout's statistics under TRL's TensorBoard names (means over episodes)."""
        kl = self.kl.sum(-1)
        non_score = self.non_score_reward.sum(-1)
        return {
            "objective/scores": self.scores.mean(),
            "objective/raw_scores": self.raw_scores.mean(),
            "objective/kl": kl.mean(),
            "objective/entropy": self.entropy.sum(-1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (self.scores + non_score).mean(),
            "objective/response_length": self.mask.sum(-1).float().mean(),
        }
