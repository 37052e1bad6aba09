"""One LightningCLI per stage: ``rlhf-lightning {sft,reward,ppo,dpo} {fit,validate} -c CONFIG``.

Each stage takes any subclass of its module and DataModule (``model.class_path``), so an experiment
can swap one component from the YAML. The DataModule's tokenizer is linked to the module's model.
The pipeline runs the stages in-process through :func:`run_stage`; the command line is ``cli.py``.
"""

from __future__ import annotations

import contextvars
import os
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.errors import StageStopped

STAGES = ("sft", "reward", "ppo", "dpo")


class StageCLI(LightningCLI):
    """LightningCLI that feeds the module's model name to the DataModule's tokenizer, picks the precision
    for the machine when the config does not set ``trainer.precision``, writes checkpoints straight to
    disk, and turns a stop by SIGTERM or Ctrl-C into :class:`StageStopped`."""

    model_key = "model"

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(f"model.init_args.{self.model_key}", "data.init_args.tokenizer")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")

    def before_instantiate_classes(self) -> None:
        from rlhf_lightning.precision import auto_precision

        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:
            config.trainer.precision, reason = auto_precision()
            rank_zero_info(f"precision: {config.trainer.precision} (chosen for this machine: {reason})")
        else:
            rank_zero_info(f"precision: {config.trainer.precision} (set by trainer.precision)")

    def instantiate_trainer(self, **kwargs):
        """The trainer, writing checkpoints straight to disk (:mod:`rlhf_lightning.checkpoint_io`) unless
        it was given a checkpoint plugin."""
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from rlhf_lightning.checkpoint_io import StreamingCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = StreamingCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        from lightning.pytorch.trainer.states import TrainerStatus
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as stop:
            raise StageStopped(self._stage, "SIGTERM", self._saved_checkpoint()) from stop
        except SystemExit as stop:  # Lightning ends a Ctrl-C with sys.exit(1)
            if self.trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            raise StageStopped(self._stage, "SIGINT", self._saved_checkpoint()) from stop

    @property
    def _stage(self) -> str:
        return self.parser.prog.rsplit(" ", 1)[-1]

    def _saved_checkpoint(self) -> str | None:
        """The checkpoint written on the stop; else, when the signal came after the stop callback's check
        of the step (Lightning raises at the end of it), the step's periodic ``last.ckpt``, if any."""
        saved = next((c.saved for c in self.trainer.callbacks if getattr(c, "saved", None)), None)
        if saved is None:
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
            saved = last if last and os.path.exists(last) else None
        return saved


class PPOCLI(StageCLI):
    """The PPO stage: the tokenizer follows the policy, and every iteration is logged by default."""

    model_key = "policy"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_defaults", {"log_every_n_steps": 1})
        super().__init__(*args, **kwargs)


def stage_classes(stage: str):
    """The (module, datamodule, CLI class) of a stage."""
    if stage == "sft":
        from rlhf_lightning.data.sft import SFTDataModule
        from rlhf_lightning.modules.sft import SFTModule

        return SFTModule, SFTDataModule, StageCLI
    if stage == "reward":
        from rlhf_lightning.data.preference import PreferenceDataModule
        from rlhf_lightning.modules.reward import RewardModule

        return RewardModule, PreferenceDataModule, StageCLI
    if stage == "ppo":
        from rlhf_lightning.data.prompts import PromptDataModule
        from rlhf_lightning.modules.ppo import PPOModule

        return PPOModule, PromptDataModule, PPOCLI
    if stage == "dpo":
        from rlhf_lightning.data.preference import PreferenceDataModule
        from rlhf_lightning.modules.dpo import DPOModule

        return DPOModule, PreferenceDataModule, StageCLI
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def run_stage(stage: str, args: list[str], run: bool = True) -> LightningCLI:
    """Run ``rlhf-lightning <stage> <args>`` in this process; returns the CLI object.

    The stage runs in a copy of the current ``contextvars`` context: jsonargparse leaves its last parser
    in a context variable, which would keep the finished stage's module, data and trainer (gigabytes)
    alive while the pipeline's next stage loads.
    """
    return contextvars.copy_context().run(_run_stage, stage, args, run)


def _run_stage(stage: str, args: list[str], run: bool) -> LightningCLI:
    module, datamodule, cli_class = stage_classes(stage)
    with warnings.catch_warnings():
        # Lightning warns when `args` is given while sys.argv holds arguments too (ours, or pytest's);
        # `args` is what counts. sys.argv itself stays untouched: DDP's launcher re-runs it on each rank.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return cli_class(
            module,
            datamodule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"rlhf-lightning {stage}", "default_env": False},
            auto_configure_optimizers=False,
        )
