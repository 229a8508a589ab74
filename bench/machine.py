"""The machine a benchmark ran on: CPU model, the ISA flags that matter for fp32 GEMMs, the load average; and this
process's memory as /proc/self/status reports it."""
from __future__ import annotations

from pathlib import Path

from sharedllm.machine import cpu_flags, cpu_model

ISA = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "neon", "sve")


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssFile, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/self/status has no {field}")


def cpu_info() -> dict:
    """CPU model and the ISA flags above (sharedllm.machine reads /proc/cpuinfo)."""
    flags = cpu_flags()
    return {"model": cpu_model(), "isa": [f for f in ISA if f in flags]}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def describe() -> str:
    info = cpu_info()
    return f"CPU {info['model']} ({' '.join(info['isa'])}); load average {load_average()}"
