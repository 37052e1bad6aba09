"""The fastest exact-enough precision for the machine a run is on.

bf16 autocast halves the cost of every matmul where the hardware has bf16 instructions (AVX-512 BF16
or AMX on x86 CPUs, Ampere or newer GPUs), and is catastrophic where it has not: on an AVX2-only CPU
PyTorch emulates bf16 and a 2048² matmul runs at about 0.3 GFLOP/s against 130-170 in fp32. So the
choice is made per machine, once, here: every stage (when ``trainer.precision`` is not set) and the
evaluation and demo-data sampling use it.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); ``None`` where there is no such file."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return None
    for line in info.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def _bf16_probe(size: int = 128, repeats: int = 3) -> bool:
    """Where flags cannot be read: bf16 counts as native if a small bf16 matmul is not much slower than fp32."""
    a = torch.randn(size, size)

    def best(x):
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - began)
        return min(times)

    return best(a.bfloat16()) < 4 * best(a)


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX)."""
    flags = _cpu_flags()
    if flags is not None:
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    return _bf16_probe()


def cpu_description() -> str:
    """The CPU's vector capability in a few words, for logs and benchmark reports."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags() or set()
    native = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return f"{capability}" + (f" with {' and '.join(native).upper()}" if native else ", no native bf16")


def auto_precision() -> tuple[str, str]:
    """``(precision, reason)``: ``bf16-mixed`` where bf16 matmuls are native, else ``32-true``."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"GPU {torch.cuda.get_device_name()} supports bf16"
        return "32-true", f"GPU {torch.cuda.get_device_name()} has no native bf16"
    if cpu_bf16_native():
        return "bf16-mixed", f"CPU {cpu_description()}"
    return "32-true", f"CPU {cpu_description()}: bf16 would be emulated, hundreds of times slower"


def inference_autocast(device: torch.device | str = "cpu", precision: str | None = None):
    """Autocast for sampling and scoring outside a Trainer: bf16 where :func:`auto_precision` picks it."""
    precision = precision or auto_precision()[0]
    if precision.startswith("bf16"):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()
