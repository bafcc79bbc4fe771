"""What the CPU can do, read from /proc/cpuinfo: bf16 and INT8 speed-ups depend on it, so it is detected, not assumed."""

from __future__ import annotations

from pathlib import Path

# The flags that decide which kernels run fast, reported beside every timing.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is absent)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def describe_cpu() -> dict[str, object]:
    """The CPU a measurement was taken on: its model name and the flags that matter for speed."""
    flags = cpu_flags()
    return {"model": cpu_model(), "flags": [flag for flag in REPORTED_FLAGS if flag in flags]}
