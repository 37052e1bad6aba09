"""The PPO update: ``ppo_epochs`` passes of clipped-loss minibatch steps over one rollout's experience.

Each minibatch step is the clipped policy loss (Schulman et al. 2017), plus ``beta`` times the ``k3`` KL
loss when the KL is a loss term (GRPO), plus ``vf_coef`` times the clipped value loss when there is a
critic. Minibatches whose loss or gradient is NaN/inf are skipped and counted.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from rlhf_lightning.lm import entropy_from_logits
from rlhf_lightning.modules.base import all_ranks, one_process
from rlhf_lightning.rl.experience import Experience
from rlhf_lightning.rl.losses import kl_loss, masked_mean, policy_loss, value_loss


def ppo_update(module, experience: Experience) -> dict[str, Tensor]:
    """``ppo_epochs`` x shuffled minibatches of ``module``'s losses on ``experience``, one optimizer step
    each; returns the statistics averaged over the steps taken (TensorBoard names)."""
    h = module.hparams
    optimizer = module.optimizers()
    records: dict[str, list[Tensor]] = {}
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(h.ppo_epochs):
        order = torch.randperm(len(experience))
        for begin in range(0, len(experience), h.minibatch_size):
            mb = experience.minibatch(order[begin : begin + h.minibatch_size].to(module.device))
            optimizer.zero_grad()
            stats = minibatch_backward(module, mb)
            grad_norm = None
            if stats is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, h.max_grad_norm or float("inf"))
            if stats is None or not torch.isfinite(grad_norm):
                optimizer.zero_grad()
                _count_skipped_step(module, "loss" if stats is None else "gradient")
                continue
            optimizer.step()
            optimizer.zero_grad()  # freed now, not held through the next minibatch's forward or rollout
            for key, value in {**stats, "policy/grad_norm": grad_norm}.items():
                records.setdefault(key, []).append(value.float())
    stats = {k: torch.stack(v).mean() for k, v in records.items()}
    if "val/ratio" in records:
        stats["val/ratio_var"] = torch.stack(records["val/ratio"]).var(unbiased=False)
    return stats


def _count_skipped_step(module, what: str) -> None:
    module.nonfinite.steps += 1
    module.log("nonfinite/steps_skipped", float(module.nonfinite.steps))
    rank_zero_info(f"PPO iteration {module.rollouts}: non-finite {what}, minibatch update skipped")


def minibatch_backward(module, mb: Experience) -> dict[str, Tensor] | None:
    """Gradients of one minibatch's loss in ``module``'s parameters; returns its statistics, or ``None``
    if a loss is NaN/inf (on any rank).

    With a separate critic on one device the two losses touch disjoint parameters, so each network is
    back-propagated on its own right after its forward: the gradients are those of one backward of the
    sum, but only one network's activations are alive at a time. Data-parallel strategies expect one
    backward that reaches every parameter, so there the sum is back-propagated at once.
    """
    h = module.hparams
    ids, mask, start = mb.input_ids, mb.attention_mask, mb.start
    split = module.critic is not None and one_process(module)
    if module.value_head is not None and not split:
        logits, values = module.policy_and_values(ids, mask, start)
    else:
        logits = module.policy_logits(mb)
    logprobs = module.logprobs(logits, mb.responses)
    pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, h.clip_range)
    loss = pg_loss
    stats = {
        "loss/policy_avg": pg_loss.detach(),
        "policy/approxkl_avg": pg_stats["approxkl"],
        "policy/clipfrac_avg": pg_stats["clipfrac"],
        "val/ratio": pg_stats["ratio"],
    }
    if h.kl_penalty == "loss":
        kl = kl_loss(logprobs, mb.ref_logprobs, mb.mask)
        loss = loss + module.kl_controller.value * kl
        stats["loss/kl_avg"] = kl.detach()
    with torch.no_grad():
        entropy = entropy_from_logits(logits, h.temperature, module.suppressed)
        stats["policy/entropy_avg"] = masked_mean(entropy, mb.mask)
    del logits, logprobs
    if split:
        if not torch.isfinite(loss):
            return None
        module.manual_backward(loss)
        values = module.critic_values(ids, mask, start)
    if module.value_head is not None:
        vf_loss, vf_stats = value_loss(values.float(), mb.values, mb.returns, mb.mask, h.clip_range_value)
        loss = h.vf_coef * vf_loss if split else loss + h.vf_coef * vf_loss
        stats["loss/value_avg"] = vf_loss.detach()
        stats["val/clipfrac_avg"] = vf_stats["clipfrac"]
    if not all_ranks(module, bool(torch.isfinite(loss))):
        return None
    module.manual_backward(loss)
    return stats
