"""One PPO iteration around its rollout and update, and the iterations of a fit.

The iteration's arithmetic (episodes, minibatches, optimizer steps; how many iterations a fit runs),
checked when ``fit`` starts; its random stream (fixed by seed, rank and iteration, so a resumed run
samples what an uninterrupted one would); the guard that stops a run after too many non-finite rollouts
in a row; the bookkeeping after the update (counters, the KL controller, the learning-rate schedule,
logging); and the state a checkpoint keeps of all this. ``PPOModule``'s hooks call them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.modules.base import sum_over_ranks
from rlhf_lightning.modules.ppo_logging import log_iteration
from rlhf_lightning.rl.experience import Experience


class NonFiniteError(RuntimeError):
    """Too many consecutive PPO iterations produced NaN/inf; the last good state was checkpointed."""


class NonFiniteCounter:
    """Iterations and minibatch steps skipped for NaN/inf, and how many iterations in a row were.

    Args:
        limit: Consecutive non-finite iterations after which the run must stop.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.rollouts = self.steps = self.consecutive = 0

    def rollout(self, finite: bool) -> bool:
        """Record one iteration; ``False`` once ``limit`` iterations in a row were non-finite."""
        self.consecutive = 0 if finite else self.consecutive + 1
        self.rollouts += not finite
        return self.consecutive < self.limit

    def state_dict(self) -> dict:
        return {
            "nonfinite_rollouts": self.rollouts,
            "nonfinite_steps": self.steps,
            "consecutive_nonfinite": self.consecutive,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = state.get("nonfinite_rollouts", 0)
        self.steps = state.get("nonfinite_steps", 0)
        self.consecutive = state.get("consecutive_nonfinite", 0)


def describe_iteration(estimator: str, prompts: int, k: int, minibatch: int, epochs: int, world: int) -> str:
    """One PPO iteration's arithmetic in words; an error naming the options when minibatches do not
    divide the rollout (``prompts`` x ``k`` responses per device)."""
    episodes = prompts * k
    if minibatch < 1 or episodes % minibatch:
        raise ConfigurationError(
            f"each PPO iteration samples data.batch_size={prompts} prompts x model.samples_per_prompt={k} "
            f"= {episodes} responses per device and splits them into minibatches of "
            f"model.minibatch_size={minibatch}; {episodes} is not a multiple of {minibatch}. Pick a minibatch "
            f"size that divides {episodes}."
        )
    return (
        f"PPO iteration ({estimator}): {prompts} prompts x {k} samples/device x {world} device(s) = "
        f"{episodes * world} episodes; {epochs} epochs x {episodes // minibatch} minibatches of {minibatch} "
        f"= {epochs * episodes // minibatch} optimizer steps"
    )


def iterations_in_fit(
    max_epochs: int | None, batches: int, max_steps: int | None, episodes: int, epochs: int, minibatch: int
) -> int:
    """PPO iterations in a fit: ``batches`` x ``max_epochs``, fewer if ``max_steps`` optimizer steps (each
    iteration takes ``epochs`` x ceil(``episodes`` / ``minibatch``)) end it first; an error if neither bounds it."""
    total = math.inf
    if max_epochs not in (None, -1):
        total = batches * max_epochs
    if max_steps not in (None, -1):
        total = min(total, math.ceil(max_steps / (epochs * math.ceil(episodes / minibatch))))
    if math.isinf(total):
        raise ConfigurationError(
            "PPO needs a bounded run for its learning-rate schedule: set trainer.max_epochs "
            "(with trainer.limit_train_batches for the iterations per epoch) or trainer.max_steps"
        )
    return int(total)


def fit_iterations(trainer, hparams) -> int:
    """PPO iterations in ``trainer``'s fit (:func:`iterations_in_fit` with the stage's options)."""
    t, h = trainer, hparams
    episodes = t.datamodule.batch_size * h.samples_per_prompt if t.max_steps not in (None, -1) else 0
    return iterations_in_fit(
        t.max_epochs, t.num_training_batches, t.max_steps, episodes, h.ppo_epochs, h.minibatch_size
    )


def check_fit(trainer, hparams) -> None:
    """At the start of ``fit``: a precision PPO supports, and the iteration's arithmetic, logged (an error
    naming the options when minibatches do not divide the rollout)."""
    precision = str(trainer.precision)
    if precision.startswith("16"):
        raise ConfigurationError(
            f"trainer.precision={precision} is not supported by PPO (its loss scaling would interact with "
            "the non-finite checks and gradient clipping); use bf16-mixed or 32-true"
        )
    batch_size = getattr(trainer.datamodule, "batch_size", None)
    if batch_size is not None:
        h = hparams
        rank_zero_info(
            describe_iteration(
                h.advantage_estimator,
                batch_size,
                h.samples_per_prompt,
                h.minibatch_size,
                h.ppo_epochs,
                trainer.world_size,
            )
        )


def rollout_rng(module):
    """A forked RNG context and the seed of this iteration's stream: (seed, rank, iteration).

    Sampling and minibatch shuffling draw from it, so the stream is per-rank and resumable."""
    devices = [module.device] if module.device.type == "cuda" else []
    seed = module.hparams.rollout_seed * 1_000_003 + module.global_rank * 7_919 + module.rollouts
    return torch.random.fork_rng(devices=devices), seed


def guard_nonfinite(module, finite: bool, what: str) -> bool:
    """Record whether the rollout was ``finite`` and return it; after ``max_nonfinite_rollouts`` non-finite
    rollouts in a row, save the last good state and raise :class:`NonFiniteError`."""
    if module.nonfinite.rollout(finite):
        return finite
    path = Path(module.trainer.default_root_dir) / "nonfinite-last-good.ckpt"
    module.trainer.save_checkpoint(path)
    raise NonFiniteError(
        f"{module.nonfinite.consecutive} consecutive PPO iterations produced NaN/inf in the {what} "
        f"(iteration {module.rollouts}); the last good state is saved to {path}. Lower the learning rate, "
        "check the reward model's outputs, or raise model.max_nonfinite_rollouts."
    )


def finish_iteration(
    module,
    experience: Experience,
    stats: dict[str, Tensor],
    rollout_time: float,
    optimize_time: float,
    skipped: bool = False,
) -> None:
    """Count the iteration and its episodes; unless it was ``skipped``, steer beta with the global batch's
    KL (so every rank shapes rewards alike) and step the schedule; then log it."""
    n = len(experience)
    module.rollouts += 1
    module.episodes += n * module.trainer.world_size
    if not skipped:
        count = torch.tensor(float(n), device=module.device)
        totals = sum_over_ranks(module, torch.stack([experience.kl.sum().float(), count]))
        module.kl_controller.update(float(totals[0] / totals[1]), int(totals[1]))
        scheduler = module.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
    log_iteration(module, experience, stats, rollout_time, optimize_time)
    module.last_rollout = experience  # for the sample-table and gold-judge callbacks


def iteration_state(module) -> dict:
    """What a checkpoint keeps of the iterations so far (``ppo_state``)."""
    return {
        "rollouts": module.rollouts,
        "episodes": module.episodes,
        **module.nonfinite.state_dict(),
        "kl_controller": module.kl_controller.state_dict(),
    }


def load_iteration_state(module, state: dict) -> None:
    """Restore :func:`iteration_state`; a checkpoint without it starts the counts at zero."""
    module.rollouts = state.get("rollouts", 0)
    module.episodes = state.get("episodes", 0)
    module.nonfinite.load_state_dict(state)
    if "kl_controller" in state:
        module.kl_controller.load_state_dict(state["kl_controller"])
