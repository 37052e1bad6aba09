"""Stage 1: supervised fine-tuning on demonstrations (cross-entropy on completion tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rlhf_lightning.data.batching import IGNORE_INDEX
from rlhf_lightning.lm import hidden_states
from rlhf_lightning.models import lm_head, load_causal_lm
from rlhf_lightning.modules.base import FinetuneModule


def completion_loss(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy over completion tokens, the number of them, and how many argmax predicted.

    Only positions whose next token is a completion token reach the LM head.
    """
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    logits = lm_head(model)(hidden[:, :-1][selected]).float()
    targets = targets[selected]
    loss = F.cross_entropy(logits, targets)
    correct = (logits.argmax(-1) == targets).sum()
    return loss, selected.sum(), correct


class SFTModule(FinetuneModule):
    """Fine-tunes a causal LM on demonstrations; exports it for the reward and PPO stages.

    Logs ``train/loss``, ``train/perplexity``, ``train/token_accuracy`` and their ``val/`` twins.
    """

    def __init__(self, learning_rate: float = 2e-5, export_dir: str | None = "runs/sft/export", **kwargs):
        super().__init__(learning_rate=learning_rate, export_dir=export_dir, **kwargs)
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()

    def build_model(self) -> nn.Module:
        return load_causal_lm(self.hparams.model, self.hparams.trust_remote_code)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        loss, n_tokens, correct = completion_loss(self.model, batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/perplexity", torch.exp(loss.detach()), batch_size=size)
        self.log("train/token_accuracy", correct / n_tokens, batch_size=size)
        self.log("train/tokens", n_tokens.float(), reduce_fx="sum", batch_size=size)
        return self.skip_if_nonfinite(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, n_tokens, correct = completion_loss(self.model, batch)
        self.val_loss.update(loss, n_tokens)
        self.val_accuracy.update(correct / n_tokens, n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", torch.exp(loss), sync_dist=True)
        self.log("val/token_accuracy", self.val_accuracy.compute(), sync_dist=True)
        self.val_loss.reset()
        self.val_accuracy.reset()
