"""Reading chunked arrays (zarr, a TIFF through tifffile's zarr store) with one-line errors.

A store with one damaged chunk otherwise ends deep inside a codec (``RuntimeError: Zstd
decompression error``) with nothing that says which file is broken. :func:`read_region` reads a
region; when the codec fails it reads the region's chunks one at a time to find the one that fails
(only on this error path, and at most :data:`MAX_CHUNKS_SEARCHED` of them) and raises
:class:`~napari_maskclip.errors.InvalidInputError` naming the store, the chunk's key (its file in
a zarr folder) and its pixels. :class:`CheckedArray` does the same for every read of a lazy
array (what the napari reader hands to dask).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import numpy as np

from .errors import InvalidInputError

__all__ = ["read_region", "CheckedArray", "MAX_CHUNKS_SEARCHED"]

#: A failed read looks for its bad chunk among at most this many chunks of the region.
MAX_CHUNKS_SEARCHED = 4096
_PASS_THROUGH = (InvalidInputError, MemoryError, KeyboardInterrupt)


def _bounds(index: tuple, shape: tuple[int, ...]) -> Optional[list[tuple[int, int]]]:
    """``(start, stop)`` per axis of a basic index (ints and step-1 slices), else None."""
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for key, n in zip(index, shape):
        if isinstance(key, (int, np.integer)):
            k = int(key) + (n if key < 0 else 0)
            out.append((k, k + 1))
        elif isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(n)
            out.append((start, max(start, stop)))
        else:
            return None
    return out


def _chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    try:
        return str(array.metadata.encode_chunk_key(coords))
    except Exception:  # noqa: BLE001 - no metadata API: the chunk's grid position
        return ".".join(map(str, coords))


def _bad_chunk(array: Any, bounds: list[tuple[int, int]]) -> Optional[str]:
    """``key (pixels)`` of the first chunk of the region that fails to read, or None."""
    chunks = tuple(int(c) for c in array.chunks)
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(bounds, chunks)]
    for n, coords in enumerate(itertools.product(*ranges)):
        if n >= MAX_CHUNKS_SEARCHED:
            return None
        box = tuple(slice(i * c, min((i + 1) * c, s))
                    for i, c, s in zip(coords, chunks, array.shape))
        try:
            array[box]
        except _PASS_THROUGH:
            raise
        except Exception:  # noqa: BLE001 - this is the chunk that fails
            where = ", ".join(f"{b.start}:{b.stop}" for b in box)
            return f"{_chunk_key(array, coords)} (pixels [{where}])"
    return None


def read_region(array: Any, index: tuple, store: str) -> np.ndarray:
    """``np.asarray(array[index])``; a codec or storage failure becomes one line naming the
    store ``store`` and, where it can be found, the damaged chunk."""
    try:
        return np.asarray(array[index])
    except _PASS_THROUGH:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr and its codecs raise anything
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        bounds = _bounds(tuple(index), tuple(int(n) for n in array.shape))
        chunk = _bad_chunk(array, bounds) if bounds is not None else None
        what = f"chunk {chunk}" if chunk else "a chunk of the region read"
        raise InvalidInputError(
            f"{store}: {what} cannot be read ({type(exc).__name__}: {reason}); the store is "
            "damaged there: restore it from a copy, or write that chunk again."
        ) from exc


class CheckedArray:
    """A lazy array whose reads go through :func:`read_region` (for ``dask.array.from_array``)."""

    def __init__(self, array: Any, store: str) -> None:
        self.array, self.store = array, store
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for c in array.chunks)

    def __getitem__(self, index: Any) -> np.ndarray:
        return read_region(self.array, index if isinstance(index, tuple) else (index,), self.store)
