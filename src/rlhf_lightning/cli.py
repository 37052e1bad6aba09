"""The command line: one LightningCLI per stage, plus the pipeline and the evaluation.

    rlhf-lightning sft fit -c configs/sft.yaml
    rlhf-lightning reward fit -c configs/reward.yaml
    rlhf-lightning ppo fit -c configs/ppo.yaml
    rlhf-lightning dpo fit -c configs/dpo.yaml
    rlhf-lightning pipeline -c configs/pipeline.yaml
    rlhf-lightning evaluate --policy runs/ppo/export ...

The stages' LightningCLIs live in ``stages.py``; the pipeline and the evaluation in their own modules.
"""

from __future__ import annotations

import logging
import sys
import warnings

from rlhf_lightning.allocator import keep_freed_memory
from rlhf_lightning.errors import InputError, StageStopped, StorageError
from rlhf_lightning.stages import STAGES, run_stage

USAGE = """usage: rlhf-lightning {sft,reward,ppo,dpo} {fit,validate} -c CONFIG [--key value ...]
       rlhf-lightning pipeline -c configs/pipeline.yaml
       rlhf-lightning evaluate --help

Stages of the RLHF recipe (each a LightningCLI; try `rlhf-lightning sft fit --help`):
  sft       supervised fine-tuning on demonstrations
  reward    reward model from pairwise or K-way ranked preferences
  ppo       PPO against the reward model with a KL penalty to the SFT policy
  dpo       DPO on the preferences directly: no reward model, no sampling
  pipeline  all three stages, then the evaluation, from one config
  evaluate  win rates, reward-model accuracy, KL and gold-vs-proxy reward of trained policies
"""


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
    keep_freed_memory()
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
            from rlhf_lightning.pipeline import main as pipeline_main  # lazily: a stage needs none of it

            return pipeline_main(rest)
        if command == "evaluate":
            from rlhf_lightning.evaluation import main as evaluate_main

            return evaluate_main(rest)
    except InputError as err:
        print(f"rlhf-lightning {command}: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"rlhf-lightning {command}: error: {err}", file=sys.stderr)
        return 1
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
