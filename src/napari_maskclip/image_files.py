"""Reading images and writing label and confidence files.

Label maps are written the way segmentation toolkits read them: a palette PNG (uint8, one index
per pixel, the class colours in the palette, so any viewer shows them coloured) and a uint16 TIFF
when there are more than 255 classes. Float stacks (confidence maps) go to TIFF with tifffile,
which keeps float32/float16 exactly. All writes are atomic (see :mod:`napari_maskclip.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write
from .errors import InvalidInputError

__all__ = [
    "read_image",
    "read_label_image",
    "write_label_image",
    "write_float_stack",
    "read_float_stack",
    "label_suffix",
    "palette_from_colors",
]

_TIFF_SUFFIXES = {".tif", ".tiff"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a numpy array (TIFF via tifffile, anything else via imageio)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"Image file not found: {p}")
    try:
        if p.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            return np.asarray(tifffile.imread(p))
        import imageio.v3 as iio

        return np.asarray(iio.imread(p))
    except InvalidInputError:
        raise
    except Exception as exc:  # unreadable or unknown format: one clear line for the user
        raise InvalidInputError(f"Cannot read image {p}: {exc}") from exc


def label_suffix(n_labels: int) -> str:
    """The file suffix for a label map whose largest value is ``n_labels``."""
    return ".png" if n_labels <= 255 else ".tif"


def palette_from_colors(
    colors: Sequence[Sequence[float]], *, ignore_index: int | None = 255
) -> list[int]:
    """A 256-entry PNG palette: 0 black, 1..n the class colours (RGB 0..1), ignore white."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i, color in enumerate(colors[:255], start=1):
        palette[i] = np.clip(np.round(np.asarray(color[:3], dtype=float) * 255), 0, 255)
    if ignore_index is not None and 0 <= ignore_index < 256 and ignore_index > len(colors):
        palette[ignore_index] = 255
    return palette.reshape(-1).tolist()


def write_label_image(
    path: str | os.PathLike,
    labels: np.ndarray,
    colors: Sequence[Sequence[float]] = (),
    *,
    overwrite: bool = True,
) -> Path:
    """Write a 2D label map: palette PNG when it fits uint8, else uint16 TIFF.

    The suffix of ``path`` is replaced by the right one (see :func:`label_suffix`), and the
    path actually written is returned.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InvalidInputError(f"A label map must be 2D, got shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise InvalidInputError("Label values must lie in 0..65535.")
    top = int(labels.max()) if labels.size else 0
    use_png = top <= 255 and len(colors) <= 255
    target = Path(path).with_suffix(".png" if use_png else ".tif")
    if use_png:
        from PIL import Image

        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette(palette_from_colors(colors))
        with atomic_write(target, overwrite=overwrite) as tmp:
            image.save(tmp, format="PNG", optimize=False)
    else:
        import tifffile

        with atomic_write(target, overwrite=overwrite) as tmp:
            tifffile.imwrite(tmp, labels.astype(np.uint16), compression="zlib")
    return target


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a label map written by :func:`write_label_image` (palette indices, not colours)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"Label file not found: {p}")
    if p.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        return np.asarray(tifffile.imread(p))
    from PIL import Image

    with Image.open(p) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise InvalidInputError(
                f"{p} is a colour image (mode {image.mode}), not a label map: labels must be "
                "palette or grayscale PNGs holding class indices."
            )
        return np.asarray(image)


def write_float_stack(
    path: str | os.PathLike,
    stack: np.ndarray,
    *,
    dtype: np.dtype | type = np.float32,
    overwrite: bool = True,
) -> Path:
    """Write a float array (e.g. CxHxW confidences) as a compressed TIFF, atomically."""
    import tifffile

    target = Path(path)
    with atomic_write(target, overwrite=overwrite) as tmp:
        # minisblack: a 3- or 4-channel stack is C planes of data, not an RGB picture.
        tifffile.imwrite(tmp, np.asarray(stack, dtype=dtype), compression="zlib",
                         photometric="minisblack")
    return target


def read_float_stack(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF written by :func:`write_float_stack`."""
    import tifffile

    return np.asarray(tifffile.imread(Path(path)))
