"""The frame of one PPO iteration around its rollout and update.

Its random stream (fixed by seed, rank and iteration, so a resumed run samples what an uninterrupted
one would), the guard that stops a run after too many non-finite rollouts in a row, the bookkeeping
after the update (counters, the KL controller, the learning-rate schedule, TensorBoard) and the state
a checkpoint keeps of all this. ``PPOModule.training_step`` wires them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rlhf_lightning.modules.base import sum_over_ranks
from rlhf_lightning.modules.ppo_logging import log_iteration
from rlhf_lightning.rl.experience import Experience


class NonFiniteError(RuntimeError):
    """Too many consecutive PPO iterations produced NaN/inf; the last good state was checkpointed."""


def rollout_rng(module):
    """A forked RNG context and the seed of this iteration's stream: (seed, rank, iteration).

    Sampling and minibatch shuffling draw from it, so the stream is per-rank and resumable."""
    rank = module.global_rank if module._trainer is not None else 0
    devices = [module.device] if module.device.type == "cuda" else []
    seed = module.hparams.rollout_seed * 1_000_003 + rank * 7_919 + module.rollouts
    return torch.random.fork_rng(devices=devices), seed


def guard_nonfinite(module, finite: bool, what: str) -> bool:
    """Count a non-finite rollout and return ``finite``; after ``max_nonfinite_rollouts`` in a row, save
    the last good state and raise :class:`NonFiniteError`."""
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
