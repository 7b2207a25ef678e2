"""Choosing thread counts for the machine we run on (precision: tunesmith.precision)."""

from __future__ import annotations

import os


def set_cpu_threads(requested: int | None) -> int:
    """Use the requested thread count, else every core this process may run on."""
    import torch

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, requested or available))
    return torch.get_num_threads()
