"""Every shipped YAML parses against its CLI (types, class paths, option names), without running."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _stage(config: Path) -> str:
    """The stage a config is for: its name up to the first ``_`` (``ppo_gold.yaml`` is a PPO config)."""
    return config.stem.split("_")[0]


STAGE_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if _stage(p) in ("sft", "reward", "ppo", "dpo"))
PIPELINE_CONFIGS = sorted(CONFIGS.rglob("pipeline.yaml"))


def test_every_config_is_covered():
    assert {p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml")} == {
        p.relative_to(CONFIGS) for p in STAGE_CONFIGS + PIPELINE_CONFIGS
    }
    assert len(STAGE_CONFIGS) == 10 and len(PIPELINE_CONFIGS) == 2


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_stage_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([_stage(config), "fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: rlhf_lightning.modules." in printed
    assert "class_path: rlhf_lightning.data." in printed


@pytest.mark.parametrize("config", PIPELINE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_pipeline_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    for key in ("sft_config", "reward_config", "ppo_config"):
        assert key in printed


def test_unknown_config_key_is_a_clear_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tiny" / "sft.yaml").read_text().replace("learning_rate:", "learning_rte:"))
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "fit", "-c", str(bad)])
    assert exit_info.value.code == 2
    assert "learning_rte" in capsys.readouterr().err
