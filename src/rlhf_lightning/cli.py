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

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from rlhf_lightning.errors import InputError

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
    """LightningCLI that feeds the module's model name to the DataModule's tokenizer."""

    model_key = "model"

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(f"model.init_args.{self.model_key}", "data.init_args.tokenizer")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rlhf-lightning`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    print(f"rlhf-lightning: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
