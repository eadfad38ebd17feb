"""What machine a speed decision was timed on, and whether this one is the same.

`compress --speed` keeps each factor in the layout its matmul runs fastest in, puts back dense
the modules whose factors time slower, and (with a budget) caps ranks at the highest one faster
than dense. All of that is a measurement of one machine: the same cut timed on another CPU
chose very different limits. So the decisions
record where they were made, and loading them elsewhere says so.
"""

from __future__ import annotations

import platform
import resource
from pathlib import Path
from typing import Any

import torch

from .errors import RankcutError

CPUINFO = "/proc/cpuinfo"


def cpu_field(name: str, cpuinfo: str | Path = CPUINFO) -> str | None:
    """One field of the first processor in the kernel's cpuinfo (Linux); None elsewhere."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_multiplies_bf16(cpuinfo: str | Path = CPUINFO) -> bool | None:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX), from the kernel's
    flags; None where they cannot be read (not Linux). Without them PyTorch emulates bfloat16 and
    `--precision bf16` is slower than fp32 instead of faster."""
    flags = cpu_field("flags", cpuinfo)
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The facts a timing depends on: the processor (or GPU), and the CPU threads PyTorch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = cpu_field("model name") or platform.processor() or platform.machine() or "unknown"
    return {"device": device.type, "processor": processor, "threads": torch.get_num_threads()}


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the machine a decision was timed on differs from this one: none when they match, or when
    the record is of another device type, which this machine cannot be compared with."""
    if recorded.get("device") != current.get("device"):
        return []
    return [f"{key} {recorded.get(key)!r} there, {current.get(key)!r} here"
            for key in ("processor", "threads") if recorded.get(key) != current.get(key)]


def resolve_device(name: str | torch.device) -> torch.device:
    """The device a user named, checked before any model is loaded: a typo or a GPU this PyTorch
    build cannot reach would otherwise surface as a traceback from inside `Module.to`.
    `auto`: the first GPU if this PyTorch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RankcutError(f"unknown device '{name}'; give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise RankcutError(f"device '{name}' is not available ({build}); use --device cpu, or install a "
                               "CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RankcutError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) are visible "
                               f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise RankcutError(f"device '{name}' is not supported; give auto, cpu, cuda or cuda:N")
    return device


def current_rss_mb() -> float:
    """Resident memory now (MiB); the high-water mark where /proc is not there to read."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return high_water_rss_mb()


def high_water_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; ru_maxrss is KiB on Linux, bytes on macOS)."""
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
