"""Rank-zero callbacks that write what scalars cannot show: text samples and score histograms."""

from __future__ import annotations

import os
import signal
import threading

import torch
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
        tokenizer, start = pl_module.tokenizer, data.start
        rows = ["| prompt | response | score |", "|---|---|---|"]
        for i in range(min(self.num_samples, len(data))):
            prompt = tokenizer.decode(data.input_ids[i, :start], skip_special_tokens=True)
            response = tokenizer.decode(data.input_ids[i, start:][data.mask[i]], skip_special_tokens=False)
            rows.append(f"| {_cell(prompt)[-200:]} | {_cell(response)} | {float(data.raw_scores[i]):.3f} |")
        step = pl_module.rollouts - 1  # the scalars' x-axis: one point per PPO iteration
        writer.add_text("samples", "\n".join(rows), step)
        writer.add_histogram("objective/raw_scores_hist", data.raw_scores.float().cpu(), step)


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
        self.saved: str | None = None  # the checkpoint written on the stop
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
        self.saved = path
        if trainer.is_global_zero:
            print(f"saved {path}; resume with --ckpt_path last")
        raise SIGTERMException() if trainer.received_sigterm else KeyboardInterrupt()


class GoldJudge(Callback):
    """The simulated annotator's verdict during PPO, for the bundled demo (its prompts and rubric).

    A proxy-reward curve cannot show whether the policy got better or only learned to please the reward
    model; the annotator's noise-free gold score can. Logged to TensorBoard:

    * every iteration, on the rollout just sampled (training prompts): ``gold/score`` and
      ``gold/finished`` (share of responses that ended with EOS);
    * every ``every_n_rollouts`` iterations and after the last: on ``prompts`` that PPO does not train on,
      the policy's paired win rate over the reference (SFT) policy, ``gold/win_rate`` (ties half), its
      95% interval ``gold/win_rate_low`` / ``gold/win_rate_high``, and ``gold/val_score``. Both policies
      sample with the same seed; the reference's samples are drawn once.

    Args:
        prompts: Prompts for the win rate (any prompt format); ``None``: rollout scores only.
        num_prompts: How many of them.
        every_n_rollouts: How often to measure the win rate, in PPO iterations.
        seed: Sampling seed of the win-rate samples (the training streams are left untouched).
    """

    def __init__(
        self,
        prompts: str | None = "bundled:prompts_val",
        num_prompts: int = 48,
        every_n_rollouts: int = 4,
        seed: int = 1234,
    ):
        from rlhf_lightning.annotator import SimulatedAnnotator

        self.prompts, self.num_prompts = prompts, num_prompts
        self.every_n_rollouts, self.seed = every_n_rollouts, seed
        self.annotator = SimulatedAnnotator()
        self._batch = None
        self._reference_gold: list[float] | None = None

    def _judge(self, tokenizer, texts: list[str], responses, mask) -> tuple[list[float], list[bool]]:
        from rlhf_lightning.data.render import decode_response

        gold, finished = [], []
        for prompt, row, row_mask in zip(texts, responses, mask):
            text, done, _ = decode_response(tokenizer, row, row_mask)
            gold.append(self.annotator.score(prompt, text, done))
            finished.append(done)
        return gold, finished

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        data = getattr(pl_module, "last_rollout", None)
        if data is None or not data.prompt_texts:
            return
        gold, finished = self._judge(
            pl_module.tokenizer, data.prompt_texts, data.input_ids[:, data.start :], data.mask
        )
        n = len(gold)
        pl_module.log("gold/score", sum(gold) / n, on_step=True, batch_size=n, sync_dist=True)
        pl_module.log("gold/finished", sum(finished) / n, on_step=True, batch_size=n, sync_dist=True)
        last = trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
        if self.prompts and (pl_module.rollouts % self.every_n_rollouts == 0 or last):
            self._win_rate(trainer, pl_module)

    @rank_zero_only
    def _win_rate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Written straight to TensorBoard at the iteration's step: logged through Lightning, a value
        logged only every few steps would be repeated at every step in between."""
        from rlhf_lightning.evaluation import win_rate, win_rate_interval

        writer = _tensorboard(trainer)
        if writer is None:
            return
        if self._reference_gold is None:
            with pl_module.reference_model() as reference:
                self._reference_gold = self._sample_gold(trainer, pl_module, reference)
        gold = self._sample_gold(trainer, pl_module, pl_module.policy)
        low, high = win_rate_interval(gold, self._reference_gold)
        step = pl_module.rollouts - 1  # the step of the iteration's other scalars
        for key, value in (
            ("gold/win_rate", win_rate(gold, self._reference_gold)),
            ("gold/win_rate_low", low),
            ("gold/win_rate_high", high),
            ("gold/val_score", sum(gold) / len(gold)),
        ):
            writer.add_scalar(key, value, step)

    def _prompt_batch(self, pl_module: LightningModule) -> dict:
        if self._batch is None:
            from rlhf_lightning.data.batching import left_padded
            from rlhf_lightning.data.formats import to_prompt_row
            from rlhf_lightning.data.render import encode, prompt_text, user_text
            from rlhf_lightning.data.sources import read_rows

            rows, _ = read_rows(self.prompts, to_prompt_row)
            rows = rows[: self.num_prompts]
            tokenizer = pl_module.tokenizer
            ids, mask = left_padded(
                [encode(tokenizer, prompt_text(tokenizer, r.prompt)) for r in rows], tokenizer.pad_token_id
            )
            texts = [user_text(r.prompt) for r in rows]
            self._batch = {"input_ids": ids, "attention_mask": mask, "texts": texts}
        return self._batch

    @torch.no_grad()
    def _sample_gold(self, trainer: Trainer, pl_module: LightningModule, model) -> list[float]:
        from rlhf_lightning.lm import sample

        batch = self._prompt_batch(pl_module)
        h, tokenizer = pl_module.hparams, pl_module.tokenizer
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
            torch.manual_seed(self.seed)
            responses, mask = sample(
                model,
                batch["input_ids"].to(pl_module.device),
                batch["attention_mask"].to(pl_module.device),
                max_new_tokens=h.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                temperature=h.temperature,
            )
        return self._judge(tokenizer, batch["texts"], responses, mask)[0]
