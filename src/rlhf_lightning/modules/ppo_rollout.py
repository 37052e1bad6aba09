"""The PPO rollout: from a batch of prompts to an :class:`~rlhf_lightning.rl.experience.Experience`.

Sample a response to each prompt from the policy, then, without gradients: the policy's log-probs and
entropies, the reference's log-probs, the critic's values, the scores (a reward model or a reward
function, normalised and penalised for a missing EOS), the per-token KL and its penalty, and finally
the advantages (GAE over the critic, or a group baseline). ``PPOModule.rollout`` wires these.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from rlhf_lightning.data.render import decode_response
from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.lm import (
    head_logprobs,
    hidden_states,
    hidden_states_and_trunk,
    hidden_states_from_trunk,
    last_token_index,
    response_logprobs,
    sample,
    sequence_scores,
)
from rlhf_lightning.rewards import RewardFunction
from rlhf_lightning.rl.experience import Experience
from rlhf_lightning.rl.gae import gae
from rlhf_lightning.rl.group_advantages import grpo_advantages, rloo_advantages
from rlhf_lightning.rl.kl import kl_estimate
from rlhf_lightning.rl.whiten import whiten


def repeat_prompts(batch: dict, k: int) -> dict:
    """Each prompt of a batch ``k`` times in a row (the samples of a prompt stay together)."""
    if k == 1:
        return batch
    out = {key: value.repeat_interleave(k, 0) for key, value in batch.items() if isinstance(value, Tensor)}
    if batch.get("prompt_texts") is not None:
        out["prompt_texts"] = [text for text in batch["prompt_texts"] for _ in range(k)]
    return out


@contextmanager
def weights_cast_once(device: str):
    """Under mixed precision, cast each weight once for a region where no weight changes.

    Lightning's autocast runs without autocast's weight cache (weights change between optimizer steps
    inside one ``training_step``), so every forward would cast every weight again: 33 times per
    rollout of 32 tokens. The rollout changes no weight, so the cache is exact there; it is dropped on
    the way out.
    """
    if not torch.is_autocast_enabled(device) or torch.is_autocast_cache_enabled():
        yield
        return
    try:
        with torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


def model_scores(
    reward_model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    finished: Tensor,
    stats: dict | None,
    missing_eos_penalty: float | None,
) -> tuple[Tensor, Tensor]:
    """Raw and final scores from a reward model: standardised with its ``stats``, minus the penalty."""
    raw = sequence_scores(reward_model, input_ids, attention_mask).float()
    scores = raw if stats is None else (raw - stats["mean"]) / stats["std"]
    return raw, eos_penalised(scores, finished, missing_eos_penalty)


def function_scores(
    reward_function: RewardFunction,
    tokenizer,
    responses: Tensor,
    response_mask: Tensor,
    prompt_texts: list[str] | None,
    missing_eos_penalty: float | None,
) -> tuple[Tensor, Tensor]:
    """Raw and final scores from a reward function of the decoded texts (used as returned, then penalised)."""
    if prompt_texts is None:
        raise ConfigurationError(
            "model.reward_function needs the prompts' texts: use a DataModule whose batches carry "
            "'prompt_texts' (PromptDataModule does)"
        )
    decoded = [decode_response(tokenizer, r, m) for r, m in zip(responses, response_mask)]
    texts, finished = [d[0] for d in decoded], [d[1] for d in decoded]
    raw = torch.tensor(reward_function(list(prompt_texts), texts, finished), dtype=torch.float)
    if raw.shape != (len(texts),):
        raise ConfigurationError(
            f"model.reward_function returned {tuple(raw.shape)} scores for {len(texts)} responses"
        )
    raw = raw.to(responses.device)
    finished = torch.tensor(finished, device=raw.device)
    return raw, eos_penalised(raw, finished, missing_eos_penalty)


def eos_penalised(scores: Tensor, finished: Tensor, penalty: float | None) -> Tensor:
    """``scores`` minus ``penalty`` where the response never emitted EOS (``None``: unchanged)."""
    return scores if penalty is None else scores - penalty * (~finished).float()


@torch.no_grad()
def collect(module, batch: dict) -> tuple[Experience, Tensor | None]:
    """Sample responses for ``batch`` (each prompt ``samples_per_prompt`` times) and compute everything
    the update needs about them except the advantages; also returns the critic's values (``None``
    critic-free). ``module`` is the :class:`PPOModule` whose models and options are used."""
    h, tokenizer = module.hparams, module.tokenizer
    batch = repeat_prompts(batch, h.samples_per_prompt)
    prompts, prompt_mask = batch["input_ids"], batch["attention_mask"]
    start = prompts.shape[1]
    responses, response_mask = sample(
        module.policy,
        prompts,
        prompt_mask,
        max_new_tokens=h.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        temperature=h.temperature,
    )
    width = int(response_mask.sum(-1).max())
    responses, mask = responses[:, :width], response_mask[:, :width]
    input_ids = torch.cat([prompts, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)

    # the LM heads run over row groups (no gradients here): the batch's logits never exist at once
    blocks = module.shared_blocks
    if blocks:
        hidden, trunk = hidden_states_and_trunk(module.policy, input_ids, attention_mask, blocks)
    else:
        hidden, trunk = hidden_states(module.policy, input_ids, attention_mask), None
    hidden = hidden[:, start - 1 : -1]
    values = None
    if module.critic is not None:
        values = module.critic_values(input_ids, attention_mask, start)
    elif module.value_head is not None:  # the critic shares the policy's backbone
        values = module.value_head(hidden).squeeze(-1)
    logprobs, entropy = head_logprobs(
        module.policy, hidden, responses, h.temperature, module.suppressed, fp32_head=True, with_entropy=True
    )
    del hidden
    with module.reference_model() as reference:
        if trunk is None:
            ref_logprobs = response_logprobs(
                reference, input_ids, attention_mask, start, h.temperature, module.suppressed, fp32_head=True
            )
        else:  # the reference's lower blocks are the policy's frozen ones: only its upper blocks run
            ref_hidden = hidden_states_from_trunk(reference, trunk, attention_mask, blocks)[:, start - 1 : -1]
            ref_logprobs = head_logprobs(
                reference, ref_hidden, responses, h.temperature, module.suppressed, fp32_head=True
            )
            del ref_hidden
    raw_scores, scores = module.score(input_ids, attention_mask, responses, mask, batch.get("prompt_texts"))

    kl = kl_estimate(logprobs, ref_logprobs, h.kl_estimator) * mask
    penalised = h.kl_penalty == "reward"
    experience = Experience(
        input_ids=input_ids,
        attention_mask=attention_mask,
        start=start,
        responses=responses,
        mask=mask,
        logprobs=logprobs * mask,
        raw_scores=raw_scores,
        scores=scores,
        kl=kl,
        entropy=entropy * mask,
        non_score_reward=-module.kl_controller.value * kl if penalised else torch.zeros_like(kl),
        ref_logprobs=None if penalised else ref_logprobs * mask,
        prompt_texts=batch.get("prompt_texts"),
        trunk=trunk,
    )
    return experience, values


def token_rewards(experience: Experience) -> Tensor:
    """PPO's per-token reward: the non-score reward at every token plus the score at the last one."""
    rewards = experience.non_score_reward.clone()
    last = last_token_index(experience.mask)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += experience.scores
    return rewards


def mean_value_error(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, all_reduce=None) -> Tensor:
    """The critic's mean error (rewards-to-go minus values) over the valid tokens of the global batch."""
    _, to_go = gae(rewards, torch.zeros_like(values), mask, gamma, 1.0)
    totals = torch.stack([((to_go - values) * mask).sum(), mask.sum().float()])
    if all_reduce is not None:
        totals = all_reduce(totals)
    return totals[0] / totals[1]


@torch.no_grad()
def shift_value_bias(head: nn.Linear, shift: Tensor) -> None:
    """Move the value head's bias by the critic's mean error on the first rollout.

    The head copied from the reward model predicts the normalised score, but not the missing-EOS
    penalty or the KL term: without this, most tokens start with the same error (about -0.9 when 90%
    of responses miss EOS), which value clipping undoes by at most ``clip_range_value`` per iteration.
    """
    head.bias.add_(shift.to(head.bias.dtype))


def gae_advantages(
    experience: Experience,
    values: Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
    all_reduce=None,
    calibrate=None,
) -> Experience:
    """PPO's estimator: GAE over the critic's values, advantages whitened over the global batch.

    ``calibrate(shift)``, when given, receives the critic's mean error on this rollout and the values
    are shifted by it (the first rollout's value-bias calibration).
    """
    mask = experience.mask
    rewards = token_rewards(experience)
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    values = values.float() * mask
    if calibrate is not None:
        shift = mean_value_error(rewards, values, mask, gamma, all_reduce)
        calibrate(shift)
        values = (values + shift) * mask
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    experience.values, experience.returns = values, returns
    experience.advantages = whiten(advantages, mask, all_reduce=all_reduce)
    return experience


def group_advantages(experience: Experience, estimator: str, k: int, scale: bool = True) -> Experience:
    """Critic-free: each episode's return (its score plus its KL penalty) against the other samples of its
    prompt (``rloo`` or ``grpo``), given to every token of its response."""
    returns = experience.scores.float() + experience.non_score_reward.sum(-1)
    if estimator == "rloo":
        advantages = rloo_advantages(returns, k)
    else:
        advantages = grpo_advantages(returns, k, scale)
    experience.advantages = advantages[:, None] * experience.mask.to(advantages.dtype)
    return experience
