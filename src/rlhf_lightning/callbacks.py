"""Rank-zero callbacks that write what scalars cannot show: text samples and score histograms."""

from __future__ import annotations

import os
import signal
import threading

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
    histogram of the reward model's raw scores (``objective/raw_scores_hist``) in TensorBoard.

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
            rows.append(f"| {_cell(prompt)[-200:]} | {_cell(response)} | {float(data['scores'][i]):.3f} |")
        step = pl_module.rollouts - 1  # the scalars' x-axis: one point per PPO iteration
        writer.add_text("samples", "\n".join(rows), step)
        writer.add_histogram("objective/raw_scores_hist", data["scores"].float().cpu(), step)


class CheckpointOnStop(Callback):
    """Ctrl-C or SIGTERM: finish the current step, save ``last.ckpt``, stop; resume with ``--ckpt_path last``.

    The first Ctrl-C asks for a stop (a second one interrupts at once, as usual); SIGTERM is Lightning's
    own flag. Either way the checkpoint is written between two training steps, so it holds a consistent
    state (never half a PPO iteration), and no export is written for the unfinished run. The checkpoint
    goes to the ``ModelCheckpoint`` directory when there is one (where ``--ckpt_path last`` looks), else
    to ``<default_root_dir>/checkpoints``.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            print("\nstop requested: finishing this step, then saving last.ckpt (Ctrl-C again to abort now)")

        self._previous = signal.signal(signal.SIGINT, request_stop)

    def _restore_handler(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def _directory(self, trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return callback.dirpath
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # every rank must agree before the (collective) save; Ctrl-C may reach only some of them
        stop = trainer.strategy.reduce_boolean_decision(self.requested or trainer.received_sigterm, all=False)
        if not stop:
            return
        path = os.path.join(self._directory(trainer), "last.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # everything: optimizer, schedulers, loops
        if trainer.is_global_zero:
            print(f"saved {path}; resume with --ckpt_path last")
        raise SIGTERMException() if trainer.received_sigterm else KeyboardInterrupt()
