"""What this CPU can run, read in one place: the instruction-set flags the kernel reports in /proc/cpuinfo.

Code that picks a kernel or a build target by CPU feature asks here (not torch's private `torch.cpu._is_*`
helpers), so one monkeypatch of `cpu_flags` simulates another CPU in tests.
"""

from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (`avx2`, `fma`, `avx512_bf16`, ...; `Features` on Arm); empty
    where /proc/cpuinfo cannot be read (not Linux), i.e. unknown."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        if line.startswith(("flags", "Features")):  # every core lists the same flags: the first line is enough
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_avx512_bf16() -> bool:
    """AVX512-BF16: bf16 dot products in hardware (without it bf16 matrix products are emulated)."""
    return "avx512_bf16" in cpu_flags()


def has_amx_tile() -> bool:
    """AMX tiles (Sapphire Rapids and later): oneDNN's bf16/int8 matrix engine."""
    return "amx_tile" in cpu_flags()
