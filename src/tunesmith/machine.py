"""What the machine we run on offers: the precision that pays off (training's autocast, serving's weights) and its
cores."""

from __future__ import annotations

import os


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(requested: str) -> str:
    """`bf16` or `fp32`; `auto` picks bf16 on CUDA GPUs that support it and on CPUs with bf16 instructions."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_cpu_threads(requested: int | None) -> int:
    """Use the requested thread count, else every core this process may run on."""
    import torch

    torch.set_num_threads(max(1, requested or available_cores()))
    return torch.get_num_threads()


def return_freed_memory() -> None:
    """Hand memory freed by loading (fp32 copies converted to bf16, peft wrappers) back to the system, so that a
    server's resident size says what it holds; glibc keeps it otherwise. A no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
