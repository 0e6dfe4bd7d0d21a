"""Atomic file writes: a file is either complete or absent, never half written.

Every file the project writes (CLI outputs, exported datasets, caches, checkpoints) goes through
:func:`atomic_write`: the data lands in a temporary file beside the target, is flushed to disk, and
is renamed over the target in one step. An interrupted run therefore leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "remove_stale_temps", "TEMP_PREFIX",
]

#: Temporary files start with this prefix, so readers can skip leftovers of a killed process.
TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, *, overwrite: bool = True, temp_prefix: str = TEMP_PREFIX
) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically.

    With ``overwrite=False`` an existing target is kept and :class:`FileExistsError` is raised
    (checked again just before the rename, to narrow the race with other writers).
    ``temp_prefix`` (starting with :data:`TEMP_PREFIX`) names the temporary file; a prefix that
    names the target lets :func:`remove_stale_temps` find a killed writer's leftovers.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(target)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix, suffix=target.suffix, dir=target.parent)
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


def remove_stale_temps(target: str | os.PathLike, temp_prefix: str) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` (with ``temp_prefix``) left beside
    ``target`` when its writer was killed; return them.

    Only regular files named exactly like such a temporary file (the prefix, the eight characters
    :func:`tempfile.mkstemp` adds, the target's suffix) are removed, nothing else. The caller must
    be the only writer of ``target`` (hold its lock): a live writer's temporary file looks the same.
    """
    if not temp_prefix.startswith(TEMP_PREFIX):
        raise ValueError(f"temp_prefix must start with {TEMP_PREFIX!r}")
    target = Path(target)
    pattern = re.compile(re.escape(temp_prefix) + r"[a-z0-9_]{8}" + re.escape(target.suffix))
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(entry.path).st_mode):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed
