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

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rlhf_lightning.data.render import decode_response
from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.lm import (
    entropy_from_logits,
    head_logits,
    head_logprobs,
    hidden_states,
    last_token_index,
    logprobs_from_logits,
    response_logits,
    response_logprobs,
    sample,
    sequence_scores,
    suppressed_token,
)
from rlhf_lightning.models import (
    LoraOptions,
    backbone,
    linear_weights_to,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    prepare_for_training,
    save_hf,
    score_head,
)
from rlhf_lightning.modules.base import adamw
from rlhf_lightning.modules.reward import STATS_FILE
from rlhf_lightning.rewards import RewardFunction
from rlhf_lightning.rl.gae import gae
from rlhf_lightning.rl.group_advantages import grpo_advantages, rloo_advantages
from rlhf_lightning.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_lightning.rl.losses import kl_loss, masked_mean, policy_loss, value_loss
from rlhf_lightning.rl.ranking import pair_accuracy
from rlhf_lightning.rl.whiten import whiten
from rlhf_lightning.schedules import deferred_schedule

FROZEN_PREFIXES = ("reference.", "reward_model.")  # state-dict keys of the frozen models: never checkpointed


class NonFiniteError(RuntimeError):
    """Too many consecutive PPO iterations produced NaN/inf; the last good state was checkpointed."""


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


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


def _check_estimator(estimator: str, k: int, critic: str | None, share_critic_backbone: bool) -> None:
    if k < 1:
        raise ConfigurationError(f"model.samples_per_prompt must be >= 1, got {k}")
    if estimator == "gae":
        return
    if k < 2:
        raise ConfigurationError(
            f"model.advantage_estimator={estimator} compares the samples of each prompt: set "
            f"model.samples_per_prompt to 2 or more (got {k})"
        )
    if critic is not None or share_critic_backbone:
        raise ConfigurationError(
            f"model.advantage_estimator={estimator} has no critic: unset model.critic and "
            "model.share_critic_backbone (they apply to gae)"
        )


def repeat_prompts(batch: dict, k: int) -> dict:
    """Each prompt of a batch ``k`` times in a row (the samples of a prompt stay together)."""
    if k == 1:
        return batch
    out = {key: value.repeat_interleave(k, 0) for key, value in batch.items() if isinstance(value, Tensor)}
    if batch.get("prompt_texts") is not None:
        out["prompt_texts"] = [text for text in batch["prompt_texts"] for _ in range(k)]
    return out


class PPOModule(LightningModule):
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
        _check_estimator(advantage_estimator, samples_per_prompt, critic, share_critic_backbone)
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
            self.reference = _freeze(load_causal_lm(reference or policy, trust_remote_code))
        pad = self.tokenizer.pad_token_id
        if reward_function is not None and not callable(reward_function):
            raise ConfigurationError(
                f"model.reward_function must score texts (a RewardFunction), got {type(reward_function).__name__}"
            )
        self.reward_function = reward_function
        self.reward_model = None
        if reward_function is None:
            self.reward_model = _freeze(load_reward_model(reward_model, trust_remote_code, pad_token_id=pad))
        self.reward_stats = read_reward_stats(reward_model) if normalize_reward else None
        if normalize_reward and self.reward_stats is None and reward_function is None:
            rank_zero_warn(
                f"model.normalize_reward is on but {reward_model} has no {STATS_FILE}: scores are used raw"
            )
        # The critic is a backbone plus a value head with a bias. Both start from the critic model (by
        # default the reward model); with reward normalisation on, the head is rescaled so the initial
        # values are on the scale of the normalised returns they are trained toward.
        self.critic = self.value_head = None
        if advantage_estimator != "gae":
            pass  # critic-free: the other samples of a prompt are the baseline
        elif share_critic_backbone:
            if critic is not None:
                raise ConfigurationError(
                    "model.critic must be null with share_critic_backbone: the policy is the critic"
                )
            self.critic = None
            source_head = score_head(
                self.reward_model or load_reward_model(reward_model, trust_remote_code, pad_token_id=pad)
            )
        else:
            critic_model = load_reward_model(critic or reward_model, trust_remote_code, pad_token_id=pad)
            if gradient_checkpointing:
                critic_model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            self.critic = backbone(critic_model)
            source_head = score_head(critic_model)
        if advantage_estimator == "gae":
            stats = self.reward_stats if critic is None else None
            self.value_head = value_head(
                source_head, self.policy.config.hidden_size if self.critic is None else None, stats
            )
        self._check_vocabularies()
        self.suppressed = suppressed_token(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        if adaptive_kl_target is None:
            self.kl_controller = FixedKLController(kl_coef)
        else:
            self.kl_controller = AdaptiveKLController(kl_coef, adaptive_kl_target, adaptive_kl_horizon)
        self.rollouts = 0  # PPO iterations done; global_step counts optimizer steps instead
        self.episodes = 0
        self.nonfinite_rollouts = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.last_rollout: dict | None = None  # for the sample-table callback
        self.val_accuracy = nn.ModuleDict({"reward_model": MeanMetric(), "policy": MeanMetric()})
        self.train()

    def train(self, mode: bool = True) -> PPOModule:
        """Frozen models stay in eval mode whatever the trainer asks."""
        super().train(mode)
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.eval()
        return self

    # -- construction helpers --------------------------------------------------------------------
    def _check_vocabularies(self) -> None:
        sizes = {"policy": self.policy.get_input_embeddings().num_embeddings}
        for role, model in (
            ("reward model", self.reward_model),
            ("critic", self.critic),
            ("reference", self.reference),
        ):
            if model is not None:
                sizes[role] = model.get_input_embeddings().num_embeddings
        if len(set(sizes.values())) > 1:
            raise ConfigurationError(
                f"PPO needs one tokenizer for all models; vocabulary sizes differ: {sizes}"
            )

    @contextmanager
    def _reference_model(self):
        """The reference policy: a frozen model, or the policy with its LoRA adapter disabled."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        # Under bf16 autocast every frozen matmul is bf16 anyway; any other precision needs fp32 weights.
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                linear_weights_to(frozen, dtype)
        if stage != "fit":
            return
        if precision.startswith("16"):
            raise ConfigurationError(
                f"trainer.precision={precision} is not supported by PPO (its loss scaling would interact with "
                "the non-finite checks and gradient clipping); use bf16-mixed or 32-true"
            )
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is None:
            return
        mb, world, k = self.hparams.minibatch_size, self.trainer.world_size, self.hparams.samples_per_prompt
        episodes = batch_size * k
        if mb < 1 or episodes % mb:
            raise ConfigurationError(
                f"each PPO iteration samples data.batch_size={batch_size} prompts x model.samples_per_prompt={k} "
                f"= {episodes} responses per device and splits them into minibatches of "
                f"model.minibatch_size={mb}; {episodes} is not a multiple of {mb}. Pick a minibatch size that "
                f"divides {episodes}."
            )
        steps = self.hparams.ppo_epochs * episodes // mb
        rank_zero_info(
            f"PPO iteration ({self.hparams.advantage_estimator}): {batch_size} prompts x {k} samples/device x "
            f"{world} device(s) = {episodes * world} episodes; {self.hparams.ppo_epochs} epochs x "
            f"{episodes // mb} minibatches of {mb} = {steps} optimizer steps"
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
        trainer = self.trainer
        total = math.inf
        if trainer.max_epochs not in (None, -1):
            total = trainer.num_training_batches * trainer.max_epochs
        if trainer.max_steps not in (None, -1):
            batch = trainer.datamodule.batch_size * self.hparams.samples_per_prompt
            per_iteration = self.hparams.ppo_epochs * math.ceil(batch / self.hparams.minibatch_size)
            total = min(total, math.ceil(trainer.max_steps / per_iteration))
        if math.isinf(total):
            raise ConfigurationError(
                "PPO needs a bounded run for its learning-rate schedule: set trainer.max_epochs "
                "(with trainer.limit_train_batches for the iterations per epoch) or trainer.max_steps"
            )
        return int(total)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(FROZEN_PREFIXES)
        }
        checkpoint["ppo_state"] = {
            "rollouts": self.rollouts,
            "episodes": self.episodes,
            "nonfinite_rollouts": self.nonfinite_rollouts,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "kl_controller": self.kl_controller.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo_state", {})
        self.rollouts = state.get("rollouts", 0)
        self.episodes = state.get("episodes", 0)
        self.nonfinite_rollouts = state.get("nonfinite_rollouts", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.consecutive_nonfinite = state.get("consecutive_nonfinite", 0)
        # frozen models are not in checkpoints (they are loaded from their names): fill them in so the
        # rest of the state dict still loads strictly
        checkpoint["state_dict"].update(
            {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
        )
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
        from the reward function on the decoded texts."""
        if self.reward_function is not None:
            return self._function_scores(responses, response_mask, prompt_texts)
        raw = sequence_scores(self.reward_model, input_ids, attention_mask).float()
        scores = raw
        if self.reward_stats is not None:
            scores = (scores - self.reward_stats["mean"]) / self.reward_stats["std"]
        if self.hparams.missing_eos_penalty is not None:
            has_eos = (responses == self.tokenizer.eos_token_id).any(-1)
            scores = scores - self.hparams.missing_eos_penalty * (~has_eos).float()
        return raw, scores

    def _function_scores(
        self, responses: Tensor, response_mask: Tensor, prompt_texts: list[str] | None
    ) -> tuple[Tensor, Tensor]:
        if prompt_texts is None:
            raise ConfigurationError(
                "model.reward_function needs the prompts' texts: use a DataModule whose batches carry "
                "'prompt_texts' (PromptDataModule does)"
            )
        decoded = [decode_response(self.tokenizer, r, m) for r, m in zip(responses, response_mask)]
        texts, finished = [d[0] for d in decoded], [d[1] for d in decoded]
        raw = torch.tensor(self.reward_function(list(prompt_texts), texts, finished), dtype=torch.float)
        if raw.shape != (len(texts),):
            raise ConfigurationError(
                f"model.reward_function returned {tuple(raw.shape)} scores for {len(texts)} responses"
            )
        raw = raw.to(responses.device)
        scores = raw
        if self.hparams.missing_eos_penalty is not None:
            scores = (
                scores
                - self.hparams.missing_eos_penalty * (~torch.tensor(finished, device=raw.device)).float()
            )
        return raw, scores

    @contextmanager
    def _weights_cast_once(self):
        """Under mixed precision, cast each trainable weight once for a region where weights do not change.

        Lightning's autocast runs without autocast's weight cache (weights change between optimizer steps
        inside one ``training_step``), so every forward would cast every weight again: 33 times per
        rollout of 32 tokens. The rollout changes no weight, so the cache is exact there; it is dropped
        on the way out.
        """
        device = self.device.type
        if not torch.is_autocast_enabled(device) or torch.is_autocast_cache_enabled():
            yield
            return
        try:
            with torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=True):
                yield
        finally:
            torch.clear_autocast_cache()

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Sample responses and compute everything PPO needs about them (no gradients)."""
        with self._weights_cast_once():
            return self._rollout(batch)

    def _rollout(self, batch: dict) -> dict:
        h = self.hparams
        batch = repeat_prompts(batch, h.samples_per_prompt)
        prompts, prompt_mask = batch["input_ids"], batch["attention_mask"]
        start = prompts.shape[1]
        responses, response_mask = sample(
            self.policy,
            prompts,
            prompt_mask,
            max_new_tokens=h.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=h.temperature,
        )
        width = int(response_mask.sum(-1).max())
        responses, response_mask = responses[:, :width], response_mask[:, :width]
        input_ids = torch.cat([prompts, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)

        # the LM heads run over row groups (no gradients here): the batch's logits never exist at once
        hidden = hidden_states(self.policy, input_ids, attention_mask)[:, start - 1 : -1]
        values = None
        if self.critic is not None:
            values = self.critic_values(input_ids, attention_mask, start)
        elif self.value_head is not None:  # the critic shares the policy's backbone
            values = self.value_head(hidden).squeeze(-1)
        logprobs, entropy = head_logprobs(
            self.policy, hidden, responses, h.temperature, self.suppressed, fp32_head=True, with_entropy=True
        )
        del hidden
        with self._reference_model() as reference:
            ref_logprobs = response_logprobs(
                reference, input_ids, attention_mask, start, h.temperature, self.suppressed, fp32_head=True
            )
        raw_scores, scores = self.score(
            input_ids, attention_mask, responses, response_mask, batch.get("prompt_texts")
        )

        mask = response_mask
        kl = kl_estimate(logprobs, ref_logprobs, h.kl_estimator) * mask
        penalised = h.kl_penalty == "reward"
        non_score_reward = -self.kl_controller.value * kl if penalised else torch.zeros_like(kl)
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "start": start,
            "responses": responses,
            "mask": mask,
            "logprobs": logprobs * mask,
            "raw_scores": raw_scores,
            "scores": scores,
            "kl": kl,
            "entropy": entropy * mask,
            "non_score_reward": non_score_reward,
            "prompt_texts": batch.get("prompt_texts"),
        }
        if not penalised:
            data["ref_logprobs"] = ref_logprobs * mask
        if values is None:
            data.update(self._group_advantages(scores, non_score_reward, mask))
        else:
            data.update(self._gae_advantages(scores, non_score_reward, values, mask))
        return data

    def _gae_advantages(self, scores: Tensor, non_score_reward: Tensor, values: Tensor, mask: Tensor) -> dict:
        """PPO: the score at the last token plus the per-token KL penalty, GAE over the critic's values,
        advantages whitened over the global batch."""
        h = self.hparams
        rewards = non_score_reward.clone()
        last = last_token_index(mask)
        rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
        if h.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, all_reduce=self._all_reduce)
        values = values.float() * mask
        if self.rollouts == 0 and h.calibrate_value_bias:
            values = (values + self._calibrate_value_bias(rewards, values, mask)) * mask
        advantages, returns = gae(rewards, values, mask, h.gamma, h.lam)
        advantages = whiten(advantages, mask, all_reduce=self._all_reduce)
        return {"values": values, "advantages": advantages, "returns": returns}

    def _group_advantages(self, scores: Tensor, non_score_reward: Tensor, mask: Tensor) -> dict:
        """Critic-free: each episode's return (its score plus its KL penalty) against the other samples
        of its prompt, given to every token of the response."""
        h = self.hparams
        returns = scores.float() + non_score_reward.sum(-1)
        if h.advantage_estimator == "rloo":
            advantages = rloo_advantages(returns, h.samples_per_prompt)
        else:
            advantages = grpo_advantages(returns, h.samples_per_prompt, h.scale_advantages)
        return {"advantages": advantages[:, None] * mask.to(advantages.dtype)}

    def _calibrate_value_bias(self, rewards: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Shift the value head's bias by the critic's mean error on the first rollout; returns the shift.

        The head copied from the reward model predicts the normalised score, but not the missing-EOS
        penalty or the KL term: without this, most tokens start with the same error (about -0.9 when 90%
        of responses miss EOS), which value clipping undoes by at most ``clip_range_value`` per iteration.
        """
        _, returns = gae(rewards, torch.zeros_like(values), mask, self.hparams.gamma, 1.0)  # rewards-to-go
        totals = self._all_reduce(torch.stack([((returns - values) * mask).sum(), mask.sum().float()]))
        shift = totals[0] / totals[1]
        with torch.no_grad():
            self.value_head.bias.add_(shift.to(self.value_head.bias.dtype))
        return shift

    def _minibatch(self, data: dict, idx: Tensor) -> dict:
        """Rows ``idx`` of a rollout, with all-pad columns trimmed on both sides."""
        start, mask = data["start"], data["mask"][idx]
        attention = data["attention_mask"][idx]
        first = int((attention[:, :start].sum(0) > 0).nonzero()[0]) if start > 0 else 0
        width = int(mask.sum(-1).max())
        per_token = ("responses", "mask", "logprobs", "values", "advantages", "returns", "ref_logprobs")
        out = {k: data[k][idx][:, :width] for k in per_token if k in data}
        out["input_ids"] = data["input_ids"][idx][:, first : start + width]
        out["attention_mask"] = attention[:, first : start + width]
        out["start"] = start - first
        return out

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rng, seed = self._rng_context()
        with rng:
            torch.manual_seed(seed)
            began = time.perf_counter()
            data = self.rollout(batch)
            rollout_time = time.perf_counter() - began
            finite = all(
                torch.isfinite(data[k]).all()
                for k in ("scores", "advantages", "returns", "logprobs")
                if k in data
            )
            if not self._guard_nonfinite(self._all_ranks(bool(finite)), "rollout"):
                self._finish_iteration(data, {}, rollout_time, 0.0, skipped=True)
                return
            began = time.perf_counter()
            stats = self.optimize(data)
            optimize_time = time.perf_counter() - began
        self._finish_iteration(data, stats, rollout_time, optimize_time)

    def optimize(self, data: dict) -> dict[str, Tensor]:
        """``ppo_epochs`` x minibatches of the clipped losses on one rollout; returns averaged statistics."""
        h = self.hparams
        optimizer = self.optimizers()
        n = data["responses"].shape[0]
        records: dict[str, list[Tensor]] = {}
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        for _ in range(h.ppo_epochs):
            order = torch.randperm(n)
            for begin in range(0, n, h.minibatch_size):
                mb = self._minibatch(data, order[begin : begin + h.minibatch_size].to(self.device))
                optimizer.zero_grad()
                step_stats = self._minibatch_backward(mb)
                if step_stats is None:
                    optimizer.zero_grad()
                    self._count_nonfinite_step("loss")
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, h.max_grad_norm or float("inf"))
                if not torch.isfinite(grad_norm):
                    optimizer.zero_grad()
                    self._count_nonfinite_step("gradient")
                    continue
                optimizer.step()
                for key, value in {**step_stats, "policy/grad_norm": grad_norm}.items():
                    records.setdefault(key, []).append(value.float())
        stats = {k: torch.stack(v).mean() for k, v in records.items()}
        if "val/ratio" in records:
            stats["val/ratio_var"] = torch.stack(records["val/ratio"]).var(unbiased=False)
        return stats

    def _minibatch_backward(self, mb: dict) -> dict[str, Tensor] | None:
        """Gradients of one minibatch's loss: the clipped policy loss, plus ``beta`` times the KL loss
        (``kl_penalty: loss``), plus ``vf_coef`` times the value loss (``gae``). Returns its statistics,
        or ``None`` if a loss is NaN/inf.

        With a separate critic on one device the two losses touch disjoint parameters, so each network is
        back-propagated on its own right after its forward: the gradients are those of one backward of
        the sum, but only one network's activations are alive at a time. Data-parallel strategies expect
        one backward that reaches every parameter, so there the sum is back-propagated at once.
        """
        h = self.hparams
        ids, mask, start = mb["input_ids"], mb["attention_mask"], mb["start"]
        split = self.critic is not None and self._one_process
        if self.value_head is not None and not split:
            logits, values = self.policy_and_values(ids, mask, start)
        else:
            logits = response_logits(self.policy, ids, mask, start, fp32_head=True)
        logprobs = self.logprobs(logits, mb["responses"])
        pg_loss, pg_stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], h.clip_range)
        loss = pg_loss
        stats = {
            "loss/policy_avg": pg_loss.detach(),
            "policy/approxkl_avg": pg_stats["approxkl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "val/ratio": pg_stats["ratio"],
        }
        if h.kl_penalty == "loss":
            kl = kl_loss(logprobs, mb["ref_logprobs"], mb["mask"])
            loss = loss + self.kl_controller.value * kl
            stats["loss/kl_avg"] = kl.detach()
        with torch.no_grad():
            stats["policy/entropy_avg"] = masked_mean(
                entropy_from_logits(logits, h.temperature, self.suppressed), mb["mask"]
            )
        del logits, logprobs
        if split:
            if not torch.isfinite(loss):
                return None
            self.manual_backward(loss)
            values = self.critic_values(ids, mask, start)
        if self.value_head is not None:
            vf_loss, vf_stats = value_loss(
                values.float(), mb["values"], mb["returns"], mb["mask"], h.clip_range_value
            )
            loss = h.vf_coef * vf_loss if split else loss + h.vf_coef * vf_loss
            stats["loss/value_avg"] = vf_loss.detach()
            stats["val/clipfrac_avg"] = vf_stats["clipfrac"]
        if not self._all_ranks(bool(torch.isfinite(loss))):
            return None
        self.manual_backward(loss)
        return stats

    def _count_nonfinite_step(self, what: str) -> None:
        """A minibatch whose loss or gradient is NaN/inf: its update is skipped and counted."""
        self.nonfinite_steps += 1
        self.log("nonfinite/steps_skipped", float(self.nonfinite_steps))
        rank_zero_info(f"PPO iteration {self.rollouts}: non-finite {what}, minibatch update skipped")

    def _guard_nonfinite(self, finite: bool, what: str) -> bool:
        """Count a non-finite rollout; stop the run (with a checkpoint) after too many in a row."""
        if finite:
            self.consecutive_nonfinite = 0
            return True
        self.nonfinite_rollouts += 1
        self.consecutive_nonfinite += 1
        if self.consecutive_nonfinite >= self.hparams.max_nonfinite_rollouts:
            path = Path(self.trainer.default_root_dir) / "nonfinite-last-good.ckpt"
            self.trainer.save_checkpoint(path)
            raise NonFiniteError(
                f"{self.consecutive_nonfinite} consecutive PPO iterations produced NaN/inf in the {what} "
                f"(iteration {self.rollouts}); the last good state is saved to {path}. Lower the learning rate, "
                "check the reward model's outputs, or raise model.max_nonfinite_rollouts."
            )
        return False

    def _finish_iteration(
        self, data: dict, stats: dict, rollout_time: float, optimize_time: float, skipped=False
    ):
        mask = data["mask"]
        n = mask.shape[0]
        self.rollouts += 1
        self.episodes += n * self.trainer.world_size
        kl_per_episode = data["kl"].sum(-1)
        learning_rates = [group["lr"] for group in self.optimizers().param_groups]
        if not skipped:
            # every rank steers beta with the KL of the global batch, so all ranks shape rewards alike
            count = torch.tensor(float(n), device=self.device)
            totals = self._all_reduce(torch.stack([kl_per_episode.sum().float(), count]))
            self.kl_controller.update(float(totals[0] / totals[1]), int(totals[1]))
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        non_score = data["non_score_reward"].sum(-1)
        metrics = {
            "objective/scores": data["scores"].mean(),
            "objective/raw_scores": data["raw_scores"].mean(),
            "objective/kl": kl_per_episode.mean(),
            "objective/entropy": data["entropy"].sum(-1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (data["scores"] + non_score).mean(),
            "objective/kl_coef": torch.tensor(self.kl_controller.value),
            "objective/response_length": mask.sum(-1).float().mean(),
            "lr": torch.tensor(learning_rates[0]),
            "episode": torch.tensor(float(self.episodes)),
            "rollouts": torch.tensor(float(self.rollouts)),
            "nonfinite/rollouts_skipped": torch.tensor(float(self.nonfinite_rollouts)),
            "time/rollout_s": torch.tensor(rollout_time),
            "time/optimize_s": torch.tensor(optimize_time),
            **stats,
        }
        if self.value_head is not None:
            metrics["lr_critic"] = torch.tensor(learning_rates[-1])
        metrics = {k: v.detach().float().to(self.device) for k, v in metrics.items()}
        same_on_all_ranks = ("episode", "rollouts", "objective/kl_coef", "lr", "lr_critic")
        sync = {k: v for k, v in metrics.items() if k not in same_on_all_ranks}
        self.log_dict(sync, on_step=True, on_epoch=False, sync_dist=True, batch_size=n)
        eos = (data["responses"] == self.tokenizer.eos_token_id).sum().float()
        self.log("val/num_eos_tokens", eos, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum")
        self.log_dict(
            {k: metrics[k] for k in metrics.keys() - sync.keys()}, on_step=True, on_epoch=False, batch_size=n
        )
        self.last_rollout = {
            "prompt_texts": data.get("prompt_texts"),
            "input_ids": data["input_ids"].detach(),
            "start": data["start"],
            "mask": mask,
            "scores": data["raw_scores"],
        }

    # -- validation: preference accuracy on held-out pairs ---------------------------------------

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Preference accuracy of the reward model and of the policy's implicit reward on held-out pairs.

        The policy's implicit reward is ``log pi(y|x) - log pi_ref(y|x)`` (Rafailov et al. 2023): it tells
        whether PPO moved the policy toward the responses people prefer.
        """
        ids, mask, pairs = batch["input_ids"], batch["attention_mask"], batch["pairs"]
        implicit = self._sequence_logprob(self.policy, batch)
        with self._reference_model() as reference:
            implicit = implicit - self._sequence_logprob(reference, batch)
        self.val_accuracy["policy"].update(pair_accuracy(implicit, pairs))
        if self.reward_model is not None:
            rewards = sequence_scores(self.reward_model, ids, mask).float()
            self.val_accuracy["reward_model"].update(pair_accuracy(rewards, pairs))

    def _sequence_logprob(self, model: nn.Module, batch: dict) -> Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        start = max(1, int(batch["prompt_lengths"].min()))  # the LM head runs from the first response token
        logprobs = response_logprobs(model, ids, mask, start)  # T = 1, in row groups: memory stays flat
        positions = torch.arange(start, ids.shape[1], device=ids.device)
        in_response = (positions[None, :] >= batch["prompt_lengths"][:, None]) & mask[:, start:].bool()
        return (logprobs * in_response).sum(-1)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_accuracy.items():
            if metric.update_count:
                self.log(f"eval/{name}_preference_accuracy", metric.compute(), sync_dist=True)
            metric.reset()
