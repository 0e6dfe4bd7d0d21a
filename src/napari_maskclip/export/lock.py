"""One export at a time per dataset: writers take the dataset's lock file, or wait for it.

Two exports into one dataset would otherwise interleave their ``dataset.json`` commits and lose
samples. The lock is :mod:`filelock`'s (an OS lock, ``flock`` on POSIX): it is released when its
holder ends, also when the process is killed, so a dead export never blocks the next one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from ..errors import DatasetError
from .ownership import LOCK_NAME

__all__ = ["DatasetLock", "LOCK_TIMEOUT_S"]

#: How long an export waits for another one writing to the same dataset before it gives up.
LOCK_TIMEOUT_S = 120.0
_POLL_S = 0.25


class DatasetLock:
    """The lock of the dataset folder ``root`` (which must exist)."""

    def __init__(self, root: Path):
        from filelock import FileLock

        self.root = root
        self.path = root / LOCK_NAME
        # thread_local=False: the export generator may be resumed from another thread.
        self._lock = FileLock(str(self.path), thread_local=False)

    def acquire_iter(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[str]:
        """Take the lock; while another export holds it, yield one message and keep waiting.

        Raises :class:`DatasetError` after ``timeout`` seconds, or if the lock cannot be made.
        """
        from filelock import Timeout

        deadline = time.monotonic() + max(0.0, float(timeout))
        told = False
        while True:
            try:
                self._lock.acquire(timeout=min(_POLL_S, max(0.0, deadline - time.monotonic())))
                return
            except Timeout:
                if time.monotonic() >= deadline:
                    raise DatasetError(
                        f"Another export is writing to {self.root} (waited {timeout:g} s for it); "
                        "try again when it has finished."
                    ) from None
                if not told:
                    told = True
                    yield f"waiting for another export into {self.root} to finish"
            except OSError as exc:
                raise DatasetError(
                    f"Cannot write to {self.root} ({exc.strerror or exc}); choose a folder you can "
                    "write to."
                ) from exc

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
