"""What the stages share: a backbone by name, LoRA, the optimizer, export; frozen models kept frozen;
agreement across ranks."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from rlhf_lightning.models import (
    DEFAULT_MODEL,
    LoraOptions,
    frozen_dtype,
    linear_weights_to,
    load_tokenizer,
    prepare_for_training,
    save_hf,
)
from rlhf_lightning.schedules import deferred_schedule


def adamw(
    groups: list[tuple[list[nn.Parameter], float]], weight_decay: float, eps: float
) -> torch.optim.AdamW:
    """AdamW over ``(parameters, learning rate)`` groups of trainable parameters; biases and norm weights
    (1-d tensors) get no weight decay.

    The fused kernel (CPU and CUDA) updates each tensor in one pass: no full-size temporaries, so the
    step peaks at the parameters + gradients + two moments (the multi-tensor path adds up to two more
    copies), and it is faster."""
    param_groups = []
    for params, lr in groups:
        params = [p for p in params if p.requires_grad]
        param_groups.append(
            {"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay}
        )
        param_groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    param_groups = [g for g in param_groups if g["params"]]
    devices = {p.device.type for g in param_groups for p in g["params"]}
    fused = True if devices <= {"cpu", "cuda"} else None  # None: PyTorch's default elsewhere (e.g. mps)
    return torch.optim.AdamW(param_groups, eps=eps, fused=fused)


def drop_frozen(checkpoint: dict, prefixes: tuple[str, ...]) -> None:
    """Leave the frozen models' weights (state-dict keys starting with ``prefixes``) out of a checkpoint
    being saved: they are loaded again from their names."""
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(prefixes)}


def refill_frozen(module: nn.Module, checkpoint: dict, prefixes: tuple[str, ...]) -> None:
    """Put ``module``'s own frozen weights into a checkpoint being loaded, so the rest loads strictly."""
    checkpoint["state_dict"].update({k: v for k, v in module.state_dict().items() if k.startswith(prefixes)})


def one_process(module: LightningModule) -> bool:
    """No other rank to agree with: no trainer attached, or a world of one."""
    return module._trainer is None or module.trainer.world_size == 1


def all_ranks(module: LightningModule, ok: bool) -> bool:
    """``ok`` on every rank: a rank that skips a backward pass others run would hang the gradient sync."""
    if one_process(module):
        return ok
    return bool(module.trainer.strategy.reduce_boolean_decision(ok, all=True))


def sum_over_ranks(module: LightningModule, tensor: Tensor) -> Tensor:
    """``tensor`` summed over the ranks (itself on one process)."""
    if one_process(module):
        return tensor
    return module.trainer.strategy.reduce(tensor, reduce_op="sum")


class HoldsFrozenModels:
    """A LightningModule mixin for stages that hold frozen models (a reference, a reward model): they stay in
    eval mode whatever the trainer asks, and their weights are cast once to the cheapest exact form for the
    trainer's precision (:func:`~rlhf_lightning.models.frozen_dtype`)."""

    def frozen_models(self) -> list[nn.Module]:
        """The frozen models this stage holds (``None`` entries allowed)."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in filter(None, self.frozen_models()):
            frozen.eval()
        return self

    def cast_frozen_models(self) -> None:
        """Cast the frozen models for ``self.trainer.precision`` (call from ``setup``)."""
        for frozen in filter(None, self.frozen_models()):
            linear_weights_to(frozen, frozen_dtype(str(self.trainer.precision)))


class FinetuneModule(LightningModule):
    """A Hugging Face backbone fine-tuned with AdamW and exported in Hugging Face format at the end of fit.

    Args:
        model: Backbone to start from: a local Hugging Face directory (e.g. a previous stage's export),
            a hub id, ``bundled:SmolLM2-135M-Instruct`` or ``tiny:llama``.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_eps: AdamW epsilon.
        warmup_ratio: Fraction of the optimizer steps spent warming the learning rate up linearly from 0.
        lr_scheduler: Shape of the learning rate after warm-up.
        lora: Train LoRA adapters instead of every weight (``None``: full fine-tuning).
        train_top_layers: Train only the top this many transformer blocks (and the heads and final norm);
            the embeddings and lower blocks stay frozen, so a step costs a little over half as much
            (``None``: every weight trains).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        export_dir: Where the Hugging Face export is written at the end of ``fit`` (``None``: no export).
            The next stage's config points here.
        trust_remote_code: Allow a hub model to run its own code (off: only for repos you trust).
    """

    lora_task: str = "CAUSAL_LM"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        warmup_ratio: float = 0.1,
        lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        lora: LoraOptions | None = None,
        train_top_layers: int | None = None,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        lora = LoraOptions.of(lora)
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = asdict(lora) if lora else None  # a dict: checkpoints load with weights_only
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        model = self.build_model().train()
        if gradient_checkpointing:
            model.config.use_cache = False  # no cache to keep while activations are recomputed
        self.model = prepare_for_training(
            model, self.lora_task, lora, train_top_layers, gradient_checkpointing
        )
        self.nonfinite_steps = 0

    def build_model(self) -> nn.Module:
        """The backbone to train, loaded from ``hparams.model``."""
        raise NotImplementedError

    def export_extras(self) -> dict:
        """Extra JSON files written beside the exported weights."""
        return {}

    def skip_if_nonfinite(self, loss: Tensor) -> Tensor | None:
        """``None`` (Lightning then skips the step) when the loss is NaN/inf; counted and logged."""
        if torch.isfinite(loss):
            return loss
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        return None

    def configure_optimizers(self):
        h = self.hparams
        optimizer = adamw([(list(self.parameters()), h.learning_rate)], h.weight_decay, h.adam_eps)
        scheduler = deferred_schedule(
            optimizer, lambda: self.trainer.estimated_stepping_batches, h.warmup_ratio, h.lr_scheduler
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Step, then free the gradients at once. Lightning zeroes them only after the next step's forward
        pass, so they would sit in memory beside its activations: the trained weights' size again (0.6 of
        the SFT step's 4.8 GB fp32 peak, ``scripts/benchmark.py``). The numbers are unchanged."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            path = save_hf(self.model, self.tokenizer, self.hparams.export_dir, self.export_extras())
            rank_zero_info(f"exported the model in Hugging Face format to {path}")
