"""Before an image is decoded: can its file hold what its header declares, and does it fit memory?

A header is a few bytes anyone can write: a 229-byte PNG may declare 16000 x 16000 pixels, and
Pillow then allocates and "decodes" 768 MB of zeros for minutes without an error. Two checks, from
the header and the file's size alone, refuse such a file in one line before any pixel is decoded:

* **The data must be able to hold the pixels.** No codec expands data without bound: deflate
  (PNG, zlib TIFF) at most about 1032 : 1, TIFF LZW about 2730 : 1, PackBits 64 : 1, BMP RLE
  128 : 1, raw data 1 : 1. A file whose image data (a PNG's IDAT chunks; otherwise the whole
  file) times its codec's :data:`MAX_RATIO` is smaller than the declared pixels cannot be complete.
  Codecs without a small bound (JPEG, WebP, zstd, LZMA, JPEG 2000...) get a generous one, which
  still refuses a header over almost no data.
* **The decoded pixels must fit the memory this process may use**: the smaller of what the kernel
  reports available (``MemAvailable`` + free swap) and what the process's limits (``RLIMIT_AS``,
  ``RLIMIT_DATA``) leave, counting the copies the reader makes (Pillow's buffer and numpy's array).

Both are necessary conditions, never a guess that a file is fine: a file that passes may still be
truncated in the middle, which the decoder reports (and :mod:`.image_files` turns into one line).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InvalidInputError

__all__ = ["MAX_RATIO", "check_payload", "check_fits_memory", "free_memory", "decoded_bytes",
           "tiff_codec", "pillow_codec", "pillow_stored_bytes"]

#: Largest decoded : stored ratio per codec (deflate's is 1032 : 1; others rounded up).
MAX_RATIO = {
    "raw": 1.0,
    "deflate": 1100.0,
    "lzw": 4096.0,
    "packbits": 64.0,
    "rle": 128.0,
    "other": float(1 << 20),
}
# Bytes of headers, tables and padding a file may hold on top of its pixel data.
_SLACK = 1 << 16
_TIFF_CODECS = {1: "raw", 5: "lzw", 8: "deflate", 32946: "deflate", 32773: "packbits"}


def decoded_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod([int(n) for n in shape], dtype=np.float64)) * np.dtype(dtype).itemsize


def _png_data(path: Path) -> Optional[tuple[int, int]]:
    """``(bytes the IHDR's rows need undecoded, bytes of IDAT data)`` of a PNG, or None."""
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        head = handle.read(8 + 13)
        if len(head) < 21 or head[4:8] != b"IHDR":
            return None
        width, height, depth, colour = struct.unpack(">IIBB", head[8:18])
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
        raw = height * (1 + -(-width * channels * max(depth, 1) // 8))
        handle.seek(4, os.SEEK_CUR)  # IHDR's CRC
        idat = 0
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                break
            length, kind = struct.unpack(">I4s", chunk)
            if kind == b"IDAT":
                idat += length
            elif kind == b"IEND":
                break
            handle.seek(length + 4, os.SEEK_CUR)
        return raw, idat


def tiff_codec(page) -> str:
    """The :data:`MAX_RATIO` key of a tifffile page's compression."""
    try:
        return _TIFF_CODECS.get(int(page.compression), "other")
    except (TypeError, ValueError):
        return "other"


def pillow_codec(image) -> str:
    """The :data:`MAX_RATIO` key of an opened Pillow image (PNG is measured by its chunks)."""
    kind = (image.format or "").upper()
    if kind == "BMP":
        return "raw" if image.info.get("compression", 0) in (0, 3, 6) else "rle"
    if kind == "GIF":
        return "lzw"
    if kind == "PNG":
        return "png"
    return "other"


def pillow_stored_bytes(image) -> int:
    """Bytes of the pixels as the file stores them (a palette image: one index per pixel, not
    the RGBA it is read as), all frames."""
    from PIL import Image

    bits = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(image.mode, 8)
    bands = Image.getmodebands(image.mode) if image.mode in Image.MODES else 4
    width, height = image.size
    frames = int(getattr(image, "n_frames", 1) or 1)
    return -(-int(width) * int(height) * frames * bands * bits // 8)


def check_payload(path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype,
                  codec: str = "other", stored_bytes: Optional[int] = None) -> None:
    """Refuse (one line) a file that cannot hold the ``shape`` x ``dtype`` pixels it declares.

    ``codec``: a :data:`MAX_RATIO` key, or ``"png"`` (its IDAT chunks are measured against the
    rows its IHDR declares). ``stored_bytes``: the pixels' size as stored, when the reader expands
    them (palette -> RGBA)."""
    p = Path(path)
    declared = decoded_bytes(shape, dtype)
    png = _png_data(p) if codec == "png" else None
    if png is not None:
        need, stored = png
        ratio = MAX_RATIO["deflate"]
    else:
        need = declared if stored_bytes is None else min(declared, int(stored_bytes))
        stored = p.stat().st_size
        ratio = MAX_RATIO.get(codec, MAX_RATIO["other"])
    if need > ratio * stored + _SLACK:
        raise InvalidInputError(
            f"{p} declares a {' x '.join(map(str, shape))} image ({declared / 2**20:.0f} MiB "
            f"decoded) but holds only {stored} bytes of image data, which cannot decode to that: "
            "the file is truncated or its header is wrong. Replace it with a complete file."
        )


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _meminfo_kib() -> Optional[int]:
    try:
        values = {}
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0])
        return values["MemAvailable"] + values.get("SwapFree", 0)
    except (OSError, ValueError, KeyError, IndexError):
        return None


def free_memory() -> Optional[tuple[int, str]]:
    """``(bytes, what limits it)`` this process may still allocate, or None when unknown."""
    found: list[tuple[int, str]] = []
    kib = _meminfo_kib()
    if kib is not None:
        found.append((kib * 1024, "available memory"))
    try:
        import resource
    except ImportError:  # Windows
        return min(found) if found else None
    for limit, field, name in ((resource.RLIMIT_AS, "VmSize", "RLIMIT_AS"),
                               (resource.RLIMIT_DATA, "VmData", "RLIMIT_DATA")):
        soft = resource.getrlimit(limit)[0]
        if soft == resource.RLIM_INFINITY:
            continue
        used = _status_kib(field)
        found.append((max(0, soft - (used or 0) * 1024), f"the process limit {name}"))
    return min(found) if found else None


def check_fits_memory(path: str | os.PathLike, nbytes: int, copies: int = 1) -> None:
    """Refuse (one line) to decode ``nbytes`` (held ``copies`` times) that cannot fit memory."""
    free = free_memory()
    if free is None or nbytes * copies <= free[0]:
        return
    raise InvalidInputError(
        f"{Path(path)} decodes to {nbytes / 2**30:.2f} GiB "
        f"({copies} cop{'y' if copies == 1 else 'ies'} while reading), more than {free[1]} "
        f"leaves this process ({free[0] / 2**30:.2f} GiB): free memory (or raise the limit), "
        "or crop or downscale the image first."
    )
