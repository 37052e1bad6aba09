"""The models of the PPO stage, built and checked: policy, frozen reference, frozen reward model, critic;
the options checked before any of them loads.

The critic is a backbone plus a value head with a bias. Both start from the critic model (by default
the reward model, as Huang et al. 2024 recommend); with reward normalisation on, the head is rescaled
so its first values are on the scale of the normalised returns they are trained toward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.lm import trunk_is_reusable
from rlhf_lightning.models import LoraOptions, backbone, decoder_layers, freeze, load_reward_model, score_head
from rlhf_lightning.modules.reward import STATS_FILE


def read_reward_stats(path: str) -> dict | None:
    """The reward normalisation stats stored beside a reward-model export, if any."""
    file = Path(path) / STATS_FILE
    return json.loads(file.read_text()) if file.exists() else None


def value_head(source: nn.Linear, hidden_size: int | None = None, stats: dict | None = None) -> nn.Linear:
    """A value head (with a bias) copied from a scalar reward head.

    With ``stats`` (the reward's mean/std) the copy predicts ``(r - mean) / std``: the critic then starts
    on the scale of the normalised rewards. A ``hidden_size`` that differs from the source's gets a
    fresh head (std ``1/sqrt(hidden + 1)``) instead.
    """
    width = source.weight.shape[-1]
    head = nn.Linear(hidden_size or width, 1)
    with torch.no_grad():
        if head.in_features != width:
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
            nn.init.zeros_(head.bias)
            return head
        head.weight.copy_(source.weight)
        head.bias.copy_(source.bias if source.bias is not None else torch.zeros(1))
        if stats is not None:
            head.weight.div_(stats["std"])
            head.bias.sub_(stats["mean"]).div_(stats["std"])
    return head


def reward_source(
    reward_model: str,
    reward_function,
    normalize: bool,
    pad_token_id: int,
    trust_remote_code: bool = False,
) -> tuple[nn.Module | None, dict | None]:
    """The frozen reward model (``None`` when a reward function scores instead) and its normalisation
    stats (``None`` when ``normalize`` is off or the export has none)."""
    if reward_function is not None and not callable(reward_function):
        raise ConfigurationError(
            f"model.reward_function must score texts (a RewardFunction), got {type(reward_function).__name__}"
        )
    model = None
    if reward_function is None:
        model = freeze(load_reward_model(reward_model, trust_remote_code, pad_token_id=pad_token_id))
    stats = read_reward_stats(reward_model) if normalize else None
    if normalize and stats is None and reward_function is None:
        rank_zero_warn(
            f"model.normalize_reward is on but {reward_model} has no {STATS_FILE}: scores are used raw"
        )
    return model, stats


def critic_and_value_head(
    policy: nn.Module,
    reward_model: nn.Module | None,
    reward_model_name: str,
    critic_name: str | None,
    share_backbone: bool,
    reward_stats: dict | None,
    pad_token_id: int,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
) -> tuple[nn.Module | None, nn.Linear]:
    """The critic's backbone (``None`` when it shares the policy's) and its value head.

    The head is the critic model's score head (the reward model's unless ``critic_name`` is given),
    rescaled by ``reward_stats`` when the critic is the reward model.
    """
    if share_backbone:
        if critic_name is not None:
            raise ConfigurationError(
                "model.critic must be null with share_critic_backbone: the policy is the critic"
            )
        source = reward_model or load_reward_model(
            reward_model_name, trust_remote_code, pad_token_id=pad_token_id
        )
        head = value_head(score_head(source), policy.config.hidden_size, reward_stats)
        return None, head
    critic_model = load_reward_model(
        critic_name or reward_model_name, trust_remote_code, pad_token_id=pad_token_id
    )
    if gradient_checkpointing:
        critic_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stats = reward_stats if critic_name is None else None
    return backbone(critic_model), value_head(score_head(critic_model), None, stats)


def check_options(
    estimator: str, k: int, critic: str | None, share_critic_backbone: bool, temperature: float, lora
) -> LoraOptions | None:
    """The stage's options are consistent (clear errors before any model loads); returns ``lora`` parsed."""
    if temperature <= 0:
        raise ConfigurationError(
            f"model.temperature must be > 0 (PPO needs sampled responses), got {temperature}"
        )
    if k < 1:
        raise ConfigurationError(f"model.samples_per_prompt must be >= 1, got {k}")
    if estimator != "gae" and k < 2:
        raise ConfigurationError(
            f"model.advantage_estimator={estimator} compares the samples of each prompt: set "
            f"model.samples_per_prompt to 2 or more (got {k})"
        )
    if estimator != "gae" and (critic is not None or share_critic_backbone):
        raise ConfigurationError(
            f"model.advantage_estimator={estimator} has no critic: unset model.critic and "
            "model.share_critic_backbone (they apply to gae)"
        )
    lora = LoraOptions.of(lora)
    if lora is not None and lora.dropout > 0:
        raise ConfigurationError("model.lora.dropout must be 0 for PPO: log-probs must not depend on dropout")
    return lora


def shared_trunk_blocks(policy: nn.Module, reference: str | None, lora, top_layers: int | None) -> int | None:
    """How many lower blocks the policy and the reference share: the policy's frozen ones, when the
    reference is the policy's own starting point (``None``: nothing shared, each runs whole).

    Their output (the trunk) is computed once per rollout, for the policy, the reference and every
    minibatch step of the update, which then run only the upper blocks."""
    if reference is not None or lora is not None or top_layers is None:
        return None
    blocks = len(decoder_layers(policy)) - top_layers
    if blocks < 1 or not trunk_is_reusable(policy, blocks):
        return None
    return blocks


def check_vocabularies(**models: nn.Module | None) -> None:
    """Every model reads the same token ids: PPO feeds one tokenizer's ids to all of them."""
    sizes = {
        role.replace("_", " "): model.get_input_embeddings().num_embeddings
        for role, model in models.items()
        if model is not None
    }
    if len(set(sizes.values())) > 1:
        raise ConfigurationError(f"PPO needs one tokenizer for all models; vocabulary sizes differ: {sizes}")
