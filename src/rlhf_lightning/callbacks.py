"""Rank-zero callbacks that write what scalars cannot show: text samples and score histograms."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


def _tensorboard(trainer: Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


class RolloutSamples(Callback):
    """Every ``every_n_rollouts`` PPO iterations: a prompt/response/score table (``samples``) and a
    histogram of the reward model's scores (``objective/scores_hist``) in TensorBoard.

    Args:
        every_n_rollouts: How often to write, in PPO iterations.
        num_samples: Rows of the table.
    """

    def __init__(self, every_n_rollouts: int = 5, num_samples: int = 4):
        self.every_n_rollouts = every_n_rollouts
        self.num_samples = num_samples

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        data = getattr(pl_module, "last_rollout", None)
        writer = _tensorboard(trainer)
        if data is None or writer is None or (pl_module.rollouts - 1) % self.every_n_rollouts:
            return
        tokenizer, start = pl_module.tokenizer, data["start"]
        rows = ["| prompt | response | score |", "|---|---|---|"]
        for i in range(min(self.num_samples, data["input_ids"].shape[0])):
            prompt = tokenizer.decode(data["input_ids"][i, :start], skip_special_tokens=True)
            response = tokenizer.decode(
                data["input_ids"][i, start:][data["mask"][i]], skip_special_tokens=False
            )
            response = response.replace(tokenizer.pad_token, "")
            rows.append(f"| {_cell(prompt)[-200:]} | {_cell(response)} | {float(data['scores'][i]):.3f} |")
        writer.add_text("samples", "\n".join(rows), pl_module.global_step)
        writer.add_histogram("objective/scores_hist", data["scores"].float().cpu(), pl_module.global_step)
