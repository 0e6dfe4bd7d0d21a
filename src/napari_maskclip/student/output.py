"""Where a training run saves: checked before the first iteration, one writer, nothing lost.

A run can last hours, so everything that could stop it from saving is found before the first
iteration, and a save that fails later loses at most the iterations since the last good one:

* :meth:`CheckpointOutput.open`: the checkpoint path must not be a folder or anything but a
  regular file; its folder is created if missing; a lock file ``.<name>.lock`` beside it
  (:mod:`filelock`) admits one run per checkpoint (a second one is refused with one line); under
  the lock, temporary files a killed run left for *this* checkpoint are removed (they are named
  after it, see :func:`~.checkpoint.checkpoint_temp_prefix`); then a probe file is written beside
  it and removed, which proves that the folder takes files (not read-only, not full);
* :meth:`CheckpointOutput.require_space`: once the network is built, the disk must have room for
  the checkpoint (written beside the old one, then renamed over it);
* :meth:`CheckpointOutput.save`: writes are atomic, so a failed save (disk full, folder turned
  read-only) leaves the previous checkpoint intact; the run stops with one line that says which
  iteration the file still holds.

The lock file stays when the run ends (removing it would let two runs lock different files).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..atomic import remove_stale_temps
from ..errors import OutputError
from .checkpoint import checkpoint_temp_prefix, save_checkpoint

__all__ = ["CheckpointOutput", "lock_path", "PROBE_BYTES"]

#: Bytes the probe writes: a disk that cannot take this much cannot take a checkpoint.
PROBE_BYTES = 64 * 1024


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a checkpoint: hidden, beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _why(exc: OSError) -> str:
    """A file-system error in the user's words."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the disk is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENAMETOOLONG: "the file name is too long",
    }
    return reasons.get(exc.errno or -1) or exc.strerror or str(exc)


class CheckpointOutput:
    """The checkpoint file of one training run (see the module doc)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        #: The iteration the file on disk holds (None: nothing saved by this run or before it).
        self.saved: Optional[int] = None
        self._lock: Any = None

    # -- before the first iteration ------------------------------------------------------------

    def open(self) -> "CheckpointOutput":
        """Check the path, take the lock, remove this checkpoint's stale temporary files and
        prove with a probe file that its folder takes files. Raises :class:`OutputError`."""
        path = self.path
        with contextlib.suppress(OSError):
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                raise OutputError(
                    f"{path} is a folder; give the checkpoint a file name, e.g. "
                    f"{path / 'student.safetensors'}."
                )
            if not stat.S_ISREG(mode):
                raise OutputError(
                    f"{path} exists and is not a regular file (a link, device or pipe); "
                    "choose another checkpoint path."
                )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"Cannot create the folder of {path} ({_why(exc)}: {exc.filename or path.parent}); "
                "choose another checkpoint path."
            ) from exc
        self._acquire_lock()
        try:
            remove_stale_temps(path, checkpoint_temp_prefix(path))
            self._probe()
        except BaseException:
            self.close()
            raise
        return self

    def _acquire_lock(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(str(lock_path(self.path)), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout as exc:  # before OSError: filelock's Timeout is a TimeoutError
            raise OutputError(
                f"Another training is writing {self.path} (it holds {lock_path(self.path).name}); "
                "wait for it to end, or choose another checkpoint path."
            ) from exc
        except OSError as exc:
            raise OutputError(
                f"Cannot write beside {self.path} ({_why(exc)}); choose a folder you can write to."
            ) from exc
        self._lock = lock

    def _probe(self) -> None:
        probe: Optional[str] = None
        try:
            fd, probe = tempfile.mkstemp(prefix=checkpoint_temp_prefix(self.path),
                                         suffix=self.path.suffix, dir=self.path.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(PROBE_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputError(
                f"Cannot write the checkpoint {self.path} ({_why(exc)}); free some space or "
                "choose a folder you can write to."
            ) from exc
        finally:
            if probe is not None:
                with contextlib.suppress(OSError):
                    os.unlink(probe)

    def require_space(self, nbytes: int) -> None:
        """Refuse (before any training) when the disk cannot hold a checkpoint of ``nbytes``."""
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return  # cannot tell; the probe passed and a failed save is still reported
        if free < nbytes:
            raise OutputError(
                f"The checkpoint {self.path} needs about {_mb(nbytes)} but only {_mb(free)} "
                "are free on that disk; free some space or choose another place."
            )

    # -- during the run ------------------------------------------------------------------------

    def save(self, net: Any, meta: dict[str, Any], optimizer: Any, iteration: int) -> None:
        """Save atomically; on failure stop with one line saying what the file still holds."""
        try:
            save_checkpoint(self.path, net, meta, optimizer)
        except OSError as exc:
            raise OutputError(
                f"Could not save iteration {iteration} to {self.path} ({_why(exc)}); "
                f"{self.kept()}."
            ) from exc
        self.saved = iteration

    def kept(self) -> str:
        """What the checkpoint file holds now, and how to go on."""
        if self.saved is None:
            return "nothing was saved; fix that and train again"
        return (f"{self.path} still holds iteration {self.saved}; fix that and continue with "
                "--resume")

    def close(self) -> None:
        """Release the lock (the lock file stays, see the module doc)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"
