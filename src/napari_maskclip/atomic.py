"""Atomic file writes: a file is either complete or absent, never half written.

Every file the project writes (CLI outputs, exported datasets, caches, checkpoints) goes through
:func:`atomic_write`: the data lands in a temporary file beside the target, is flushed to disk, and
is renamed over the target in one step. An interrupted run therefore leaves no partial file.

The temporary file is created with mode ``0o666`` filtered by the process umask (as ``open``
does), and that mode is restored if a writer changed it, so the finished file gets the user's
normal mode (``0644`` under umask 022, ``0664`` under 002), not the ``0600`` of
:func:`tempfile.mkstemp`. Its name, ``.tmp-<pid>-<random><suffix>``, says which process
made it: :func:`is_stale_temp` tells a dead run's leftover from a live writer's file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Iterator

__all__ = [
    "RawSpool",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_temp_name",
    "is_stale_temp",
    "remove_stale_temps",
    "TEMP_PREFIX",
]

#: Temporary files start with this prefix, so readers can skip leftovers of a killed process.
TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-[0-9a-f]{{16}}(\.[^/]*)?$")


def _create_temp(directory: Path, suffix: str, prefix: str = TEMP_PREFIX) -> Path:
    """A new, empty temporary file in ``directory``, with the umask's normal mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = directory / f"{prefix}{os.getpid()}-{secrets.token_hex(8)}{suffix}"
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"Cannot create a temporary file in {directory}.")


def is_temp_name(name: str) -> bool:
    """True for a name :func:`atomic_write` gives its temporary files."""
    return _TEMP_NAME.match(name) is not None


def is_stale_temp(path: str | os.PathLike) -> bool:
    """True for a temporary file of this module whose process is no longer running.

    Only files named by :func:`atomic_write` qualify; a file of a live process (this one
    included) never does, so removing stale ones cannot break a running writer on this machine.
    """
    match = _TEMP_NAME.match(Path(path).name)
    if match is None:
        return False
    return not _process_alive(int(match.group(1)))


def _process_alive(pid: int) -> bool:
    """False only when ``pid`` is certainly not running (unknown counts as alive)."""
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # alive (another user's process), or unknown: keep it
    return True


def remove_stale_temps(target: str | os.PathLike, temp_prefix: str) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` (with ``temp_prefix``) left beside
    ``target`` when its writer was killed; return them.

    Only regular files named exactly like such a temporary file (the prefix, a process id, 16 hex
    digits, the target's suffix) whose process is no longer running are removed, nothing else.
    """
    if not temp_prefix.startswith(TEMP_PREFIX):
        raise ValueError(f"temp_prefix must start with {TEMP_PREFIX!r}")
    target = Path(target)
    pattern = re.compile(re.escape(temp_prefix) + r"(\d+)-[0-9a-f]{16}" + re.escape(target.suffix))
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(entry.path).st_mode):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    *,
    overwrite: bool = True,
    temp_prefix: str = TEMP_PREFIX,
    fsync: bool = True,
) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically.

    ``temp_prefix`` (starting with :data:`TEMP_PREFIX`) names the temporary file; a prefix that
    names the target lets :func:`remove_stale_temps` find a killed writer's leftovers.

    ``fsync=False`` renames without flushing the data to disk first (a crash of the process still
    leaves the whole file; a power loss may not): for callers that flush many files at once
    before anything refers to them (the dataset writer's sessions).

    With ``overwrite=False`` an existing target is kept and :class:`FileExistsError` is raised
    (checked again just before the rename, to narrow the race with other writers).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(target)
    tmp = _create_temp(target.parent, target.suffix, temp_prefix)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 less the umask, as the kernel applied it
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) != mode:
                os.chmod(tmp, mode)  # some writers (safetensors) replace the file with a 0600 one
            if fsync:  # False: the caller syncs the file before anything relies on it
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


class RawSpool:
    """A temporary raw file of this project's (``.tmp-*.raw``) beside a target, for writers that
    receive data in pieces and compress it into the target at the end: ``_file`` (opened for
    reading and writing), :meth:`discard` drops it (after the commit, and on any failure)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        import tempfile

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".raw", dir=folder)
        self._raw = Path(name)
        self._file = os.fdopen(fd, "wb+")

    def discard(self) -> None:
        """Drop the temporary file (also after a failure)."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._raw.unlink()
