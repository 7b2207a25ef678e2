"""API keys and per-key usage in one SQLite file: only salted hashes are stored, and the server checks keys
against an in-memory copy refreshed at most once a second, so `tunesmith keys` changes reach it within ~1 s."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models import tunesmith_home
from tunesmith.sqlite_store import open_versioned, write_transaction

SCHEMA_VERSION = 1
KEY_PREFIX = "tsk-"
KEY_ID_LENGTH = 8
REFRESH_SECONDS = 1.0
"""How stale the server's copy of the keys may get: a key created or revoked elsewhere counts within this time."""

_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits  # no '-' or '_', so an id reads and selects as one word
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL, secret_hash BLOB NOT NULL,
    models TEXT NOT NULL, rpm INTEGER, tpm INTEGER, admin INTEGER NOT NULL, created TEXT NOT NULL, revoked TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS active_key_names ON keys(name) WHERE revoked IS NULL;
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, PRIMARY KEY (key_id, model, day)
);
"""


@dataclass(frozen=True)
class ApiKey:
    """A key as the gateway sees it; never holds the secret or its hash."""

    key_id: str
    name: str
    models: tuple[str, ...]
    """fnmatch patterns of the model names the key may call (`orders@*`, `orders`); empty = every model."""
    rpm: int | None
    tpm: int | None
    admin: bool
    created: str
    revoked: str | None = None


@dataclass(frozen=True)
class UsageRow:
    """One key's traffic to one model on one UTC day."""

    key_name: str
    key_id: str
    model: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class _ActiveKey:
    key: ApiKey
    salt: bytes
    secret_hash: bytes


def default_keys_path() -> Path:
    return tunesmith_home() / "gateway" / "keys.sqlite"


def _hash_secret(salt: bytes, secret: str) -> bytes:
    # One SHA-256 is enough: the secret is 256 random bits, which no amount of guessing can cover, so a slow hash
    # (bcrypt, scrypt) would only protect low-entropy passwords we never accept -- and it keeps every request's
    # check to microseconds.
    return hashlib.sha256(salt + secret.encode()).digest()


def _parse_key(presented: str) -> tuple[str, str] | None:
    """`tsk-<key_id>-<secret>` as (key_id, secret); None when it does not have that shape."""
    key_id_end = len(KEY_PREFIX) + KEY_ID_LENGTH
    if not presented.startswith(KEY_PREFIX) or presented[key_id_end:key_id_end + 1] != "-":
        return None
    key_id, secret = presented[len(KEY_PREFIX):key_id_end], presented[key_id_end + 1:]
    return (key_id, secret) if secret else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_allowed(key: ApiKey, requested: str, served: list[str] | tuple[str, ...] = ()) -> bool:
    """May `key` call `requested`? Yes when a pattern matches it, or when every name actually `served` for it
    (the versions behind a route) matches one; a key without patterns may call every model."""
    if not key.models:
        return True

    def matches(name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in key.models)

    return matches(requested) or (bool(served) and all(matches(name) for name in served))


class KeyStore:
    """The key and usage database; safe to share between the server's threads."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path) if path is not None else default_keys_path()
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, _ActiveKey] = {}
        self._loaded_at: float | None = None
        self._connection = self._open()

    def _open(self) -> sqlite3.Connection:
        # private: usage and key names are nobody else's business
        return open_versioned(self.path, _SCHEMA, SCHEMA_VERSION, "key store", private=True)

    def close(self) -> None:
        self._connection.close()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with write_transaction(self._connection, self._lock) as connection:
            yield connection
        self._loaded_at = None  # this process sees its own change at once

    def create(self, name: str, models: tuple[str, ...] | list[str] = (), rpm: int | None = None,
               tpm: int | None = None, admin: bool = False) -> tuple[ApiKey, str]:
        """A new key and its full string (`tsk-<id>-<secret>`), which exists nowhere else: show it once."""
        _check_new_key(name, models, rpm, tpm)
        secret, salt = secrets.token_urlsafe(32), secrets.token_bytes(16)
        with self._writing() as db:
            if db.execute("SELECT 1 FROM keys WHERE name = ? AND revoked IS NULL", (name,)).fetchone():
                raise TunesmithError(f"key name {name!r} is taken by an active key; choose another name, or revoke "
                                     f"it first with `tunesmith keys revoke {name}`")
            key_id = self._unused_key_id(db)
            key = ApiKey(key_id, name, tuple(models), rpm, tpm, admin, _now())
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                       (key_id, name, salt, _hash_secret(salt, secret), json.dumps(key.models), rpm, tpm,
                        int(admin), key.created))
        return key, f"{KEY_PREFIX}{key_id}-{secret}"

    @staticmethod
    def _unused_key_id(db: sqlite3.Connection) -> str:
        while True:  # 36^8 ids: a clash is rare, never repeated
            key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
            if not db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone():
                return key_id

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        """Keys oldest first; revoked ones only when asked."""
        where = "" if include_revoked else "WHERE revoked IS NULL"
        with self._lock:
            rows = self._connection.execute(f"SELECT {_KEY_COLUMNS} FROM keys {where} ORDER BY created, name")
            return [_api_key(row) for row in rows.fetchall()]

    def revoke(self, name_or_id: str) -> ApiKey:
        """Revoke the active key with this name, or the key with this id; the server refuses it within ~1 s."""
        with self._writing() as db:
            row = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = ? OR (name = ? AND revoked IS NULL) "
                             "ORDER BY key_id = ? DESC", (name_or_id, name_or_id, name_or_id)).fetchone()
            if row is None:
                active = db.execute("SELECT name, key_id FROM keys WHERE revoked IS NULL ORDER BY name").fetchall()
                known = ", ".join(f"{name} ({key_id})" for name, key_id in active) or "none"
                raise TunesmithError(f"no key named or with id {name_or_id!r}; active keys: {known} "
                                     "(see `tunesmith keys list`)")
            key = _api_key(row)
            if key.revoked:
                raise TunesmithError(f"key {key.name} ({key.key_id}) was already revoked on {key.revoked}")
            revoked = _now()
            db.execute("UPDATE keys SET revoked = ? WHERE key_id = ?", (revoked, key.key_id))
        return replace(key, revoked=revoked)

    def _active_keys(self) -> dict[str, _ActiveKey]:
        """The active keys by id, reloaded when older than REFRESH_SECONDS (cheap: a handful of rows)."""
        now = self._clock()
        if self._loaded_at is not None and now - self._loaded_at < REFRESH_SECONDS:
            return self._active
        with self._lock:
            rows = self._connection.execute(
                f"SELECT {_KEY_COLUMNS}, salt, secret_hash FROM keys WHERE revoked IS NULL").fetchall()
            # Replaced whole, never mutated: readers on other threads always see one consistent snapshot.
            self._active = {row[0]: _ActiveKey(_api_key(row[:-2]), row[-2], row[-1]) for row in rows}
            self._loaded_at = now
            return self._active

    def has_active_keys(self) -> bool:
        """Whether any key is active (from the refreshed copy, so a first key created while serving counts)."""
        return bool(self._active_keys())

    def authenticate(self, presented: str) -> ApiKey | None:
        """The active key `presented` is, or None (malformed, unknown, wrong secret, revoked)."""
        parsed = _parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        # Key ids are not secret (they are listed and logged), so finding one by lookup leaks nothing; the secret
        # is compared in constant time.
        stored = self._active_keys().get(key_id)
        if stored is None or not hmac.compare_digest(_hash_secret(stored.salt, secret), stored.secret_hash):
            return None
        return stored.key

    def record_usage(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int,
                     when: datetime | None = None) -> None:
        """Count one request and its tokens on the (key, model, UTC day) row."""
        when = when or datetime.now(timezone.utc)
        day = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).date()
        with self._lock:
            self._connection.execute(
                "INSERT INTO usage VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (key_id, model, day) DO UPDATE SET "
                "requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens",
                (key_id, model, day.isoformat(), prompt_tokens, completion_tokens))

    def usage(self, since: date | None = None, key: str | None = None) -> list[UsageRow]:
        """Usage rows by day, key name and model; `key` is a key name (revoked ones included) or id."""
        with self._lock:
            if key is not None and not self._connection.execute(
                    "SELECT 1 FROM keys WHERE name = ? OR key_id = ?", (key, key)).fetchone():
                names = [row[0] for row in self._connection.execute("SELECT DISTINCT name FROM keys ORDER BY name")]
                raise TunesmithError(f"no key named or with id {key!r}; known keys: {', '.join(names) or 'none'}")
            rows = self._connection.execute(
                "SELECT coalesce(keys.name, '?'), usage.key_id, model, day, requests, prompt_tokens, "
                "completion_tokens FROM usage LEFT JOIN keys ON keys.key_id = usage.key_id "
                "WHERE day >= ? AND (? IS NULL OR keys.name = ? OR usage.key_id = ?) "
                "ORDER BY day, keys.name, model, usage.key_id",
                ((since or date.min).isoformat(), key, key, key)).fetchall()
        return [UsageRow(*row) for row in rows]


_KEY_COLUMNS = "key_id, name, models, rpm, tpm, admin, created, revoked"


def _api_key(row: tuple) -> ApiKey:
    key_id, name, models, rpm, tpm, admin, created, revoked = row
    return ApiKey(key_id, name, tuple(json.loads(models)), rpm, tpm, bool(admin), created, revoked)


def _check_new_key(name: str, models, rpm: int | None, tpm: int | None) -> None:
    if not _NAME.fullmatch(name):
        raise TunesmithError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit (e.g. team-a)")
    for label, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is not None and limit < 1:
            raise TunesmithError(f"--{label} {limit}: a limit per minute must be at least 1 (leave it out for none)")
    if any(not pattern.strip() for pattern in models):
        raise TunesmithError("--models: an empty pattern matches no model; give names or patterns such as orders@*")
