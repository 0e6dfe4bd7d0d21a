"""Atomic file writes: a file is either complete or absent, never half written.

Every file the project writes (CLI outputs, exported datasets, caches, checkpoints) goes through
:func:`atomic_write`: the data lands in a temporary file beside the target, is flushed to disk, and
is renamed over the target in one step. An interrupted run therefore leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "TEMP_PREFIX"]

#: Temporary files start with this prefix, so readers can skip leftovers of a killed process.
TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically.

    With ``overwrite=False`` an existing target is kept and :class:`FileExistsError` is raised
    (checked again just before the rename, to narrow the race with other writers).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(target)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if not overwrite and target.exists():
            raise FileExistsError(target)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_write(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
