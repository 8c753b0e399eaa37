"""A job's log as every reader sees it (web page, `faceforge queue logs`): the file in its job folder, to which the
scheduler copies a remote executor's log each tick, read from a byte offset in whole lines and UTF-8 characters."""

from __future__ import annotations

import os
from pathlib import Path

LOG_CHUNK = 64 * 1024


def read_log(path: str | None, offset: int, final: bool) -> tuple[str, int]:
    """Log text from byte `offset`, cut after the last line break unless the job has ended (no half lines).

    A chunk also ends before a UTF-8 character it would cut in two: the next read starts with that character.
    """
    if not path or not Path(path).is_file():
        return "", offset
    with open(path, "rb") as file:
        if offset > os.fstat(file.fileno()).st_size:  # the log was replaced or truncated: start it again
            offset = 0
        file.seek(offset)
        data = file.read(LOG_CHUNK)
    if not final and len(data) < LOG_CHUNK:
        data = data[: max(data.rfind(b"\n"), data.rfind(b"\r")) + 1]
    data = whole_characters(data)
    return data.decode("utf-8", errors="replace"), offset + len(data)


def whole_characters(data: bytes) -> bytes:
    """`data` without a UTF-8 character cut off at its end; the next read starts with that character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the first byte of the last character
            length = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= length else data[:-back]
    return data
