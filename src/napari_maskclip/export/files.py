"""Encoding one sample's arrays as files, and decoding them.

The writers here write to the exact path they are given (the exporter hands them temporary paths
and renames the finished files into place, see :mod:`napari_maskclip.export.writer`); the
readers take the final paths. Formats follow :mod:`napari_maskclip.export.layout`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatasetError
from ..image_files import palette_from_colors, read_image

__all__ = [
    "write_image_file",
    "write_mask_file",
    "write_confidence_file",
    "write_edited_file",
    "read_image_file",
    "read_mask_file",
    "read_confidence_file",
    "read_edited_file",
]

# zlib levels: 1 is several times faster than the default 6 on large images for a few % of size
# (images); label masks compress so well that level 3 costs nothing.
_IMAGE_LEVEL = 1
_MASK_LEVEL = 3
_TIFF_ZLIB = {"compression": "zlib", "compressionargs": {"level": _IMAGE_LEVEL}}


def write_image_file(path: Path, image: np.ndarray) -> None:
    """8-bit gray/RGB/RGBA as PNG, anything else as TIFF with dtype and channels kept."""
    if path.suffix == ".png":
        from PIL import Image

        Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG", compress_level=_IMAGE_LEVEL)
        return
    import tifffile

    photometric = "rgb" if image.ndim == 3 and image.shape[-1] in (3, 4) else "minisblack"
    extrasamples = {"extrasamples": ["unassalpha"]} if photometric == "rgb" and image.shape[-1] == 4 else {}
    # Channels last and interleaved; a single trailing channel is kept as a shape (tifffile's
    # shaped metadata restores it on reading).
    contig = image.ndim == 3 and image.shape[-1] > 1
    tifffile.imwrite(path, np.ascontiguousarray(image), photometric=photometric,
                     planarconfig="contig" if contig else None, **_TIFF_ZLIB, **extrasamples)


def write_mask_file(path: Path, mask: np.ndarray, colors: Sequence[Sequence[float]]) -> None:
    """uint8 -> palette PNG (class colours, ignore white); uint16 -> zlib TIFF."""
    if mask.dtype == np.uint8:
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(mask), mode="P")
        # palette_from_colors puts class k at entry k; entry 0 is the background (black).
        image.putpalette(palette_from_colors(list(colors)[1:]))
        image.save(path, format="PNG", compress_level=_MASK_LEVEL)
        return
    import tifffile

    tifffile.imwrite(path, np.ascontiguousarray(mask, dtype=np.uint16), **_TIFF_ZLIB)


def write_confidence_file(path: Path, confidence: np.ndarray) -> None:
    """float16 ``C x H x W``, uncompressed.

    float16 halves float32 (3 significant digits is plenty). zlib saves only ~10% on these smooth
    maps at ~10x the time (no float predictor without imagecodecs), so the file stays raw.
    """
    import tifffile

    tifffile.imwrite(path, np.ascontiguousarray(confidence, dtype=np.float16), photometric="minisblack")


def write_edited_file(path: Path, edited: np.ndarray) -> None:
    """A 1-bit PNG: True where a person painted the label, False for pseudo-labels."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(edited, dtype=bool)).save(path, format="PNG")


def read_image_file(path: Path) -> np.ndarray:
    return read_image(path)


def read_mask_file(path: Path) -> np.ndarray:
    """The stored label values (palette indices for PNG), uint8 or uint16."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I;16", "I"):
            raise DatasetError(f"{path} is not a label mask (PNG mode {image.mode}).")
        return np.asarray(image)


def read_confidence_file(path: Path) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(path))


def read_edited_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("1")).astype(bool)
