"""Follow registry aliases while serving: a promotion or rollback reaches the server without a restart."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from tunesmith.errors import TunesmithError
from tunesmith.serve.engine import ServingEngine


def start_alias_watcher(engine: ServingEngine, every_seconds: float,
                        on_change: Callable[[str], None] = print) -> Callable[[], None]:
    """Check the served aliases every `every_seconds` in a daemon thread, telling `on_change` what moved (or could
    not); returns the function that stops it."""
    if not every_seconds > 0:
        raise TunesmithError(f"alias check interval: {every_seconds} s; give a positive number of seconds")
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(every_seconds):
            try:
                for change in engine.refresh_aliases():
                    on_change(change)
            except Exception:  # our bug (or on_change's): said once, and the next check still runs
                logging.getLogger(__name__).exception("checking the served aliases failed")

    thread = threading.Thread(target=watch, name="tunesmith-alias-watcher", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)  # a load under way finishes on its own; a daemon thread never blocks the exit

    return stop
