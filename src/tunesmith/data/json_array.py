"""Finding the examples of a `.json` file's top-level array without loading the whole file.

The file is memory-mapped and scanned for the array's top-level commas (strings skipped), so each example is
parsed on its own: a large array costs one example's memory at a time, and the per-row size limit applies to
each example rather than to the file. Structural characters are ASCII, so scanning UTF-8 bytes is safe.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from pathlib import Path

from tunesmith.errors import TunesmithError

_STRUCTURE = re.compile(rb'[\[\]{}",]')
_REST_OF_STRING = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_WHITESPACE = b" \t\r\n"


def first_char(data: bytes | mmap.mmap) -> tuple[int, int]:
    """Offset and byte of the first non-blank character after an optional UTF-8 BOM; (-1, 0) for a blank file."""
    position = 3 if data[:3] == b"\xef\xbb\xbf" else 0
    while position < len(data) and data[position] in _WHITESPACE:
        position += 1
    return (position, data[position]) if position < len(data) else (-1, 0)


def array_elements(path: Path, data: mmap.mmap, start: int) -> Iterator[tuple[int, bytes]]:
    """(number from 1, raw bytes) of each element of the array whose `[` is at `start`."""
    depth, position, element_start, number = 0, start + 1, start + 1, 0
    while True:
        match = _STRUCTURE.search(data, position)
        if match is None:
            _fail(path, data, len(data), "the file ends inside the array (truncated?)")
        char, position = data[match.start()], match.end()
        if char == ord('"'):
            rest = _REST_OF_STRING.match(data, position)
            if rest is None:
                _fail(path, data, match.start(), "a string is never closed (truncated?)")
            position = rest.end()
        elif char in b"[{":
            depth += 1
        elif depth > 0 and char in b"]}":
            depth -= 1
        elif depth == 0 and char in b",]":
            raw = data[element_start:match.start()]
            if char == ord(",") or raw.strip(_WHITESPACE):
                number += 1
                yield number, raw
            element_start = position
            if char == ord("]"):
                _check_nothing_after(path, data, position)
                return
        elif depth == 0:
            _fail(path, data, match.start(), f"unexpected {chr(char)!r} at the array's top level")


def _check_nothing_after(path: Path, data: mmap.mmap, position: int) -> None:
    if data[position:].strip(_WHITESPACE):
        _fail(path, data, position, "text after the closing ']' of the array")


def _fail(path: Path, data: mmap.mmap, offset: int, problem: str):
    line = data[:offset].count(b"\n") + 1
    raise TunesmithError(f"{path}:{line}: not a valid JSON array ({problem}); the file must be one JSON array of "
                         "examples, or use .jsonl with one example per line")
