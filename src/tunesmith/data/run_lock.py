"""One writer per run name: `prepare` holds an exclusive lock file `<output_dir>/.<name>.lock` while it works.

Without it, two prepares of one name both succeed and the second silently replaces the first. The lock is a
non-blocking `flock`, so a crashed holder never leaves a stale lock behind; the file holds the holder's pid.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TunesmithError


@contextmanager
def run_lock(run_dir: Path):
    """Hold the lock of `run_dir` (a file beside it); a TunesmithError naming the holder if another process has it."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked rather than not at all
        yield
        return
    run_dir = Path(run_dir)
    path = run_dir.parent / f".{run_dir.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _acquire(fcntl, path, run_dir.name)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        # Unlink while still locked: a waiter that opened this file sees it replaced and tries again.
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _acquire(fcntl, path: Path, name: str) -> int:
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise TunesmithError(f"another prepare of {name} is running (pid {holder}); wait for it to finish, "
                                 f"or use another name (name=...)") from None
        try:
            same_file = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return descriptor
        os.close(descriptor)  # the holder finished and removed this file meanwhile; lock the new one
