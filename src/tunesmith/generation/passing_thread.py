"""Run one-off work that computes with PyTorch (loading a model) in a thread of its own that ends with the work.

PyTorch's CPU build runs its parallel ops on GNU OpenMP, which keeps a team of worker threads for every thread that
ever ran a parallel region, for as long as that thread lives. Once the workers of all teams outnumber the cores,
libgomp stops them spinning between regions and every parallel op pays a wake-up: on the 2-core machine we measure
on, a 16-row linear layer took 0.26 ms on the decoding thread instead of 0.14 ms once another live thread had
computed, and the server, whose main thread loaded the model, decoded a quarter slower than the same engine driven
from the main thread. A team goes away with its thread, so the decoding thread must be the only long-lived thread
that computes: loads run here, in a thread that ends when they do.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def in_passing_thread(work: Callable[[], T]) -> T:
    """`work()` run in a new thread that ends with it; its result, or its exception raised here."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # re-raised in the caller's thread, whatever it is
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="tunesmith-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
