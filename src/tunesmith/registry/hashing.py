"""Content hashes of files and folders: what was written is verified before it is trusted."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every file under `folder` that belongs to its content (hidden scratch files excluded), in a fixed order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_manifest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file in `folder`."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in folder_files(folder)}


def folder_sha256(folder: Path) -> str:
    """One hash for a folder's content: names and bytes of every file, independent of timestamps."""
    return sha256_of_mapping(folder_manifest(folder))


def sha256_of_mapping(mapping: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in sorted(mapping.items())).encode()).hexdigest()
