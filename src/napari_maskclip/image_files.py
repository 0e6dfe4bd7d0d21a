"""Reading images and writing label and confidence files.

Label maps are written the way segmentation toolkits read them: a palette PNG (uint8, one index
per pixel, the class colours in the palette, so any viewer shows them coloured) and a uint16 TIFF
when there are more than 255 classes. Float stacks (confidence maps) go to TIFF with tifffile,
which keeps float32/float16 exactly. All writes are atomic (see :mod:`napari_maskclip.atomic`).

Reading is bounded and never shows a traceback: the header is read first and an image larger
than :data:`MAX_IMAGE_PIXELS` per plane or :data:`MAX_IMAGE_BYTES` decoded, larger than its file's
data can hold, or larger than the memory left is refused before any pixel is decoded (a 300 kB TIFF
can claim 100000 x 100000 pixels, a 229-byte PNG 16000 x 16000: see :mod:`.decode_limits`); an
empty, truncated or non-image file raises :class:`~napari_maskclip.errors.InvalidInputError`
naming the file. No NaN is ever written into a file: the writers refuse it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .atomic import RawSpool, atomic_write
from .decode_limits import (
    check_fits_memory,
    check_payload,
    pillow_codec,
    pillow_stored_bytes,
    tiff_codec,
)
from .errors import InvalidInputError

__all__ = [
    "FloatStackWriter",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_BYTES",
    "image_header",
    "read_image",
    "read_label_image",
    "write_label_image",
    "write_float_stack",
    "read_float_stack",
    "label_suffix",
    "palette_from_colors",
]

_TIFF_SUFFIXES = {".tif", ".tiff"}

#: The largest 2D plane read (16384 x 16384 px): a 16000 x 16000 slide or mosaic fits.
MAX_IMAGE_PIXELS = 16384 * 16384
#: The most bytes one file may decode to (all planes and channels together).
MAX_IMAGE_BYTES = 2 << 30

# (channels, dtype) of Pillow's modes as imageio returns them (palette images become RGB(A)).
_PIL_MODES = {"1": (1, "bool"), "L": (1, "uint8"), "P": (4, "uint8"), "LA": (2, "uint8"),
              "PA": (4, "uint8"), "RGB": (3, "uint8"), "RGBA": (4, "uint8"), "CMYK": (4, "uint8"),
              "YCbCr": (3, "uint8"), "I;16": (1, "uint16"), "I;16B": (1, "uint16"),
              "I;16L": (1, "uint16"), "I": (1, "int32"), "F": (1, "float32")}
_PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_limit() -> Iterator[None]:
    """Pillow's own decompression-bomb limit (89 MP) raised to ours while we open a file.

    :func:`image_header` has already checked the size, so the files Pillow refuses (a 16000^2
    PNG) are ones napari-maskclip reads on purpose. The lock keeps the swap private.
    """
    from PIL import Image

    with _PIL_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        if previous is not None and previous < MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _unreadable(p: Path, exc: BaseException, what: str = "image") -> InvalidInputError:
    if type(exc).__name__ == "DecompressionBombError":  # Pillow's limit, at twice ours
        import re

        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels, " if found else ""
        return InvalidInputError(
            f"{p} is larger than napari-maskclip reads ({size}at most "
            f"{MAX_IMAGE_PIXELS // 2**20} megapixels per plane). Crop or downscale it first."
        )
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return InvalidInputError(
        f"Cannot read the {what} {p}: it is empty, truncated or not an image file ({reason}). "
        "Replace it with a complete PNG, JPEG or TIFF file, or leave it out."
    )


def image_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of an image file as :func:`read_image` would return it, from its header
    only, checked against the size limits (nothing is decoded)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"Image file not found: {p}")
    try:
        if p.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                if not tif.series:
                    raise ValueError("no image data")
                series = tif.series[0]
                shape, dtype = tuple(int(n) for n in series.shape), np.dtype(series.dtype)
                codec, copies, stored = tiff_codec(tif.pages.first), 1, None
        else:
            from PIL import Image

            with _pillow_limit(), Image.open(p) as image:
                width, height = image.size
                frames = int(getattr(image, "n_frames", 1) or 1)
                bands, kind = _PIL_MODES.get(image.mode, (4, "float64"))
                codec, copies = pillow_codec(image), 2  # Pillow's buffer, then numpy's array
                stored = pillow_stored_bytes(image)
            shape = ((frames,) if frames > 1 else ()) + (int(height), int(width))
            shape, dtype = shape + ((bands,) if bands > 1 else ()), np.dtype(kind)
    except InvalidInputError:
        raise
    except Exception as exc:  # any parser failure: a one-line message, not a traceback
        raise _unreadable(p, exc) from exc
    check_image_size(p, shape, dtype, codec, copies, stored)
    return shape, dtype


def check_image_size(p: Path, shape: tuple[int, ...], dtype: np.dtype, codec: str | None = None,
                     copies: int = 1, stored_bytes: int | None = None) -> None:
    """Refuse an image too large to read (or empty) before any of it is decoded.

    With ``codec`` (see :mod:`.decode_limits`) the file must also be able to hold the declared
    pixels, and ``copies`` of them must fit the memory this process may still use."""
    if len(shape) < 2 or min(shape) < 1:
        raise InvalidInputError(f"{p} holds no pixels (shape {shape}); use a non-empty image.")
    spatial = sorted(shape, reverse=True)[:2]
    plane = int(spatial[0]) * int(spatial[1])
    total = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if plane > MAX_IMAGE_PIXELS or total > MAX_IMAGE_BYTES:
        raise InvalidInputError(
            f"{p} is {' x '.join(map(str, shape))} ({total / 2**30:.1f} GiB decoded): larger than "
            f"napari-maskclip reads ({MAX_IMAGE_PIXELS // 2**20} megapixels per plane, "
            f"{MAX_IMAGE_BYTES / 2**30:.0f} GiB in all). Crop or downscale it first."
        )
    if codec is not None:
        check_payload(p, shape, dtype, codec, stored_bytes)
        check_fits_memory(p, total, copies)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a numpy array (TIFF via tifffile, anything else via imageio).

    The header is checked first (:func:`image_header`); an unreadable file raises
    :class:`InvalidInputError` with the file name.
    """
    p = Path(path)
    image_header(p)
    try:
        if p.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                return np.asarray(tif.series[0].asarray())
        import imageio.v3 as iio

        with _pillow_limit():
            return np.asarray(iio.imread(p))
    except InvalidInputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # unreadable or unknown format: one clear line for the user
        raise _unreadable(p, exc) from exc


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

        # No copy when the labels are uint8 already (a 16000^2 map is 256 MB).
        image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
        image.putpalette(palette_from_colors(colors))
        with atomic_write(target, overwrite=overwrite) as tmp:
            image.save(tmp, format="PNG", optimize=False)
    else:
        import tifffile

        with atomic_write(target, overwrite=overwrite) as tmp:
            tifffile.imwrite(tmp, np.ascontiguousarray(labels, dtype=np.uint16), compression="zlib")
    return target


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a label map written by :func:`write_label_image` (palette indices, not colours).

    Size-checked first; an unreadable file or a colour picture raises :class:`InvalidInputError`
    naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"Label file not found: {p}")
    try:
        if p.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                if not tif.series:
                    raise ValueError("no image data")
                series = tif.series[0]
                check_image_size(p, tuple(series.shape), np.dtype(series.dtype),
                                 tiff_codec(tif.pages.first))
                labels = np.asarray(series.asarray())
        else:
            from PIL import Image

            with _pillow_limit(), Image.open(p) as image:
                width, height = image.size
                check_image_size(p, (height, width), np.dtype(np.uint16), pillow_codec(image), 2,
                                 pillow_stored_bytes(image))
                if image.mode not in ("P", "L", "I", "I;16"):
                    raise InvalidInputError(
                        f"{p} is a colour image (mode {image.mode}), not a label map: labels must be "
                        "palette or grayscale PNGs holding class indices."
                    )
                labels = np.asarray(image)
    except InvalidInputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(p, exc, "label file") from exc
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"{p} holds {labels.dtype} values, not class indices (integers).")
    return labels


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
    stack = np.asarray(stack, dtype=dtype)
    if np.issubdtype(stack.dtype, np.floating) and not _all_finite(stack):
        raise InvalidInputError(
            f"Refusing to write {target}: the maps hold NaN or infinite values (a bug, or an image "
            "that could not be normalised). Nothing was written; please report it."
        )
    with atomic_write(target, overwrite=overwrite) as tmp:
        # minisblack: a 3- or 4-channel stack is C planes of data, not an RGB picture.
        tifffile.imwrite(tmp, np.asarray(stack, dtype=dtype), compression="zlib",
                         photometric="minisblack")
    return target


class FloatStackWriter(RawSpool):
    """Writes a float32 ``C x H x W`` TIFF (as :func:`write_float_stack`) from blocks of rows.

    For maps too large to hold: each ``C x rows x W`` block (all channels of some rows, the way
    the engine finishes them) is appended to a temporary raw file beside the target; :meth:`commit`
    then compresses each channel's strips into the TIFF, atomically. Memory holds one block; the
    disk holds the raw maps until the commit. A block with NaN or infinite values is refused.
    """

    def __init__(self, folder: str | os.PathLike, channels: int, height: int, width: int) -> None:
        super().__init__(folder)
        self.channels, self.height, self.width = int(channels), int(height), int(width)
        self._blocks: list[tuple[int, int, int]] = []  # (y0, y1, offset)
        self._rows = 0

    def __call__(self, y0: int, y1: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.shape != (self.channels, y1 - y0, self.width) or y0 != self._rows:
            raise ValueError(f"block {y0}:{y1} of shape {block.shape} out of order or shape")
        if not _all_finite(block):
            raise InvalidInputError("Refusing to write confidence maps holding NaN or infinite "
                                    "values (a bug); nothing was written, please report it.")
        self._blocks.append((y0, y1, self._file.tell()))
        self._file.write(block.astype("<f4", copy=False).tobytes())
        self._rows = y1

    def commit(self, path: str | os.PathLike, *, overwrite: bool = True,
               on_rows: Optional[Callable[[int], None]] = None) -> Path:
        """Write the TIFF at ``path`` from the blocks (all rows must be in) and drop the temp file.
        ``on_rows(n)`` after each strip of ``n`` rows of one channel is compressed (the commit of
        a huge image's maps takes minutes: this is its progress)."""
        import zlib

        import tifffile

        if self._rows != self.height:
            raise ValueError(f"{self._rows} of {self.height} rows written")
        self._file.flush()
        rows = [(y1 - y0, offset) for y0, y1, offset in self._blocks]
        strip_rows = rows[0][0]

        def strips() -> Iterator[bytes]:
            for c in range(self.channels):
                for n, offset in rows:
                    self._file.seek(offset + c * n * self.width * 4)
                    strip = zlib.compress(self._file.read(n * self.width * 4), 6)
                    if on_rows is not None:
                        on_rows(n)
                    yield strip

        target = Path(path)
        try:
            with atomic_write(target, overwrite=overwrite) as tmp:
                tifffile.imwrite(tmp, strips(), shape=(self.channels, self.height, self.width),
                                 dtype="<f4", compression="zlib", photometric="minisblack",
                                 rowsperstrip=strip_rows)
        finally:
            self.discard()
        return target


def _all_finite(array: np.ndarray, rows: int = 256) -> bool:
    """``np.isfinite(array).all()`` without a full-size boolean temporary."""
    flat = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
    return all(bool(np.isfinite(flat[i:i + rows]).all()) for i in range(0, flat.shape[0], rows))



def read_float_stack(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF written by :func:`write_float_stack` (size-checked; one-line errors)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"File not found: {p}")
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            if not tif.series:
                raise ValueError("no image data")
            series = tif.series[0]
            check_image_size(p, tuple(series.shape), np.dtype(series.dtype),
                             tiff_codec(tif.pages.first))
            return np.asarray(series.asarray())
    except InvalidInputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(p, exc, "TIFF") from exc
