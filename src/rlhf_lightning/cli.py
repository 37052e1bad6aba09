"""The command line: one LightningCLI per stage, plus the pipeline and the evaluation.

    rlhf-lightning sft fit -c configs/sft.yaml
    rlhf-lightning reward fit -c configs/reward.yaml
    rlhf-lightning ppo fit -c configs/ppo.yaml
    rlhf-lightning pipeline -c configs/pipeline.yaml
    rlhf-lightning evaluate --policy runs/ppo/export ...

Each stage takes any subclass of its module and DataModule (``model.class_path``), so an experiment
can swap one component from the YAML. The DataModule's tokenizer is linked to the module's model.
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.errors import InputError, StageStopped

STAGES = ("sft", "reward", "ppo")
USAGE = """usage: rlhf-lightning {sft,reward,ppo} {fit,validate} -c CONFIG [--key value ...]
       rlhf-lightning pipeline -c configs/pipeline.yaml
       rlhf-lightning evaluate --help

Stages of the RLHF recipe (each a LightningCLI; try `rlhf-lightning sft fit --help`):
  sft       supervised fine-tuning on demonstrations
  reward    reward model from pairwise or K-way ranked preferences
  ppo       PPO against the reward model with a KL penalty to the SFT policy
  pipeline  all three stages, then the evaluation, from one config
  evaluate  win rates, reward-model accuracy, KL and gold-vs-proxy reward of trained policies
"""


class StageCLI(LightningCLI):
    """LightningCLI that feeds the module's model name to the DataModule's tokenizer, picks the precision
    for the machine when the config does not set ``trainer.precision``, and turns a stop by SIGTERM or
    Ctrl-C into :class:`StageStopped`."""

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
        return next((c.saved for c in self.trainer.callbacks if getattr(c, "saved", None)), None)


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
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def run_stage(stage: str, args: list[str], run: bool = True) -> LightningCLI:
    """Run ``rlhf-lightning <stage> <args>`` in this process; returns the CLI object."""
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


# Library messages a user of this command cannot act on: Lightning's advertisements, the model summary's
# note that it sizes bf16 weights as fp32, deprecations inside the libraries themselves, and a warning
# about modules in eval mode (PPO's frozen models are, by design).
_NOISE_WARNINGS = (
    r"Precision .* is not supported by the model summary",
    r".*isinstance\(treespec, LeafSpec\)",
    r".*`torch_dtype` is deprecated",
    r"The `srun` command is available",
    r"Found \d+ module\(s\) in eval mode",  # PPO's frozen reference and reward model, on purpose
)


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_library_noise() -> None:
    """Silence the messages in ``_NOISE_WARNINGS`` and Lightning's tips; everything else still shows."""
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertisements())
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # load reports of heads a stage initialises on purpose
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rlhf-lightning`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_noise()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGES:
            run_stage(command, rest)
            return 0
        if command == "pipeline":
            from rlhf_lightning.pipeline import main as pipeline_main

            return pipeline_main(rest)
        if command == "evaluate":
            from rlhf_lightning.evaluation import main as evaluate_main

            return evaluate_main(rest)
    except InputError as err:
        print(f"rlhf-lightning {command}: error: {err}", file=sys.stderr)
        return 2
    except StageStopped as stop:
        if command in STAGES:
            how = "run the same command with --ckpt_path last" if stop.checkpoint else "run the same command"
        else:
            how = "run the same command: finished stages are kept" + (
                ", this one continues from its checkpoint" if stop.checkpoint else ", this one starts over"
            )
        print(f"rlhf-lightning {command}: stopped: {stop}. To resume, {how}.", file=sys.stderr)
        return stop.exit_status
    print(f"rlhf-lightning: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
