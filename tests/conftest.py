"""Shared fixtures: tiny tokenizer, data files written under ``tmp_path``, TensorBoard scalars, the
scripts of ``scripts/`` as modules, and a finished run's layout over the tiny exports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIGS = REPO_ROOT / "configs" / "tiny"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core box slow generation ~100x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhf_lightning.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path):
    """``write_jsonl(rows, name="data.jsonl") -> Path``: one JSON object per line under ``tmp_path``."""

    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return path

    return write


@pytest.fixture(scope="session")
def read_scalars():
    """``read_scalars(log_dir) -> {tag: [(step, value), ...]}`` from the one TensorBoard event file there."""

    def read(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
        assert len(files) == 1, f"expected one event file under {log_dir}, found {files}"
        acc = EventAccumulator(str(files[0]))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    return read


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """A tiny SFT-policy export and reward-model export (with reward stats), and small data files.

    Returns a dict of paths: ``policy``, ``reward``, ``sft_data``, ``preferences``, ``prompts``.
    """
    from rlhf_lightning.models import load_causal_lm, load_reward_model, save_hf, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_exports")
    tokenizer = tiny_tokenizer()
    save_hf(load_causal_lm("tiny:llama"), tokenizer, root / "policy")
    stats = {"reward_stats.json": {"mean": 0.0, "std": 1.0, "source": "test"}}
    save_hf(load_reward_model("tiny:llama"), tokenizer, root / "reward", stats)
    fruits = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
    files = {
        "sft_data": [
            {"prompt": [{"role": "user", "content": f"Say {w}"}], "completion": f"{w} {w}!"}
            for w in fruits * 3
        ],
        "preferences": [
            {
                "prompt": [{"role": "user", "content": f"About {w}?"}],
                "chosen": f"{w}, thanks",
                "rejected": f"{w}, no",
            }
            for w in fruits
        ][:7],
        "prompts": [{"prompt": [{"role": "user", "content": f"Tell me about {w}"}]} for w in fruits * 2],
    }
    out = {"policy": root / "policy", "reward": root / "reward"}
    for name, rows in files.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = path
    return out


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    """:func:`load_script`, for tests of ``scripts/``."""
    return load_script


@pytest.fixture
def tiny_run(tiny_exports, tmp_path):
    """A finished pipeline run's layout (``<run>/{sft,reward}/export``) over the tiny exports."""
    run = tmp_path / "run"
    for stage, export in (("sft", "policy"), ("reward", "reward")):
        (run / stage).mkdir(parents=True)
        (run / stage / "export").symlink_to(tiny_exports[export])
    return run
