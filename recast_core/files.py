"""Files written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_temp(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """`chunks` written and fsynced to a temp file beside `path` (`.NAME.*.tmp`, mode 0600); returns its
    name, for the caller to rename over `path`. The temp file is removed if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_atomic(path: Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Replace `path` with `data` (bytes, or chunks of them) atomically: a temp file beside it, fsync,
    rename. A crash leaves the old file or the new one, never a mix; the temp file is removed on failure.
    The directory entry itself is not fsynced: callers that need the rename durable fsync the directory."""
    tmp = write_temp(path, [data] if isinstance(data, bytes | bytearray) else data)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
