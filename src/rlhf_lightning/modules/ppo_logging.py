"""What the PPO stage writes to TensorBoard: each iteration's statistics (TRL's names; docs/ppo.md lists
them) and the held-out preference accuracies of its validation loop."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.lm import completion_logprob, sequence_scores
from rlhf_lightning.rl.experience import Experience
from rlhf_lightning.rl.ranking import pair_accuracy

SAME_ON_ALL_RANKS = ("episode", "rollouts", "objective/kl_coef", "lr", "lr_critic")  # logged unreduced


def log_iteration(
    module, experience: Experience, stats: dict, rollout_time: float, optimize_time: float
) -> None:
    """Log the rollout's statistics, the update's ``stats`` and the iteration's counters, once per iteration.

    Per-rank values are averaged over ranks (the EOS count is summed); counters, the KL coefficient and
    the learning rates are the same on every rank and logged as they are.
    """
    n = len(experience)
    learning_rates = [group["lr"] for group in module.optimizers().param_groups]
    metrics = {
        **experience.metrics(),
        "objective/kl_coef": torch.tensor(module.kl_controller.value),
        "lr": torch.tensor(learning_rates[0]),
        "episode": torch.tensor(float(module.episodes)),
        "rollouts": torch.tensor(float(module.rollouts)),
        "nonfinite/rollouts_skipped": torch.tensor(float(module.nonfinite.rollouts)),
        "time/rollout_s": torch.tensor(rollout_time),
        "time/optimize_s": torch.tensor(optimize_time),
        **stats,
    }
    if module.value_head is not None:
        metrics["lr_critic"] = torch.tensor(learning_rates[-1])
    metrics = {k: v.detach().float().to(module.device) for k, v in metrics.items()}
    synced = {k: v for k, v in metrics.items() if k not in SAME_ON_ALL_RANKS}
    module.log_dict(synced, on_step=True, on_epoch=False, sync_dist=True, batch_size=n)
    eos = (experience.responses == module.tokenizer.eos_token_id).sum().float()
    module.log("val/num_eos_tokens", eos, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum")
    same = {k: metrics[k] for k in metrics.keys() - synced.keys()}
    module.log_dict(same, on_step=True, on_epoch=False, batch_size=n)


def preference_accuracies(module, batch: dict) -> dict[str, Tensor]:
    """On a batch of held-out pairs (no gradients: called from ``validation_step``): how often the
    policy's implicit reward, ``log pi(y|x) - log pi_ref(y|x)`` (Rafailov et al. 2023), prefers the
    preferred response (did PPO move the policy toward what people prefer?), and, when there is one, how
    often the reward model does."""
    pairs = batch["pairs"]
    implicit = completion_logprob(module.policy, batch)
    with module.reference_model() as reference:
        implicit = implicit - completion_logprob(reference, batch)
    accuracies = {"policy": pair_accuracy(implicit, pairs)}
    if module.reward_model is not None:
        rewards = sequence_scores(module.reward_model, batch["input_ids"], batch["attention_mask"]).float()
        accuracies["reward_model"] = pair_accuracy(rewards, pairs)
    return accuracies
