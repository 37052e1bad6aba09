"""glibc malloc kept from unmapping freed blocks: a tensor allocated again is not faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, torch
from rlhf_lightning.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(25_000_000).sum()  # 100 MB: first use
before = faults()
for _ in range(5):
    torch.ones(25_000_000).sum()  # allocated, touched, freed again
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""


def _probe(mode: str, env: dict | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_reused_tensors_are_not_faulted_in_again():
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["tuned"] is True
    pages = 5 * 100_000_000 // 4096  # five 100 MB tensors, 4 KiB pages
    assert default["faults"] > 0.8 * pages  # glibc's default: mmap'ed, unmapped on free, faulted in again
    assert tuned["faults"] < 0.25 * pages  # kept on the heap and reused (measured: one tensor's worth of 5)


def test_the_tuning_can_be_turned_off():
    assert _probe("tuned", {"RLHF_LIGHTNING_MALLOC": "default"})["tuned"] is False
