"""Which pixels a person edited: a compact copy of what MaskCLIP wrote, compared at export time.

The widget keeps, in the Labels layer's run record (:attr:`.records.RunRecord.predicted`), a copy
of every slice it wrote, zlib-compressed (level 1): ``{slice key: {"shape", "dtype", "zlib"}}``.
At export time a pixel is *edited* when the layer's current value differs from that copy, so a
pixel painted back to the value MaskCLIP gave it counts as unedited (a pseudo-label), which is
what it is. A slice MaskCLIP never wrote was all 0 before anyone painted it, so there every
non-zero pixel is edited.

Why in the metadata: napari's Save hands a writer the layer's data and state only, and "Duplicate
layer" copies the state (the record is shared, read-only); both keep working with no widget. Why
compressed: segmentation maps are large regions, so a slice compresses to a few percent of its
size (bytes per pixel of the labels; measured numbers in the README), instead of doubling the
memory of a big stack. The record is only ever replaced, never changed in place, so copies that
share it stay correct.

Qt-free and torch-free (numpy and zlib only).
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..stacks import slice_key

__all__ = [
    "decode_plane",
    "encode_plane",
    "edited_plane",
    "record_planes",
    "record_shapes_fit",
]

_LEVEL = 1  # zlib: fast; label maps compress well even at the lowest level


def encode_plane(plane: np.ndarray) -> dict[str, Any]:
    """One 2D slice of labels as a small, immutable record."""
    data = np.ascontiguousarray(plane)
    return {
        "shape": [int(s) for s in data.shape],
        "dtype": data.dtype.str,
        "zlib": zlib.compress(memoryview(data).cast("B"), _LEVEL),
    }


def decode_plane(entry: Mapping[str, Any]) -> np.ndarray:
    """The slice an :func:`encode_plane` record holds (a new, writable array)."""
    raw = zlib.decompress(entry["zlib"])
    return np.frombuffer(raw, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"]).copy()


def record_planes(
    labels: np.ndarray, indices: Iterable[Sequence[Any]]
) -> dict[str, dict[str, Any]]:
    """Records of the slices of ``labels`` at ``indices`` (output indices, as the widget writes)."""
    return {slice_key(idx): encode_plane(labels[tuple(idx)]) for idx in indices}


def record_shapes_fit(record: Mapping[str, Mapping[str, Any]], labels_shape: Sequence[int]) -> bool:
    """True when every recorded slice has the shape of a slice of ``labels_shape``."""
    plane = [int(s) for s in labels_shape[-2:]]
    return all(list(entry.get("shape", [])) == plane for entry in record.values())


def edited_plane(
    plane: np.ndarray, key: str, record: Mapping[str, Mapping[str, Any]]
) -> np.ndarray:
    """Boolean mask of the pixels of ``plane`` (the slice ``key`` now) that differ from the record.

    A slice without a record was never written by MaskCLIP: its non-zero pixels are edited.
    """
    entry = record.get(key)
    if entry is None:
        return np.asarray(plane) != 0
    return np.asarray(plane) != decode_plane(entry)

