"""The training-dataset folder: where every file goes, and the rules that fix its format.

A dataset is a folder::

    DATASET/
      dataset.json             # the index: format, and per sample its files and provenance
      classes.json             # index, name, colour, synonyms, background flag of every class
      images/<name>.png|.tif   # the image (8-bit gray/RGB/RGBA -> PNG; anything else -> TIFF, dtype kept)
      masks/<name>.png|.tif    # labels: palette PNG uint8 (255 = ignore); uint16 TIFF (65535 = ignore)
      confidence/<name>.tif    # optional: float16 C x H x W, channel k-1 = class k
      edited/<name>.png        # optional: 1-bit PNG, True where a person painted the label
      .napari-maskclip.lock    # the exporters' lock (concurrent exports wait for each other)

``dataset.json`` is the single commit point: a sample exists once it is listed there, and it is
rewritten (atomically) only after the sample's files are complete. While an export runs,
``dataset.json`` also lists under ``"pending"`` the files it may create, so a killed export's
leftovers are known to be the exporter's own (the next export removes them); any other file the
index does not list is never touched (see :mod:`.ownership`). The reader ignores both. This
module holds names and rules only; it reads and writes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "DATASET_JSON",
    "CLASSES_JSON",
    "IMAGES_DIR",
    "MASKS_DIR",
    "CONFIDENCE_DIR",
    "EDITED_DIR",
    "DATASET_FORMAT",
    "CLASSES_FORMAT",
    "FORMAT_VERSION",
    "MAX_UINT8_CLASSES",
    "SamplePaths",
    "sample_paths",
    "sample_file_slots",
    "mask_dtype",
    "ignore_index",
    "ignore_index_for_dtype",
    "image_suffix",
    "mask_suffix",
    "check_sample_name",
    "safe_sample_name",
    "slice_name",
]

DATASET_JSON = "dataset.json"
CLASSES_JSON = "classes.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
CONFIDENCE_DIR = "confidence"
EDITED_DIR = "edited"

DATASET_FORMAT = "napari-maskclip-dataset"
CLASSES_FORMAT = "napari-maskclip-classes"
FORMAT_VERSION = 1

#: Named classes (besides background 0) that fit a uint8 mask with 255 left for "ignore".
MAX_UINT8_CLASSES = 254

_NAME_OK = re.compile(r"^[\w][\w.+\-]*$", re.UNICODE)
_NAME_BAD_CHARS = re.compile(r"[^\w.+\-]+", re.UNICODE)


def mask_dtype(n_classes: int) -> type:
    """uint8 while the classes and 255 (ignore) fit, uint16 beyond 254 named classes."""
    return np.uint8 if n_classes <= MAX_UINT8_CLASSES else np.uint16


def ignore_index(n_classes: int) -> int:
    """The "ignore" label of a mask written for ``n_classes`` named classes: 255 or 65535."""
    return 255 if n_classes <= MAX_UINT8_CLASSES else 65535


def ignore_index_for_dtype(dtype: np.dtype) -> int:
    """The "ignore" label of a stored mask, by its dtype (uint8: 255, uint16: 65535)."""
    return 255 if np.dtype(dtype).itemsize == 1 else 65535


def mask_suffix(n_classes: int) -> str:
    return ".png" if n_classes <= MAX_UINT8_CLASSES else ".tif"


def image_suffix(image: np.ndarray) -> str:
    """PNG for 8-bit gray, RGB and RGBA (what every loader reads); TIFF keeps anything else."""
    if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        return ".png"
    return ".tif"


@dataclass(frozen=True)
class SamplePaths:
    """Relative paths (POSIX strings, as stored in ``dataset.json``) of one sample's files."""

    image: Optional[str]
    mask: str
    confidence: Optional[str]
    edited: Optional[str]

    def all(self) -> list[str]:
        return [p for p in (self.image, self.mask, self.confidence, self.edited) if p]


def sample_paths(
    name: str,
    *,
    image: Optional[np.ndarray],
    n_classes: int,
    confidence: bool,
    edited: bool,
) -> SamplePaths:
    """The files sample ``name`` gets, given what it holds."""
    return SamplePaths(
        image=f"{IMAGES_DIR}/{name}{image_suffix(image)}" if image is not None else None,
        mask=f"{MASKS_DIR}/{name}{mask_suffix(n_classes)}",
        confidence=f"{CONFIDENCE_DIR}/{name}.tif" if confidence else None,
        edited=f"{EDITED_DIR}/{name}.png" if edited else None,
    )


def sample_file_slots(name: str) -> tuple[str, ...]:
    """Every relative path sample ``name`` may ever use, whatever it holds (see :func:`sample_paths`)."""
    return (
        f"{IMAGES_DIR}/{name}.png",
        f"{IMAGES_DIR}/{name}.tif",
        f"{MASKS_DIR}/{name}.png",
        f"{MASKS_DIR}/{name}.tif",
        f"{CONFIDENCE_DIR}/{name}.tif",
        f"{EDITED_DIR}/{name}.png",
    )


def check_sample_name(name: str) -> str:
    """Refuse names that are not plain file names (letters, digits, ``_ . + -``; no leading dot)."""
    if not isinstance(name, str) or not _NAME_OK.match(name) or len(name) > 200:
        raise InvalidInputError(
            f"Sample name {name!r} cannot be a file name: use letters, digits, '_', '-', '.', '+' "
            f"(e.g. {safe_sample_name(str(name))!r})."
        )
    return name


def safe_sample_name(text: str) -> str:
    """A valid sample name made from any text (a layer or file name): other characters -> ``_``."""
    name = _NAME_BAD_CHARS.sub("_", str(text).strip()).strip("._-+")
    return name[:200] or "sample"


def slice_name(name: str, index: tuple[int, ...], axes: tuple[str, ...], sizes: tuple[int, ...]) -> str:
    """``<name>_z0003`` / ``<name>_t0001_z0003``: one sample per slice of a stack, sortable."""
    parts = [name]
    for axis, i, size in zip(axes, index, sizes):
        width = max(4, len(str(max(size - 1, 0))))
        parts.append(f"{axis}{i:0{width}d}")
    return "_".join(parts)
