"""What CPU this is, from /proc/cpuinfo (Linux), read once: its model name and ISA flags, and so how bf16 matmuls
run on it."""
from __future__ import annotations

import functools
import os
import platform

import torch


def cpu_flags() -> set:
    """The CPU's ISA flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo has none."""
    return set((_cpuinfo("flags") or _cpuinfo("Features")).split())


def cpu_model() -> str:
    """The CPU's model name, else what `platform` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def _cpuinfo(field: str) -> str:
    line = next((ln for ln in _cpuinfo_lines() if ln.split(":")[0].strip() == field), "")
    return line.partition(":")[2].strip()


@functools.cache
def _cpuinfo_lines() -> tuple:
    try:
        with open("/proc/cpuinfo") as f:
            return tuple(f)
    except OSError:
        return ()


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags under which torch's CPU bf16 matmuls are fast


def bf16_matmuls(device="cpu") -> str:
    """How bf16 matmuls run here: "native", or "emulated" on an x86 CPU without avx512_bf16 / amx_bf16, where
    torch's own bf16 GEMM is 8-80x slower than fp32 (a whole 135M training step ~21x, docs/BENCHMARKS.md). Emulated =
    the same bf16 operands multiplied by fp32 kernels, the result rounded to bf16: the numbers of a native bf16 GEMM
    (fp32 accumulation) up to summation order. $SHAREDLLM_BF16_MATMULS=native|emulated overrides."""
    if torch.device(device).type != "cpu":
        return "native"
    forced = os.environ.get("SHAREDLLM_BF16_MATMULS", "")
    if forced in ("native", "emulated"):
        return forced
    flags = cpu_flags()
    return "emulated" if flags and "avx2" in flags and not set(BF16_CPU_FLAGS) & flags else "native"
