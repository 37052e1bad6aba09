"""Direct Preference Optimization: the policy learns from preferences directly, with no reward model
and no sampling (Rafailov et al. 2023). The losses are pure functions in ``rlhf_lightning.rl.dpo``.

It reads the reward stage's data unchanged (``PreferenceDataModule``: explicit or implicit pairs,
margins, K-way rankings, per-response scores): a ranking of K responses is encoded once and gives its
C(K,2) pairs, each prompt weighing the same (InstructGPT's averaging, as the reward stage does).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.lm import completion_logprob
from rlhf_lightning.models import freeze, load_causal_lm, reference_policy
from rlhf_lightning.modules.base import FinetuneModule, HoldsFrozenModels, drop_frozen, refill_frozen
from rlhf_lightning.rl.dpo import dpo_loss, implicit_rewards, logratio_gap
from rlhf_lightning.rl.ranking import group_mean, pair_accuracy

REFERENCE_PREFIX = ("reference.",)  # state-dict keys of the frozen reference: never checkpointed


class DPOModule(HoldsFrozenModels, FinetuneModule):
    """Fine-tunes a causal LM (usually the SFT export) on preferences with a DPO loss; exports it in
    Hugging Face format, like any policy the evaluation reads.

    Logs TRL's names: ``rewards/chosen``, ``rewards/rejected`` (mean implicit rewards),
    ``rewards/accuracies`` (share of pairs whose winner has the higher implicit reward),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``train/loss``; on validation the same under
    ``val/`` and ``val/preference_accuracy`` (the held-out preference accuracy, comparable to the reward
    model's).

    Args:
        beta: Strength of the implicit KL constraint to the reference (DPO's beta; 0.1 in the paper and TRL).
        loss_type: ``sigmoid`` (DPO, with ``label_smoothing``: conservative DPO) or ``ipo``.
        label_smoothing: Assumed probability that a preference label is flipped (``sigmoid`` only).
        reference: The frozen reference policy (``None``: the starting ``model``; with ``lora`` the
            adapter is disabled instead, so no second copy is held).
        precompute_reference: Compute every reference log-probability once before training, then drop the
            reference model: one forward pass over the data up front, no reference forward per step and
            no reference in memory while training (its values are identical: the reference never changes).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        reference: str | None = None,
        precompute_reference: bool = False,
        learning_rate: float = 5e-7,
        export_dir: str | None = "runs/dpo/export",
        **kwargs,
    ):
        if beta <= 0:
            raise ConfigurationError(f"model.beta must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigurationError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss_type != "sigmoid" and label_smoothing:
            raise ConfigurationError("model.label_smoothing applies to loss_type=sigmoid only")
        super().__init__(learning_rate=learning_rate, export_dir=export_dir, **kwargs)
        self.reference = None
        if reference is not None or self.hparams.lora is None:
            self.reference = freeze(
                load_causal_lm(reference or self.hparams.model, self.hparams.trust_remote_code)
            )
        names = ("loss", "chosen", "rejected", "accuracies", "logps_chosen", "logps_rejected")
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in names})

    def build_model(self) -> nn.Module:
        return load_causal_lm(self.hparams.model, self.hparams.trust_remote_code)

    def frozen_models(self) -> list[nn.Module]:
        return [self.reference]

    def reference_model(self):
        """The reference policy (a context): a frozen model, or the policy with its LoRA adapter disabled."""
        return reference_policy(self.reference, self.model)

    def setup(self, stage: str) -> None:
        self.cast_frozen_models()

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> Tensor:
        """``log pi_ref(y|x)`` of each encoded response: precomputed, or from the reference model."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with self.reference_model() as reference:
            return completion_logprob(reference, batch, fp32_head=True)

    def on_fit_start(self) -> None:
        if not self.hparams.precompute_reference:
            return
        data = self.trainer.datamodule
        for split, collate in ((data.train_data, data.collate), (data.val_data, data.collate_val)):
            for begin in range(0, len(split or []), data.batch_size):
                chunk = split[begin : begin + data.batch_size]
                batch = {k: v.to(self.device) for k, v in collate(chunk).items()}
                with self.trainer.precision_plugin.forward_context():
                    logps = self.reference_logps(batch).float().cpu()
                offset = 0
                for example in chunk:
                    n = len(example["sequences"])
                    example["ref_logps"] = logps[offset : offset + n].tolist()
                    offset += n
        self.reference = None  # every value it would give is stored with the data
        rank_zero_info(
            f"DPO: reference log-probabilities precomputed for {len(data.train_data)} training rows"
        )

    def _step(self, batch: dict) -> dict[str, Tensor]:
        h = self.hparams
        logps = completion_logprob(self.model, batch, fp32_head=True).float()
        ref_logps = self.reference_logps(batch).float()
        pairs = batch["pairs"]
        margin = batch["margins"] if h.loss_type == "sigmoid" else 0.0
        per_pair = dpo_loss(
            logratio_gap(logps, ref_logps, pairs), h.beta, h.loss_type, h.label_smoothing, margin
        )
        rewards = implicit_rewards(logps, ref_logps, h.beta).detach()
        return {
            "loss": group_mean(per_pair, batch["groups"]),
            "chosen": rewards[pairs[:, 0]],
            "rejected": rewards[pairs[:, 1]],
            "accuracies": pair_accuracy(rewards, pairs),
            "logps_chosen": logps.detach()[pairs[:, 0]],
            "logps_rejected": logps.detach()[pairs[:, 1]],
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        out = self._step(batch)
        n = int(batch["groups"].max()) + 1
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("rewards/accuracies", out["accuracies"].mean(), prog_bar=True, batch_size=n)
        self.log("rewards/chosen", out["chosen"].mean(), batch_size=n)
        self.log("rewards/rejected", out["rejected"].mean(), batch_size=n)
        self.log("rewards/margins", (out["chosen"] - out["rejected"]).mean(), batch_size=n)
        self.log("logps/chosen", out["logps_chosen"].mean(), batch_size=n)
        self.log("logps/rejected", out["logps_rejected"].mean(), batch_size=n)
        return self.skip_if_nonfinite(out["loss"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._step(batch)
        self.val_metrics["loss"].update(out["loss"], int(batch["groups"].max()) + 1)
        for name in ("chosen", "rejected", "accuracies", "logps_chosen", "logps_rejected"):
            self.val_metrics[name].update(out[name])

    def on_validation_epoch_end(self) -> None:
        m = self.val_metrics
        if m["loss"].update_count == 0:
            return
        chosen, rejected = m["chosen"].compute(), m["rejected"].compute()
        self.log("val/loss", m["loss"].compute(), prog_bar=True, sync_dist=True)
        self.log("val/preference_accuracy", m["accuracies"].compute(), prog_bar=True, sync_dist=True)
        self.log("val/rewards/chosen", chosen, sync_dist=True)
        self.log("val/rewards/rejected", rejected, sync_dist=True)
        self.log("val/rewards/margins", chosen - rejected, sync_dist=True)
        self.log("val/logps/chosen", m["logps_chosen"].compute(), sync_dist=True)
        self.log("val/logps/rejected", m["logps_rejected"].compute(), sync_dist=True)
        for metric in m.values():
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_frozen(checkpoint, REFERENCE_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        refill_frozen(self, checkpoint, REFERENCE_PREFIX)
