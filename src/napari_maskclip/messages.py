"""One line for every expected failure: the project's errors, file-system errors, memory.

The CLI never shows a traceback for something the user can fix. :func:`one_line` turns such an
exception into a single line that names the file involved and says what to do; it returns None
for anything else (a bug, which keeps its traceback).
"""

from __future__ import annotations

import errno
from typing import Optional

from .errors import MaskClipError

__all__ = ["one_line", "os_error_message"]

_FIXES = {
    errno.ENOSPC: "the disk is full: free some space, or write elsewhere with --out",
    errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere with --out",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.ENAMETOOLONG: "the file name is too long (at most 255 bytes): rename the input or "
    "choose a shorter output folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: choose another path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "it exists already: move it away or choose another path",
    errno.EIO: "input/output error: check the disk",
}


def os_error_message(exc: OSError) -> str:
    """``<file>: <what happened>`` for a file-system error."""
    fix = _FIXES.get(exc.errno or -1)
    what = fix or (exc.strerror or str(exc) or type(exc).__name__)
    name = exc.filename if exc.filename is not None else None
    if name is None:
        return f"{what[0].upper()}{what[1:]}."
    if exc.filename2 is not None:
        return f"{name} -> {exc.filename2}: {what}."
    return f"{name}: {what}."


def one_line(exc: BaseException) -> Optional[str]:
    """The one-line message for an expected failure, or None for a bug."""
    if isinstance(exc, MaskClipError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = ("Out of memory: use a smaller --window, fewer classes or --no-confidence, or "
                "downscale the image.")
    elif isinstance(exc, OSError):
        text = os_error_message(exc)
    else:
        return None
    return " ".join(text.split())
