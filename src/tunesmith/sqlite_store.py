"""The SQLite files tunesmith keeps state in (API keys and usage, fine-tuning jobs): opened in WAL mode with a
versioned schema, written in IMMEDIATE transactions. stdlib only."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TunesmithError


def open_versioned(path: Path, schema: str, version: int, what: str, private: bool = False) -> sqlite3.Connection:
    """`path` opened for several threads, its schema created on first use; a file that is not a database or was
    written by a newer tunesmith is one clear error naming `what` it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        connection = sqlite3.connect(path, check_same_thread=False, timeout=10, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        found = connection.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise TunesmithError(f"{what} {path}: cannot open it ({exc}); move the file away to start a new one") from None
    if found > version:
        raise TunesmithError(f"{what} {path}: written by a newer tunesmith (schema {found}, this one reads "
                             f"{version}); upgrade tunesmith")
    if found == 0:
        if private:
            path.chmod(0o600)
        # IF NOT EXISTS in the schema: two processes opening a new file at once both succeed.
        connection.executescript(f"BEGIN IMMEDIATE; {schema} PRAGMA user_version = {version}; COMMIT;")
    return connection


@contextmanager
def write_transaction(connection: sqlite3.Connection, lock: threading.Lock) -> Iterator[sqlite3.Connection]:
    """One write transaction; IMMEDIATE takes the file's write lock up front, so checks made inside it hold."""
    with lock:
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
