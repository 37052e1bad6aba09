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
faults = []
for _ in range(8):  # a 100 MB tensor allocated, touched and freed again, as a training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(25_000_000).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
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
    pages = 100_000_000 // 4096  # one tensor, 4 KiB pages
    # glibc's default: mmap'ed, unmapped on free, so every allocation is faulted in again
    assert all(n > 0.9 * pages for n in default["faults"][-3:])
    # tuned: once the heap has settled (measured: faults in at most the first 3 of 8), freed blocks are reused
    assert sum(tuned["faults"][-3:]) < 0.1 * pages


def test_the_tuning_can_be_turned_off():
    assert _probe("tuned", {"RLHF_LIGHTNING_MALLOC": "default"})["tuned"] is False
