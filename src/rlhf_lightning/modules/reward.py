"""Stage 2: a reward model that predicts which response humans prefer.

A scalar head on the backbone, read at the last real token of prompt + response, trained with the
Bradley-Terry loss (InstructGPT's ranking loss for K-way rows). At the end of fit the mean and std
of its rewards on validation responses are stored with the export, so PPO can normalise rewards.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, PearsonCorrCoef

from rlhf_lightning.lm import ranking_scores, sequence_scores
from rlhf_lightning.models import keep_bottom_layers, load_reward_model
from rlhf_lightning.modules.base import FinetuneModule
from rlhf_lightning.rl.ranking import pair_accuracy, ranking_loss

STATS_FILE = "reward_stats.json"


class RewardModule(FinetuneModule):
    """Trains a scalar reward model on preferences; exports an ``AutoModelForSequenceClassification``.

    Logs ``{train,val}/loss``, ``{train,val}/preference_accuracy`` (and its per-epoch mean,
    ``train/preference_accuracy_epoch``), ``{train,val}/rewards_chosen``,
    ``{train,val}/rewards_rejected``, ``{train,val}/margin`` (chosen minus rejected) and
    ``val/length_correlation`` (Pearson correlation of reward and response length: a reward model
    that pays for length is one PPO will game).

    Args:
        center_rewards_coef: Weight of the mean squared reward added to the loss, which keeps rewards
            centred on zero (Eisenstein et al. 2023); 0 turns it off.
        num_layers: Keep only the first this many transformer blocks of the starting model: a smaller
            reward model (InstructGPT paired a 6B reward model with its 175B policy) that trains for
            more epochs in the same time, and a cheaper critic for PPO, which starts from it
            (``None``: all blocks).
    """

    lora_task = "SEQ_CLS"

    def __init__(
        self,
        learning_rate: float = 1e-5,
        center_rewards_coef: float = 0.0,
        num_layers: int | None = None,
        export_dir: str | None = "runs/reward/export",
        **kwargs,
    ):
        self.num_layers = num_layers
        super().__init__(learning_rate=learning_rate, export_dir=export_dir, **kwargs)
        self.center_rewards_coef = center_rewards_coef
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_chosen = MeanMetric()
        self.val_rejected = MeanMetric()
        self.val_reward = MeanMetric()
        self.val_reward_sq = MeanMetric()
        self.val_length_corr = PearsonCorrCoef()
        self.reward_stats: dict | None = None

    def build_model(self) -> nn.Module:
        model = load_reward_model(
            self.hparams.model, self.hparams.trust_remote_code, pad_token_id=self.tokenizer.pad_token_id
        )
        return model if self.num_layers is None else keep_bottom_layers(model, self.num_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The reward of each row."""
        return sequence_scores(self.model, input_ids, attention_mask)

    def _step(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rewards = ranking_scores(self.model, batch).float()
        loss = ranking_loss(rewards, batch["pairs"], batch["groups"], batch["margins"])
        chosen, rejected = rewards[batch["pairs"][:, 0]], rewards[batch["pairs"][:, 1]]
        return loss, rewards, chosen, rejected

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        loss, rewards, chosen, rejected = self._step(batch)
        if self.center_rewards_coef:
            loss = loss + self.center_rewards_coef * rewards.pow(2).mean()
        n = int(batch["groups"].max()) + 1
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        accuracy = pair_accuracy(rewards, batch["pairs"]).mean()
        self.log("train/preference_accuracy", accuracy, prog_bar=True, batch_size=n)
        self.log("train/preference_accuracy_epoch", accuracy, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/rewards_chosen", chosen.mean(), batch_size=n)
        self.log("train/rewards_rejected", rejected.mean(), batch_size=n)
        self.log("train/margin", (chosen - rejected).mean(), batch_size=n)
        return self.skip_if_nonfinite(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, rewards, chosen, rejected = self._step(batch)
        self.val_loss.update(loss, int(batch["groups"].max()) + 1)
        self.val_accuracy.update(pair_accuracy(rewards, batch["pairs"]))
        self.val_chosen.update(chosen)
        self.val_rejected.update(rejected)
        self.val_reward.update(rewards)
        self.val_reward_sq.update(rewards.pow(2))
        self.val_length_corr.update(rewards, batch["response_lengths"])

    def on_validation_epoch_end(self) -> None:
        if self.val_reward.update_count == 0:
            return
        mean, mean_sq = self.val_reward.compute(), self.val_reward_sq.compute()
        self.reward_stats = {"mean": float(mean), "std": float((mean_sq - mean**2).clamp(min=1e-8).sqrt())}
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)
        self.log("val/preference_accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=True)
        chosen, rejected = self.val_chosen.compute(), self.val_rejected.compute()
        self.log("val/rewards_chosen", chosen, sync_dist=True)
        self.log("val/rewards_rejected", rejected, sync_dist=True)
        self.log("val/margin", chosen - rejected, sync_dist=True)
        self.log("val/length_correlation", self.val_length_corr.compute(), sync_dist=True)
        for metric in (
            self.val_loss,
            self.val_accuracy,
            self.val_chosen,
            self.val_rejected,
            self.val_reward,
            self.val_reward_sq,
            self.val_length_corr,
        ):
            metric.reset()

    @torch.no_grad()
    def _stats_on_training_data(self) -> dict:
        rewards = []
        for batch in self.trainer.datamodule.train_dataloader():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            rewards.append(ranking_scores(self.model, batch).float())
        r = torch.cat(rewards)
        return {
            "mean": float(r.mean()),
            "std": float(r.std(unbiased=False).clamp(min=1e-4)),
            "source": "train",
        }

    def export_extras(self) -> dict:
        stats = self.reward_stats
        if stats is None:
            rank_zero_warn("no validation data: reward normalisation stats are computed on the training data")
            stats = self._stats_on_training_data()
        else:
            stats = {**stats, "source": "validation"}
        return {STATS_FILE: stats}
