"""The run directory: the files through which stages talk, written atomically."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from tunesmith.errors import TunesmithError

MANIFEST = "manifest.json"
LIBRARIES = ("tunesmith", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")
STALE_UNNAMED_S = 60
"""A staging folder that names no writer (made before they did) is left behind once untouched for this long."""
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def apply_umask(path: Path, directory: bool) -> None:
    """Give a temp file/folder the permissions a normal one gets (tempfile makes them private to the owner)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


@contextmanager
def staged_text_file(path: Path):
    """A text file written beside `path`, fsync'd and renamed over it only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        apply_umask(Path(tmp), directory=False)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    with staged_text_file(path) as handle:
        handle.write(text)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"{path} not found; run the earlier stage first") from None
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}:{exc.lineno}: damaged JSON ({exc.msg}); re-run the stage that wrote it") from None


def fsync_path(path: Path) -> None:
    """Flush one file, or one folder's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename never publishes half-written content."""
    for path in [*folder.rglob("*"), folder]:
        if not path.is_symlink():
            fsync_path(path)


@contextmanager
def staged_dir(final: Path):
    """Yield a temporary folder next to `final`; on success it is fsynced and replaces `final`, on error it vanishes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    # The name says who writes it (pid, host), so a later write can tell a killed writer's leftovers from live work.
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}.{_HOST}-"))
    try:
        apply_umask(staging, directory=True)
        yield staging
        fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(final: Path) -> list[Path]:
    """Delete staging folders of `final` that a killed process left behind (`.NAME.tmp-*` beside it): those whose
    writer, a process on this host, is gone, and those naming no writer once untouched for a minute. A folder of a
    live writer, or of one on another host (a shared disk), is never touched."""
    named = re.compile(rf"\.{re.escape(final.name)}\.tmp-(\d+)\.([0-9a-f]{{8}})-")
    removed = []
    for path in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        match = named.match(path.name)
        try:
            if match:
                stale = match[2] == _HOST and not _process_alive(int(match[1]))
            else:
                stale = time.time() - path.lstat().st_mtime > STALE_UNNAMED_S
        except OSError:  # gone meanwhile
            continue
        if stale and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # no cheap check there: keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def environment() -> dict:
    """Python, platform and library versions, for lineage."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "libraries": versions}
