"""Stage 3: PPO against a frozen reward model, with a KL penalty to the frozen SFT policy.

One ``training_step`` is one PPO iteration (manual optimization):

1. rollout: sample a response to each prompt of the batch from the current policy;
2. score: the frozen reward model at the last token of each response (normalised with the stats
   exported by the reward stage), minus a penalty for responses that never emit EOS;
3. reward per token: ``-beta * KL_t`` at every token, plus the score at the last one;
4. GAE over the critic's values, advantages whitened over the global batch; or, critic-free, each
   sample's score against the other samples of its prompt (RLOO, GRPO: ``advantage_estimator``);
5. ``ppo_epochs`` passes over shuffled minibatches of the clipped policy loss (and value loss).

The algorithm itself lives in ``rlhf_lightning.rl`` as pure tensor functions; this module wires
them to the four models, with one file per part of the stage: ``ppo_models`` (building and checking
the models and options), ``ppo_rollout`` (steps 1-4), ``ppo_update`` (step 5), ``ppo_iteration`` (the
iteration's arithmetic, random stream, non-finite guard, bookkeeping and checkpointed state) and
``ppo_logging`` (TensorBoard, held-out preference accuracy). ``docs/ppo.md`` lists the published
implementation details we follow.
It deliberately leaves out reward-model ensembles, PPO-ptx (pretraining loss mixing) and
multi-turn rollouts.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rlhf_lightning.lm import (
    head_logits,
    hidden_states,
    hidden_states_from_trunk,
    logprobs_from_logits,
    response_logits,
    suppressed_token,
)
from rlhf_lightning.models import (
    LoraOptions,
    freeze,
    load_causal_lm,
    load_tokenizer,
    prepare_for_training,
    reference_policy,
    save_hf,
)
from rlhf_lightning.modules.base import (
    HoldsFrozenModels,
    adamw,
    all_ranks,
    drop_frozen,
    refill_frozen,
    sum_over_ranks,
)
from rlhf_lightning.modules.ppo_iteration import (
    NonFiniteCounter,
    NonFiniteError,
    check_fit,
    finish_iteration,
    fit_iterations,
    guard_nonfinite,
    iteration_state,
    load_iteration_state,
    rollout_rng,
)
from rlhf_lightning.modules.ppo_logging import preference_accuracies
from rlhf_lightning.modules.ppo_models import (
    check_options,
    check_vocabularies,
    critic_and_value_head,
    reward_source,
    shared_trunk_blocks,
)
from rlhf_lightning.modules.ppo_rollout import (
    collect,
    function_scores,
    gae_advantages,
    group_advantages,
    model_scores,
    shift_value_bias,
    weights_cast_once,
)
from rlhf_lightning.modules.ppo_update import ppo_update
from rlhf_lightning.rewards import RewardFunction
from rlhf_lightning.rl.experience import Experience
from rlhf_lightning.rl.kl import kl_controller
from rlhf_lightning.schedules import deferred_schedule

__all__ = ["NonFiniteError", "PPOModule"]

FROZEN_PREFIXES = ("reference.", "reward_model.")  # state-dict keys of the frozen models: never checkpointed


class PPOModule(HoldsFrozenModels, LightningModule):
    """PPO for language models, one rollout + optimization per ``training_step``.

    Args:
        policy: The model to optimise, initialised from the SFT export (any causal LM name works).
        reward_model: The frozen reward model: the reward stage's export.
        reward_function: Score responses with this Python object (a
            :class:`~rlhf_lightning.rewards.RewardFunction`, by ``class_path``) instead of the reward model,
            which is then not loaded; the critic still starts from ``critic``, else from ``reward_model``.
        reference: The frozen KL anchor. ``None``: the policy's starting weights (the disabled LoRA
            adapter when ``lora`` is set, else a frozen copy).
        critic: Initial value model. ``None``: the reward model (Huang et al. 2024).
        share_critic_backbone: Put the value head on the policy's backbone instead of a separate
            critic model (one model fewer in memory; the value loss then also moves the policy).
        advantage_estimator: ``gae`` (a critic and GAE, as PPO), or critic-free: ``rloo`` (each sample's
            baseline is the mean score of the other samples of its prompt; Ahmadian et al. 2024) or
            ``grpo`` (scores standardised within the prompt's group; Shao et al. 2024). Critic-free, no
            critic or value head is built, loaded, checkpointed or logged, and the sequence's score
            (minus its KL penalty when ``kl_penalty`` is ``reward``) is the advantage of each of its tokens.
        samples_per_prompt: Responses sampled for each prompt in a rollout (K): the rollout holds
            ``data.batch_size x K`` episodes, the K samples of a prompt on one device. ``rloo`` and
            ``grpo`` need K >= 2.
        scale_advantages: ``grpo`` only: divide by the group's standard deviation (``False``: Dr. GRPO,
            Liu et al. 2025, centred scores only).
        kl_penalty: Where the KL to the reference enters: ``reward`` (``-beta * KL_t`` per token with
            ``kl_estimator``, as PPO; Ziegler et al. 2019) or ``loss`` (``beta`` times the mean ``k3`` KL of
            the response tokens added to the policy loss, as GRPO).
        max_new_tokens: Longest response in tokens.
        temperature: Sampling temperature; log-probs for the PPO ratio use the same temperature.
        normalize_reward: Standardise scores with the mean/std stored by the reward stage.
        missing_eos_penalty: Subtracted from the score of responses that never emit EOS (``None``: off).
        calibrate_value_bias: On the first rollout, shift the value head's bias so the critic's mean
            error on it is zero (the copied reward head knows neither the EOS penalty nor the KL term).
        kl_coef: Initial KL coefficient beta.
        kl_estimator: Per-token KL estimator in the reward: ``k1`` (log-ratio) or ``k3`` (non-negative).
        adaptive_kl_target: Adapt beta toward this KL per response (Ziegler et al. 2019; TRL's legacy
            ``target``, not its early-stopping ``target_kl``); ``None``: fixed beta.
        adaptive_kl_horizon: Horizon (in episodes) of the adaptive controller.
        gamma: Discount factor of GAE.
        lam: GAE lambda.
        whiten_rewards: Whiten the per-token rewards before GAE (mean kept); no effect with ``rloo``/``grpo``.
        ppo_epochs: Passes over each rollout batch.
        minibatch_size: Episodes per optimizer step on each device (the step averages gradients over
            devices); must divide the rollout batch ``data.batch_size``.
        clip_range: Policy ratio clip epsilon.
        clip_range_value: Value clip epsilon.
        vf_coef: Weight of the value loss.
        learning_rate: Policy learning rate (AdamW).
        critic_learning_rate: Critic / value head learning rate (``None``: same as the policy).
        adam_eps: AdamW epsilon (1e-5, as in the original PPO implementations).
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient norm clip (``None``: off).
        lr_scheduler: Learning-rate schedule over the PPO iterations.
        lora: Train LoRA adapters on the policy instead of every weight (``None``: full fine-tuning).
        train_top_layers: Train only the policy's top this many transformer blocks (and its final norm
            and the value head); embeddings and lower blocks stay frozen (``None``: every weight).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        max_nonfinite_rollouts: Consecutive iterations with NaN/inf that stop the run (each one is skipped).
        rollout_seed: Seed of the rollout sampling and minibatch order (offset by rank and iteration, so a
            resumed run continues the same streams).
        export_dir: Where the policy is exported in Hugging Face format at the end of ``fit``.
        trust_remote_code: Allow hub models to run their own code (off: only for repos you trust).
    """

    def __init__(
        self,
        policy: str = "runs/sft/export",
        reward_model: str = "runs/reward/export",
        reward_function: RewardFunction | None = None,
        reference: str | None = None,
        critic: str | None = None,
        share_critic_backbone: bool = False,
        advantage_estimator: Literal["gae", "rloo", "grpo"] = "gae",
        samples_per_prompt: int = 1,
        scale_advantages: bool = True,
        kl_penalty: Literal["reward", "loss"] = "reward",
        max_new_tokens: int = 32,
        temperature: float = 0.7,
        normalize_reward: bool = True,
        missing_eos_penalty: float | None = None,
        calibrate_value_bias: bool = True,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        adaptive_kl_target: float | None = None,
        adaptive_kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_rewards: bool = False,
        ppo_epochs: int = 4,
        minibatch_size: int = 4,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        learning_rate: float = 3e-6,
        critic_learning_rate: float | None = None,
        adam_eps: float = 1e-5,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        lr_scheduler: Literal["linear", "constant"] = "linear",
        lora: LoraOptions | None = None,
        train_top_layers: int | None = None,
        gradient_checkpointing: bool = False,
        max_nonfinite_rollouts: int = 3,
        rollout_seed: int = 0,
        export_dir: str | None = "runs/ppo/export",
        trust_remote_code: bool = False,
    ):
        super().__init__()
        lora = check_options(
            advantage_estimator, samples_per_prompt, critic, share_critic_backbone, temperature, lora
        )
        # the reward function is an object (its class_path is in the run's config.yaml): checkpoints
        # hold plain values only, so they load with weights_only
        self.save_hyperparameters(ignore=["lora", "reward_function"])
        self.hparams["lora"] = asdict(lora) if lora else None
        self.automatic_optimization = False

        self.tokenizer = load_tokenizer(policy, trust_remote_code)
        self.policy = prepare_for_training(
            load_causal_lm(policy, trust_remote_code),
            "CAUSAL_LM",
            lora,
            train_top_layers,
            gradient_checkpointing,
        )
        self.reference = None
        if reference is not None or lora is None:
            self.reference = freeze(load_causal_lm(reference or policy, trust_remote_code))
        self.shared_blocks = shared_trunk_blocks(self.policy, reference, lora, train_top_layers)
        pad = self.tokenizer.pad_token_id
        self.reward_function = reward_function
        self.reward_model, self.reward_stats = reward_source(
            reward_model, reward_function, normalize_reward, pad, trust_remote_code
        )
        self.critic = self.value_head = None  # critic-free: the other samples of a prompt are the baseline
        if advantage_estimator == "gae":
            self.critic, self.value_head = critic_and_value_head(
                self.policy,
                self.reward_model,
                reward_model,
                critic,
                share_critic_backbone,
                self.reward_stats,
                pad,
                trust_remote_code,
                gradient_checkpointing,
            )
        check_vocabularies(
            policy=self.policy, reward_model=self.reward_model, critic=self.critic, reference=self.reference
        )
        self.suppressed = suppressed_token(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        self.kl_controller = kl_controller(kl_coef, adaptive_kl_target, adaptive_kl_horizon)
        self.rollouts = 0  # PPO iterations done; global_step counts optimizer steps instead
        self.episodes = 0
        self.nonfinite = NonFiniteCounter(max_nonfinite_rollouts)
        self.last_rollout: Experience | None = None
        self.val_accuracy = nn.ModuleDict({"reward_model": MeanMetric(), "policy": MeanMetric()})
        self.train()

    def frozen_models(self) -> list[nn.Module]:
        return [self.reference, self.reward_model]

    def reference_model(self):
        """The reference policy (a context): a frozen model, or the policy with its LoRA adapter disabled."""
        return reference_policy(self.reference, self.policy)

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.cast_frozen_models()
        if stage == "fit":
            check_fit(self.trainer, self.hparams)

    def configure_optimizers(self):
        h = self.hparams
        groups = [(list(self.policy.parameters()), h.learning_rate)]
        if self.value_head is not None:
            critic_params = [
                *self.value_head.parameters(),
                *(self.critic.parameters() if self.critic is not None else []),
            ]
            groups.append((critic_params, h.critic_learning_rate or h.learning_rate))
        optimizer = adamw(groups, h.weight_decay, h.adam_eps)
        # stepped by training_step once per PPO iteration (manual optimization)
        scheduler = deferred_schedule(optimizer, lambda: fit_iterations(self.trainer, h), 0.0, h.lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_frozen(checkpoint, FROZEN_PREFIXES)
        checkpoint["ppo_state"] = iteration_state(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_iteration_state(self, checkpoint.get("ppo_state", {}))
        refill_frozen(self, checkpoint, FROZEN_PREFIXES)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            path = save_hf(self.policy, self.tokenizer, self.hparams.export_dir)
            rank_zero_info(f"exported the PPO policy in Hugging Face format to {path}")

    # -- the algorithm ---------------------------------------------------------------------------
    def policy_and_values(
        self, input_ids: Tensor, attention_mask: Tensor, start: int
    ) -> tuple[Tensor, Tensor]:
        """Policy logits and critic values for the tokens from ``start`` on."""
        if self.critic is None:  # one backbone for both heads
            hidden = hidden_states(self.policy, input_ids, attention_mask)[:, start - 1 : -1]
            return head_logits(self.policy, hidden, fp32=True), self.value_head(hidden).squeeze(-1)
        logits = response_logits(self.policy, input_ids, attention_mask, start, fp32_head=True)
        return logits, self.critic_values(input_ids, attention_mask, start)

    def policy_logits(self, experience: Experience) -> Tensor:
        """The policy's fp32 logits for the response tokens of ``experience`` (a minibatch); only the upper
        blocks run when the rollout kept the trunk of the frozen lower ones."""
        e = experience
        if e.trunk is None:
            return response_logits(self.policy, e.input_ids, e.attention_mask, e.start, fp32_head=True)
        hidden = hidden_states_from_trunk(self.policy, e.trunk, e.attention_mask, self.shared_blocks)
        return head_logits(self.policy, hidden[:, e.start - 1 : -1], fp32=True)

    def critic_values(self, input_ids: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """The separate critic's values for the tokens from ``start`` on."""
        hidden = hidden_states(self.critic, input_ids, attention_mask)[:, start - 1 : -1]
        return self.value_head(hidden).squeeze(-1)

    def logprobs(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Log-probabilities under the distribution rollouts sample from (temperature, pad suppressed)."""
        return logprobs_from_logits(logits, tokens, self.hparams.temperature, self.suppressed)

    def score(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        responses: Tensor,
        response_mask: Tensor,
        prompt_texts: list[str] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Raw and final (normalised, EOS-penalised) scores of each episode: from the reward model, or
        from the reward function on the decoded texts. Override it to shape rewards your own way."""
        penalty = self.hparams.missing_eos_penalty
        if self.reward_function is not None:
            return function_scores(
                self.reward_function, self.tokenizer, responses, response_mask, prompt_texts, penalty
            )
        finished = (responses == self.tokenizer.eos_token_id).any(-1)
        return model_scores(
            self.reward_model, input_ids, attention_mask, finished, self.reward_stats, penalty
        )

    @torch.no_grad()
    def rollout(self, batch: dict) -> Experience:
        """Sample responses to ``batch``, score them and estimate their advantages (no gradients)."""
        h = self.hparams
        with weights_cast_once(self.device.type):
            experience, values = collect(self, batch)
        if values is None:
            return group_advantages(
                experience, h.advantage_estimator, h.samples_per_prompt, h.scale_advantages
            )
        calibrate = None
        if self.rollouts == 0 and h.calibrate_value_bias:
            calibrate = partial(shift_value_bias, self.value_head)
        return gae_advantages(
            experience, values, h.gamma, h.lam, h.whiten_rewards, partial(sum_over_ranks, self), calibrate
        )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rng, seed = rollout_rng(self)
        with rng:
            torch.manual_seed(seed)
            began = time.perf_counter()
            experience = self.rollout(batch)
            rollout_time = time.perf_counter() - began
            if not guard_nonfinite(self, all_ranks(self, experience.is_finite()), "rollout"):
                finish_iteration(self, experience, {}, rollout_time, 0.0, skipped=True)
                return
            began = time.perf_counter()
            stats = self.optimize(experience)
            optimize_time = time.perf_counter() - began
        finish_iteration(self, experience, stats, rollout_time, optimize_time)

    def optimize(self, experience: Experience) -> dict[str, Tensor]:
        """``ppo_epochs`` x minibatches of the clipped losses on one rollout; returns averaged statistics."""
        return ppo_update(self, experience)

    # -- validation: preference accuracy on held-out pairs ---------------------------------------

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out preference accuracy of the policy's implicit reward and of the reward model."""
        for name, accuracy in preference_accuracies(self, batch).items():
            self.val_accuracy[name].update(accuracy)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_accuracy.items():
            if metric.update_count:
                self.log(f"eval/{name}_preference_accuracy", metric.compute(), sync_dist=True)
            metric.reset()
