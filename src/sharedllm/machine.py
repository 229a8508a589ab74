"""What CPU this is, from /proc/cpuinfo (Linux), read once: its model name and ISA flags."""
from __future__ import annotations

import functools
import platform


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
