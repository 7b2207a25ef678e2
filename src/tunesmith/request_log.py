"""The request log: every request the server answers, one `RequestLogRecord` per line in `requests.jsonl`.

Serving appends (`RequestLogWriter`); monitoring and `tunesmith logs export` read (`read_request_log`). Each
append is flushed and fsynced before it returns, so a crash loses only requests not yet appended. Past
`max_bytes` the active file is renamed `requests-<UTC time>.jsonl` and a new one started. Several threads and
several server processes may append to one directory: an exclusive `flock` on `.lock` orders them.
stdlib + pydantic + `tunesmith.data.pii` only: serve/ and monitor/ both build on it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from tunesmith.data.pii import redact
from tunesmith.errors import TunesmithError
from tunesmith.models import tunesmith_home
from tunesmith.records import FEEDBACK_VERSION, REQUEST_LOG_VERSION, FeedbackRecord, RequestLogRecord

ACTIVE_FILE = "requests.jsonl"
FEEDBACK_FILE = "feedback.jsonl"
LOCK_FILE = ".lock"
ROTATED_TIME_FORMAT = "%Y%m%dT%H%M%S%f"
ROTATED_NAME = re.compile(r"requests-(\d{8}T\d{12})\.jsonl")
AGE = re.compile(r"(\d+)([dhm])")
AGE_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
ContentPolicy = Literal["full", "redacted", "none"]


def default_request_log_dir() -> Path:
    """Where `tunesmith serve` logs requests unless told otherwise."""
    return tunesmith_home() / "requests"


def utc_timestamp(moment: datetime | None = None) -> str:
    """`moment` (default: now) as the log writes times: ISO-8601 UTC with milliseconds and a trailing Z."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A `--since` value as a UTC time: a date or ISO time (`2026-11-01`, UTC unless it says so) or an age
    (`7d`, `24h`, `30m`)."""
    age = AGE.fullmatch(text.strip())
    if age:
        return (now or datetime.now(timezone.utc)) - timedelta(**{AGE_UNITS[age[2]]: int(age[1])})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TunesmithError(f"--since {text!r}: not a date or an age; use e.g. 2026-11-01, "
                             "2026-11-01T08:00:00Z, 7d, 24h or 30m") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def apply_content_policy(record: RequestLogRecord, content: ContentPolicy) -> RequestLogRecord:
    """`record` keeping its texts as sent (full), PII-redacted, or not at all (none); a record that already
    dropped its texts stays `none`."""
    if "none" in (content, record.content):
        return record.model_copy(update={"messages": None, "prompt": None, "answers": [], "content": "none"})
    if content == "redacted":
        messages = None if record.messages is None else [
            {key: value if key == "role" else redact_texts(value) for key, value in message.items()}
            for message in record.messages]
        return record.model_copy(update={"messages": messages, "prompt": redact_texts(record.prompt),
                                         "answers": redact_texts(record.answers), "content": "redacted"})
    return record


def redact_texts(value):
    """Every string inside `value` (a message field, a prompt, the answers) with its PII replaced."""
    if isinstance(value, str):
        return redact(value, Counter())
    if isinstance(value, list):
        return [redact_texts(item) for item in value]
    if isinstance(value, dict):
        return {key: redact_texts(item) for key, item in value.items()}
    return value


class RequestLogWriter:
    """Appends records to `directory`/requests.jsonl durably, rotating it past `max_bytes`; safe across threads."""

    def __init__(self, directory: Path, max_bytes: int = 64 * 2**20, content: ContentPolicy = "full"):
        if max_bytes <= 0:
            raise TunesmithError(f"request log max_bytes is {max_bytes}; it must be a positive number of bytes")
        if content not in ("full", "redacted", "none"):
            raise TunesmithError(f"request log content {content!r}: use full, redacted or none")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.content = content
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TunesmithError(f"cannot write the request log in {self.directory} ({exc.strerror or exc}); "
                                 "choose a writable directory") from None
        self._thread_lock = threading.Lock()
        self._active_fd: int | None = None
        self._closed = False

    def append(self, record: RequestLogRecord) -> None:
        """Write one record (after the content policy) and fsync it; it is on disk when this returns."""
        line = _json_line(apply_content_policy(record, self.content))
        with self._thread_lock:
            if self._closed:
                raise ValueError(f"the request log writer for {self.directory} is closed")
            with self._process_lock():
                fd = self._current_file()
                size = os.fstat(fd).st_size
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                    fd, size = self._current_file(), 0
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, size)  # a full disk must not leave half a line for the next record to join
                    raise

    def close(self) -> None:
        with self._thread_lock:
            if not self._closed:
                for fd in (self._active_fd, self._lock_fd):
                    if fd is not None:
                        os.close(fd)
                self._active_fd, self._closed = None, True

    def __enter__(self) -> RequestLogWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextmanager
    def _process_lock(self):
        """Hold the directory's flock: another process may be appending or rotating (none on Windows)."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _current_file(self) -> int:
        """The open active file, reopened when another process rotated it since our last append."""
        path = self.directory / ACTIVE_FILE
        if self._active_fd is not None:
            try:
                if os.stat(path).st_ino == os.fstat(self._active_fd).st_ino:
                    return self._active_fd
            except FileNotFoundError:
                pass
            os.close(self._active_fd)
            self._active_fd = None
        created = not path.exists()
        self._active_fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        if created:
            _fsync_directory(self.directory)
        else:
            _drop_cut_last_line(self._active_fd)
        return self._active_fd

    def _rotate(self) -> None:
        moment = datetime.now(timezone.utc).replace(tzinfo=None)
        target = self.directory / f"requests-{moment.strftime(ROTATED_TIME_FORMAT)}.jsonl"
        while target.exists():  # two rotations in one microsecond: keep names unique
            moment += timedelta(microseconds=1)
            target = self.directory / f"requests-{moment.strftime(ROTATED_TIME_FORMAT)}.jsonl"
        os.replace(self.directory / ACTIVE_FILE, target)
        os.close(self._active_fd)
        self._active_fd = None
        _fsync_directory(self.directory)


def _json_line(record: RequestLogRecord) -> bytes:
    # A lone surrogate (a client's broken escape) is kept as a \udxxx escape rather than failing the append.
    text = json.dumps(record.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8", "backslashreplace")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_directory(directory: Path) -> None:
    """Make a created or renamed file's name survive a crash (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cut_last_line(fd: int) -> None:
    """Cut off a last line a crashed writer left unfinished, so the next record starts on a line of its own."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - 2**20)
    tail = os.pread(fd, size - start, start)
    while b"\n" not in tail and start > 0:  # a cut line longer than the window read so far
        start = max(0, start - 2**20)
        tail = os.pread(fd, size - start, start)
    os.ftruncate(fd, start + tail.rfind(b"\n") + 1)
    os.fsync(fd)


def request_log_files(directory: Path) -> list[Path]:
    """The log's files oldest first: rotated ones by the time in their name, then the active one."""
    directory = _existing_log_dir(directory)
    active = directory / ACTIVE_FILE
    return _rotated_files(directory) + ([active] if active.exists() else [])


def read_request_log(directory: Path, since: datetime | None = None,
                     model: str | None = None) -> Iterator[RequestLogRecord]:
    """Every record oldest first, from `since` on (UTC if naive) and for `model` (the asked-for, served or
    registry name)."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    directory = _existing_log_dir(directory)
    # The active file is opened before the rotated ones are listed: a rotation in between then shows its
    # records once (the listed file with the open file's inode is skipped), never zero or two times.
    active_path = directory / ACTIVE_FILE
    with ExitStack() as stack:
        try:
            active = stack.enter_context(active_path.open("rb"))
        except FileNotFoundError:
            active = None
        except OSError as exc:
            raise _unreadable(active_path, exc) from None
        active_inode = os.fstat(active.fileno()).st_ino if active else None
        for path in _rotated_files(directory):
            if since and _rotation_time(path) < since:
                continue  # rotated before `since`: every request in it arrived earlier
            try:
                with path.open("rb") as handle:
                    if os.fstat(handle.fileno()).st_ino != active_inode:
                        yield from _matching(_read_records(handle, path, active=False), since, model)
            except OSError as exc:
                raise _unreadable(path, exc) from None
        if active:
            yield from _matching(_read_records(active, active_path, active=True), since, model)


def _existing_log_dir(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise TunesmithError(f"no request log in {directory} (no such directory); serve some requests first, "
                             "or point --dir at the server's request log")
    return directory


def _rotated_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if ROTATED_NAME.fullmatch(path.name))


def _rotation_time(path: Path) -> datetime:
    stamp = ROTATED_NAME.fullmatch(path.name)[1]
    return datetime.strptime(stamp, ROTATED_TIME_FORMAT).replace(tzinfo=timezone.utc)


def _matching(records: Iterator[RequestLogRecord], since: datetime | None, model: str | None):
    for record in records:
        if model is not None and model not in (record.model, record.served, record.registry_model):
            continue
        if since is not None and datetime.fromisoformat(record.time) < since:
            continue
        yield record


def _read_records(handle, path: Path, active: bool, kind: type = RequestLogRecord) -> Iterator:
    line_no, line = 0, handle.readline()
    while line:
        line_no, following = line_no + 1, handle.readline()
        if line.strip():
            record = _parse_line(path, line_no, line, active and not following, kind)
            if record is not None:
                yield record
        line = following


def _unreadable(path: Path, exc: OSError) -> TunesmithError:
    return TunesmithError(f"{path}: cannot read the request log ({exc.strerror or exc}); check its permissions")


_KINDS = {RequestLogRecord: ("request log", REQUEST_LOG_VERSION), FeedbackRecord: ("feedback", FEEDBACK_VERSION)}


def _parse_line(path: Path, line_no: int, line: bytes, cut_allowed: bool, kind: type = RequestLogRecord):
    """One line as a `kind` record; None for the active file's last line when a crash cut it (never acknowledged)."""
    what, latest = _KINDS[kind]
    if cut_allowed and not line.endswith(b"\n"):
        return None
    try:
        value = json.loads(line)
    except ValueError as exc:
        if cut_allowed:
            return None
        raise TunesmithError(f"{path}:{line_no}: not a {what} record (bad JSON: {exc}); "
                             "delete that line or move the file out of the log directory") from None
    version = value.get("version") if isinstance(value, dict) else None
    if isinstance(version, int) and version > latest:
        raise TunesmithError(f"{path}:{line_no}: {what} version {version} is newer than this tunesmith reads "
                             f"(up to {latest}); upgrade tunesmith")
    try:
        return kind.model_validate(value)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "the line"
        raise TunesmithError(f"{path}:{line_no}: not a {what} record ({where}: {problem['msg']}); "
                             "delete that line or move the file out of the log directory") from None


# --- feedback ---------------------------------------------------------------------------------------------------

def append_feedback(directory: Path, record: FeedbackRecord) -> None:
    """Append one feedback record to `directory`/feedback.jsonl, fsync'd (feedback is small: never rotated)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":")) + "\n")
    fd = os.open(directory / FEEDBACK_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        _drop_cut_last_line(fd)
        _write_all(fd, line.encode("utf-8", "backslashreplace"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_feedback(directory: Path, since: datetime | None = None) -> Iterator[FeedbackRecord]:
    """Every feedback record oldest first (none when nobody gave any), from `since` on."""
    path = Path(directory) / FEEDBACK_FILE
    if not path.exists():
        return
    with path.open("rb") as handle:
        for record in _read_records(handle, path, active=True, kind=FeedbackRecord):
            if since is None or datetime.fromisoformat(record.time) >= since:
                yield record
