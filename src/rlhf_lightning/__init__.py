"""rlhf-lightning: SFT -> reward model -> PPO with a KL penalty, as PyTorch Lightning components."""

__version__ = "0.1.0"

_LAZY = {
    "SFTModule": "rlhf_lightning.modules.sft",
    "RewardModule": "rlhf_lightning.modules.reward",
    "PPOModule": "rlhf_lightning.modules.ppo",
    "SFTDataModule": "rlhf_lightning.data.sft",
    "PreferenceDataModule": "rlhf_lightning.data.preference",
    "PromptDataModule": "rlhf_lightning.data.prompts",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhf_lightning' has no attribute {name!r}")
