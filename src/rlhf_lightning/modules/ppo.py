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
them to the four models. ``docs/ppo.md`` lists the published implementation details we follow.
It deliberately leaves out reward-model ensembles, PPO-ptx (pretraining loss mixing) and
multi-turn rollouts.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.lm import (
    completion_logprob,
    head_logits,
    hidden_states,
    hidden_states_from_trunk,
    logprobs_from_logits,
    response_logits,
    sequence_scores,
    suppressed_token,
    trunk_is_reusable,
)
from rlhf_lightning.models import (
    LoraOptions,
    decoder_layers,
    freeze,
    load_causal_lm,
    load_tokenizer,
    prepare_for_training,
    reference_policy,
    save_hf,
)
from rlhf_lightning.modules.base import HoldsFrozenModels, adamw, drop_frozen, refill_frozen
from rlhf_lightning.modules.ppo_logging import log_iteration
from rlhf_lightning.modules.ppo_models import (
    check_estimator,
    check_vocabularies,
    critic_and_value_head,
    describe_iteration,
    iterations_in_fit,
    reward_source,
)
from rlhf_lightning.modules.ppo_rollout import (
    collect,
    function_scores,
    gae_advantages,
    group_advantages,
    model_scores,
    weights_cast_once,
)
from rlhf_lightning.modules.ppo_update import NonFiniteCounter, ppo_update
from rlhf_lightning.rewards import RewardFunction
from rlhf_lightning.rl.experience import Experience
from rlhf_lightning.rl.kl import AdaptiveKLController, FixedKLController
from rlhf_lightning.rl.ranking import pair_accuracy
from rlhf_lightning.schedules import deferred_schedule

FROZEN_PREFIXES = ("reference.", "reward_model.")  # state-dict keys of the frozen models: never checkpointed


class NonFiniteError(RuntimeError):
    """Too many consecutive PPO iterations produced NaN/inf; the last good state was checkpointed."""


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
        if temperature <= 0:
            raise ConfigurationError(
                f"model.temperature must be > 0 (PPO needs sampled responses), got {temperature}"
            )
        check_estimator(advantage_estimator, samples_per_prompt, critic, share_critic_backbone)
        lora = LoraOptions.of(lora)
        if lora is not None and lora.dropout > 0:
            raise ConfigurationError(
                "model.lora.dropout must be 0 for PPO: log-probs must not depend on dropout"
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
        self.shared_blocks = self._shared_blocks(reference, lora, train_top_layers)
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
        if adaptive_kl_target is None:
            self.kl_controller = FixedKLController(kl_coef)
        else:
            self.kl_controller = AdaptiveKLController(kl_coef, adaptive_kl_target, adaptive_kl_horizon)
        self.rollouts = 0  # PPO iterations done; global_step counts optimizer steps instead
        self.episodes = 0
        self.nonfinite = NonFiniteCounter(max_nonfinite_rollouts)
        self.last_rollout: Experience | None = None
        self.val_accuracy = nn.ModuleDict({"reward_model": MeanMetric(), "policy": MeanMetric()})
        self.train()

    def _shared_blocks(self, reference: str | None, lora, top_layers: int | None) -> int | None:
        """How many lower blocks the policy and the reference share: the policy's frozen ones, when the
        reference is the policy's own starting point (``None``: nothing shared, each runs whole).

        Their output (the trunk) is computed once per rollout, for the policy, the reference and every
        minibatch step of the update, which then run only the upper blocks."""
        if reference is not None or lora is not None or top_layers is None:
            return None
        blocks = len(decoder_layers(self.policy)) - top_layers
        if blocks < 1 or not trunk_is_reusable(self.policy, blocks):
            return None
        return blocks

    def frozen_models(self) -> list[nn.Module]:
        return [self.reference, self.reward_model]

    def reference_model(self):
        """The reference policy (a context): a frozen model, or the policy with its LoRA adapter disabled."""
        return reference_policy(self.reference, self.policy)

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.cast_frozen_models()
        precision = str(self.trainer.precision)
        if stage != "fit":
            return
        if precision.startswith("16"):
            raise ConfigurationError(
                f"trainer.precision={precision} is not supported by PPO (its loss scaling would interact with "
                "the non-finite checks and gradient clipping); use bf16-mixed or 32-true"
            )
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is not None:
            h = self.hparams
            rank_zero_info(
                describe_iteration(
                    h.advantage_estimator,
                    batch_size,
                    h.samples_per_prompt,
                    h.minibatch_size,
                    h.ppo_epochs,
                    self.trainer.world_size,
                )
            )

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
        scheduler = deferred_schedule(optimizer, self.total_iterations, 0.0, h.lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def total_iterations(self) -> int:
        """PPO iterations in this fit: batches x epochs, fewer if ``trainer.max_steps`` (optimizer steps) ends it."""
        t, h = self.trainer, self.hparams
        episodes = t.datamodule.batch_size * h.samples_per_prompt if t.max_steps not in (None, -1) else 0
        return iterations_in_fit(
            t.max_epochs, t.num_training_batches, t.max_steps, episodes, h.ppo_epochs, h.minibatch_size
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_frozen(checkpoint, FROZEN_PREFIXES)
        checkpoint["ppo_state"] = {
            "rollouts": self.rollouts,
            "episodes": self.episodes,
            **self.nonfinite.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo_state", {})
        self.rollouts = state.get("rollouts", 0)
        self.episodes = state.get("episodes", 0)
        self.nonfinite.load_state_dict(state)
        refill_frozen(self, checkpoint, FROZEN_PREFIXES)
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])

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

    @property
    def _one_process(self) -> bool:
        """No other rank to agree with: no trainer attached, or a world of one."""
        return self._trainer is None or self.trainer.world_size == 1

    def _all_ranks(self, ok: bool) -> bool:
        """``ok`` on every rank: a rank that skips a backward pass others run would hang the gradient sync."""
        if self._one_process:
            return ok
        return bool(self.trainer.strategy.reduce_boolean_decision(ok, all=True))

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        if self._one_process:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def _rng_context(self):
        """Sampling and shuffling draw from a stream fixed by (seed, rank, iteration): resumable and per-rank."""
        rank = self.global_rank if self._trainer is not None else 0
        devices = [self.device] if self.device.type == "cuda" else []
        context = torch.random.fork_rng(devices=devices)
        seed = self.hparams.rollout_seed * 1_000_003 + rank * 7_919 + self.rollouts
        return context, seed

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
            calibrate = self._shift_value_bias
        return gae_advantages(
            experience, values, h.gamma, h.lam, h.whiten_rewards, self._all_reduce, calibrate
        )

    def _shift_value_bias(self, shift: Tensor) -> None:
        """Move the value head's bias by the critic's mean error on the first rollout.

        The head copied from the reward model predicts the normalised score, but not the missing-EOS
        penalty or the KL term: without this, most tokens start with the same error (about -0.9 when 90%
        of responses miss EOS), which value clipping undoes by at most ``clip_range_value`` per iteration.
        """
        with torch.no_grad():
            self.value_head.bias.add_(shift.to(self.value_head.bias.dtype))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rng, seed = self._rng_context()
        with rng:
            torch.manual_seed(seed)
            began = time.perf_counter()
            experience = self.rollout(batch)
            rollout_time = time.perf_counter() - began
            if not self._guard_nonfinite(self._all_ranks(experience.is_finite()), "rollout"):
                self._finish_iteration(experience, {}, rollout_time, 0.0, skipped=True)
                return
            began = time.perf_counter()
            stats = self.optimize(experience)
            optimize_time = time.perf_counter() - began
        self._finish_iteration(experience, stats, rollout_time, optimize_time)

    def optimize(self, experience: Experience) -> dict[str, Tensor]:
        """``ppo_epochs`` x minibatches of the clipped losses on one rollout; returns averaged statistics."""
        return ppo_update(self, experience)

    def _guard_nonfinite(self, finite: bool, what: str) -> bool:
        """Count a non-finite rollout; stop the run (with a checkpoint) after too many in a row."""
        if self.nonfinite.rollout(finite):
            return finite
        path = Path(self.trainer.default_root_dir) / "nonfinite-last-good.ckpt"
        self.trainer.save_checkpoint(path)
        raise NonFiniteError(
            f"{self.nonfinite.consecutive} consecutive PPO iterations produced NaN/inf in the {what} "
            f"(iteration {self.rollouts}); the last good state is saved to {path}. Lower the learning rate, "
            "check the reward model's outputs, or raise model.max_nonfinite_rollouts."
        )

    def _finish_iteration(
        self, experience: Experience, stats: dict, rollout_time: float, optimize_time: float, skipped=False
    ):
        n = len(experience)
        self.rollouts += 1
        self.episodes += n * self.trainer.world_size
        if not skipped:
            # every rank steers beta with the KL of the global batch, so all ranks shape rewards alike
            count = torch.tensor(float(n), device=self.device)
            totals = self._all_reduce(torch.stack([experience.kl.sum().float(), count]))
            self.kl_controller.update(float(totals[0] / totals[1]), int(totals[1]))
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        log_iteration(self, experience, stats, rollout_time, optimize_time)
        self.last_rollout = experience  # for the sample-table and gold-judge callbacks

    # -- validation: preference accuracy on held-out pairs ---------------------------------------

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Preference accuracy of the reward model and of the policy's implicit reward on held-out pairs.

        The policy's implicit reward is ``log pi(y|x) - log pi_ref(y|x)`` (Rafailov et al. 2023): it tells
        whether PPO moved the policy toward the responses people prefer.
        """
        ids, mask, pairs = batch["input_ids"], batch["attention_mask"], batch["pairs"]
        implicit = completion_logprob(self.policy, batch)
        with self.reference_model() as reference:
            implicit = implicit - completion_logprob(reference, batch)
        self.val_accuracy["policy"].update(pair_accuracy(implicit, pairs))
        if self.reward_model is not None:
            rewards = sequence_scores(self.reward_model, ids, mask).float()
            self.val_accuracy["reward_model"].update(pair_accuracy(rewards, pairs))

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_accuracy.items():
            if metric.update_count:
                self.log(f"eval/{name}_preference_accuracy", metric.compute(), sync_dist=True)
            metric.reset()
