"""The fine-tuning API's state: one SQLite file (WAL) for files, jobs, their events and checkpoints, and the
uploaded bytes beside it. Every read a caller makes is filtered by owner: the API key id, or None on a server
without keys (where everyone is the same owner)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, Literal

from tunesmith.errors import TunesmithError
from tunesmith.jobs.records import CheckpointLine, JobEventLine
from tunesmith.models import tunesmith_home
from tunesmith.registry.run_dir import apply_umask, fsync_path
from tunesmith.sqlite_store import open_versioned, write_transaction

SCHEMA_VERSION = 1
CHUNK_BYTES = 2**20
FINISHED = ("succeeded", "failed", "cancelled")
_NEXT_STATUS = {  # action -> (statuses it applies to, status it leads to)
    "cancel": (("validating_files", "queued", "running", "paused"), "cancelled"),
    "pause": (("validating_files", "queued", "running"), "paused"),
    "resume": (("paused",), "queued"),
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT, owner_name TEXT,
    created_at INTEGER NOT NULL, status TEXT NOT NULL, model TEXT NOT NULL, base_model TEXT NOT NULL,
    method TEXT NOT NULL, hyperparameters TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    suffix TEXT, seed INTEGER NOT NULL, metadata TEXT, planned_model TEXT NOT NULL, fine_tuned_model TEXT,
    registry_reference TEXT, finished_at INTEGER, trained_tokens INTEGER, estimated_finish INTEGER,
    result_files TEXT NOT NULL, error TEXT, pid INTEGER, crashes INTEGER NOT NULL,
    events_read INTEGER NOT NULL, checkpoints_read INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step_number INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL,
    fine_tuned_model_checkpoint TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints(job_id, seq);
"""
_JSON_COLUMNS = {"hyperparameters", "metadata", "result_files", "error", "data", "metrics"}


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str | None
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str | None
    owner_name: str | None
    created_at: int
    status: str
    model: str
    """The base as the client named it."""
    base_model: str
    """What tunesmith's config takes as `base_model`."""
    method: str
    hyperparameters: dict
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    metadata: dict | None
    planned_model: str
    """The name the result will be served under; `fine_tuned_model` is set to it (or the runner's) on success."""
    fine_tuned_model: str | None
    registry_reference: str | None
    finished_at: int | None
    trained_tokens: int | None
    estimated_finish: int | None
    result_files: list
    error: dict | None
    pid: int | None
    """The runner process while one runs the job."""
    crashes: int
    """Runner exits without a result that nobody asked for."""
    events_read: int
    """Bytes of events.jsonl already copied into the store."""
    checkpoints_read: int


@dataclass(frozen=True)
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict | None


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    job_id: str
    created_at: int
    step_number: int
    metrics: dict
    path: str
    fine_tuned_model_checkpoint: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def fine_tuned_model_name(model: str, owner_name: str | None, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape, `ft:<base>:<owner>:<suffix>:<id>`, with the job id's hex part as the id."""
    return f"ft:{model}:{owner_name or 'tunesmith'}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def _columns(record_type) -> str:
    return ", ".join(field.name for field in fields(record_type))


def _record(record_type, row: tuple):
    values = {field.name: (json.loads(value) if field.name in _JSON_COLUMNS and value is not None else value)
              for field, value in zip(fields(record_type), row)}
    return record_type(**values)


def _encoded(value):
    return json.dumps(value) if isinstance(value, (dict, list)) else value


class JobStore:
    """Files, jobs, events and checkpoints of the fine-tuning API; safe to share between threads."""

    def __init__(self, home: Path | None = None):
        self.root = Path(home if home is not None else tunesmith_home()).resolve() / "jobs"
        self.files_dir = self.root / "files"
        self.runs_dir = self.root / "runs"
        self.path = self.root / "jobs.sqlite"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = self._open()

    def _open(self) -> sqlite3.Connection:
        return open_versioned(self.path, _SCHEMA, SCHEMA_VERSION, "jobs store")

    def close(self) -> None:
        self._connection.close()

    def _transaction(self):
        return write_transaction(self._connection, self._lock)

    def _rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connection.execute(sql, params).fetchall()

    def _page(self, table: str, record_type, where: str, params: tuple, after: str | None, limit: int,
              order: Literal["asc", "desc"] = "desc") -> tuple[list, bool]:
        """One page of `table` rows matching `where`, after the row with id `after`; and whether more follow."""
        if after is not None:
            found = self._rows(f"SELECT seq FROM {table} WHERE id = ? AND {where}", (after, *params))
            if not found:
                raise TunesmithError(f"after={after!r}: no such id in this list; pass the last id of the "
                                     "previous page")
            where, params = f"{where} AND seq {'<' if order == 'desc' else '>'} ?", (*params, found[0][0])
        rows = self._rows(f"SELECT {_columns(record_type)} FROM {table} WHERE {where} "
                          f"ORDER BY seq {order.upper()} LIMIT ?", (*params, limit + 1))
        return [_record(record_type, row) for row in rows[:limit]], len(rows) > limit

    # --- files -------------------------------------------------------------------------------------------------

    def add_file(self, owner: str | None, filename: str, purpose: str, source: BinaryIO,
                 max_bytes: int | None) -> FileRecord:
        """Stream `source` to disk (fsync'd, then renamed into place) and record it; over `max_bytes` is refused."""
        size, digest = 0, hashlib.sha256()
        descriptor, temporary = tempfile.mkstemp(dir=self.files_dir, prefix=".upload-")
        try:
            apply_umask(Path(temporary), directory=False)
            with os.fdopen(descriptor, "wb") as target:
                while chunk := source.read(CHUNK_BYTES):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TunesmithError(f"file {filename!r} is over the {max_bytes // 2**20} MB upload limit; "
                                             "split it, or raise serve.jobs.max_file_mb")
                    digest.update(chunk)
                    target.write(chunk)
                target.flush()
                os.fsync(target.fileno())
            record = FileRecord(new_id("file"), owner, filename, purpose, size, digest.hexdigest(), int(time.time()))
            os.replace(temporary, self.file_path(record.id))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        fsync_path(self.files_dir)
        with self._transaction() as db:
            db.execute(f"INSERT INTO files ({_columns(FileRecord)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (record.id, owner, filename, purpose, size, record.sha256, record.created_at))
        return record

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def get_file(self, owner: str | None, file_id: str) -> FileRecord | None:
        rows = self._rows(f"SELECT {_columns(FileRecord)} FROM files WHERE id = ? AND owner IS ?", (file_id, owner))
        return _record(FileRecord, rows[0]) if rows else None

    def list_files(self, owner: str | None, purpose: str | None = None, after: str | None = None,
                   limit: int = 10000, order: Literal["asc", "desc"] = "desc") -> tuple[list[FileRecord], bool]:
        """The owner's files in upload order (newest first for "desc"), and whether more follow."""
        return self._page("files", FileRecord, "owner IS ? AND (? IS NULL OR purpose = ?)", (owner, purpose, purpose),
                          after, limit, order)

    def delete_file(self, owner: str | None, file_id: str) -> bool:
        """Forget the owner's file and its bytes; False when the owner has no such file."""
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND owner IS ?", (file_id, owner)).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    # --- jobs --------------------------------------------------------------------------------------------------

    def add_job(self, owner: str | None, owner_name: str | None, model: str, base_model: str, training_file: str,
                validation_file: str | None = None, method: str = "supervised", hyperparameters: dict | None = None,
                suffix: str | None = None, seed: int = 0, metadata: dict | None = None) -> JobRecord:
        """A new job, `validating_files` until the supervisor checks its files and queues it; its first events
        (created, validating) are written with it, so they always come first."""
        job_id = new_id("ftjob")
        job = JobRecord(job_id, owner, owner_name, int(time.time()), "validating_files", model, base_model, method,
                        hyperparameters or {}, training_file, validation_file, suffix, seed, metadata,
                        fine_tuned_model_name(model, owner_name, suffix, job_id), None, None, None, None, None, [],
                        None, None, 0, 0, 0)
        values = tuple(_encoded(getattr(job, field.name)) for field in fields(JobRecord))
        validating = f"Validating training file: {training_file}" + (
            f" and validation file: {validation_file}" if validation_file else "")
        with self._transaction() as db:
            db.execute(f"INSERT INTO jobs ({_columns(JobRecord)}) VALUES ({', '.join('?' * len(values))})", values)
            for message in (f"Created fine-tuning job: {job_id}", validating):
                self._insert_event(db, job_id, JobEventLine(created_at=job.created_at, message=message))
        return job

    def get_job(self, owner: str | None, job_id: str) -> JobRecord | None:
        rows = self._rows(f"SELECT {_columns(JobRecord)} FROM jobs WHERE id = ? AND owner IS ?", (job_id, owner))
        return _record(JobRecord, rows[0]) if rows else None

    def job(self, job_id: str) -> JobRecord:
        """Any owner's job (for the supervisor, never for a caller)."""
        return _record(JobRecord, self._rows(f"SELECT {_columns(JobRecord)} FROM jobs WHERE id = ?", (job_id,))[0])

    def jobs_to_supervise(self) -> list[JobRecord]:
        """Jobs waiting for their files' check, and jobs a runner may still hold (running, or a pid recorded)."""
        return [_record(JobRecord, row) for row in self._rows(
            f"SELECT {_columns(JobRecord)} FROM jobs WHERE status IN ('validating_files', 'running') "
            "OR pid IS NOT NULL ORDER BY seq")]

    def list_jobs(self, owner: str | None, after: str | None = None, limit: int = 20,
                  metadata: dict[str, str] | None = None, without_metadata: bool = False) -> tuple[list, bool]:
        """The owner's jobs newest first; `metadata` keeps those holding every pair, `without_metadata` those
        with none."""
        where, params = "owner IS ?", [owner]
        if without_metadata:
            where += " AND metadata IS NULL"
        for key, value in (metadata or {}).items():
            where += " AND EXISTS (SELECT 1 FROM json_each(jobs.metadata) WHERE key = ? AND value = ?)"
            params += [key, value]
        return self._page("jobs", JobRecord, where, tuple(params), after, limit)

    def update_job(self, job_id: str, when_status: str | None = None, **changes) -> bool:
        """Set columns of a job; with `when_status`, only while it still has that status (False otherwise)."""
        unknown = set(changes) - {field.name for field in fields(JobRecord)}
        assert not unknown and "id" not in changes, f"not job columns: {unknown}"
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._transaction() as db:
            return db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND (? IS NULL OR status = ?)",
                              (*map(_encoded, changes.values()), job_id, when_status, when_status)).rowcount > 0

    def claim_next_queued(self, exclude: Collection[str] = ()) -> JobRecord | None:
        """Move the oldest queued job (not in `exclude`) to running, atomically, and return it."""
        with self._transaction() as db:
            for (job_id,) in db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq").fetchall():
                if job_id not in exclude:
                    db.execute("UPDATE jobs SET status = 'running', estimated_finish = NULL WHERE id = ?", (job_id,))
                    row = db.execute(f"SELECT {_columns(JobRecord)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    return _record(JobRecord, row)
        return None

    def request(self, job_id: str, action: Literal["cancel", "pause", "resume"]) -> JobRecord:
        """Apply a caller's cancel/pause/resume to the job's status at once; the supervisor stops its runner."""
        allowed, status = _NEXT_STATUS[action]
        with self._transaction() as db:
            current = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            if current not in allowed:
                raise TunesmithError(f"job {job_id} is {current}; only {' or '.join(allowed)} jobs can be "
                                     f"{'cancelled' if action == 'cancel' else action + 'd'}")
            finished_at = int(time.time()) if status in FINISHED else None
            db.execute("UPDATE jobs SET status = ?, finished_at = ?, estimated_finish = NULL WHERE id = ?",
                       (status, finished_at, job_id))
            return _record(JobRecord, db.execute(f"SELECT {_columns(JobRecord)} FROM jobs WHERE id = ?",
                                                 (job_id,)).fetchone())

    def job_dir(self, job_id: str) -> Path:
        return self.runs_dir / job_id

    def succeeded_jobs(self) -> list[JobRecord]:
        return [_record(JobRecord, row) for row in self._rows(
            f"SELECT {_columns(JobRecord)} FROM jobs WHERE status = 'succeeded' ORDER BY seq")]

    # --- events and checkpoints ----------------------------------------------------------------------------------

    def add_event(self, job_id: str, line: JobEventLine, read_to: int | None = None) -> str:
        """Record one event; `read_to` also moves the job's events.jsonl position, in the same transaction."""
        with self._transaction() as db:
            event_id = self._insert_event(db, job_id, line)
            if read_to is not None:
                db.execute("UPDATE jobs SET events_read = ? WHERE id = ?", (read_to, job_id))
        return event_id

    @staticmethod
    def _insert_event(db: sqlite3.Connection, job_id: str, line: JobEventLine) -> str:
        event_id = new_id("ftevent")
        db.execute(f"INSERT INTO events ({_columns(EventRecord)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (event_id, job_id, line.created_at, line.level, line.message, line.type, _encoded(line.data)))
        return event_id

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[EventRecord], bool]:
        """A job's events newest first, as OpenAI lists them."""
        return self._page("events", EventRecord, "job_id = ?", (job_id,), after, limit)

    def add_checkpoint(self, job_id: str, line: CheckpointLine, read_to: int | None = None) -> str:
        """Record one complete checkpoint (`ftckpt-...`); `read_to` moves the job's checkpoints.jsonl position."""
        checkpoint_id = new_id("ftckpt")
        with self._transaction() as db:
            db.execute(f"INSERT INTO checkpoints ({_columns(CheckpointRecord)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (checkpoint_id, job_id, line.created_at, line.step_number, json.dumps(line.metrics),
                        line.path, line.fine_tuned_model_checkpoint))
            if read_to is not None:
                db.execute("UPDATE jobs SET checkpoints_read = ? WHERE id = ?", (read_to, job_id))
        return checkpoint_id

    def list_checkpoints(self, job_id: str, after: str | None = None,
                         limit: int = 10) -> tuple[list[CheckpointRecord], bool]:
        """A job's checkpoints newest first."""
        return self._page("checkpoints", CheckpointRecord, "job_id = ?", (job_id,), after, limit)

    def all_checkpoints(self) -> list[CheckpointRecord]:
        return [_record(CheckpointRecord, row) for row in self._rows(
            f"SELECT {_columns(CheckpointRecord)} FROM checkpoints ORDER BY seq")]
