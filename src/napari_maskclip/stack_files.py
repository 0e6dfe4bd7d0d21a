"""Stacks and time series on disk: which image files are stacks, reading them one slice at a
time, and writing stacked outputs one slice at a time.

* :func:`stack_input` decides, from the header only, whether an image file is a 2D image (None:
  the usual path) or a stack, and gives its :class:`~napari_maskclip.stacks.StackLayout`. The
  axes come from the TIFF's OME/ImageJ/shaped metadata where present (``C`` is the channel axis,
  a trailing ``S`` RGB samples), ``--channel-axis`` wins.
* :class:`TiffPlanes` reads a TIFF series lazily: ``planes[key]`` decodes only the pages the key
  needs (one slice, all its channels), so a stack is never loaded whole.
* :class:`PagedStackWriter` writes a ``... x H x W`` TIFF whose pages arrive in any order (the
  confidence TIFF is class-major, ``C x T x Z x H x W``, but is made slice by slice): pages go to
  a temporary raw file beside the target, and :meth:`PagedStackWriter.commit` compresses them,
  one page in memory at a time, into the TIFF, atomically.

Imports neither torch nor napari (numpy and tifffile).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .atomic import RawSpool
from .errors import InvalidInputError
from .stacks import DEFAULT_AXES, StackLayout

__all__ = ["StackInput", "stack_input", "TiffPlanes", "PagedStackWriter", "MAX_LOOP_AXES"]

_TIFF_SUFFIXES = {".tif", ".tiff"}

#: Leading axes a stack may loop over besides a channel axis (time and z), as export names them.
MAX_LOOP_AXES = max(DEFAULT_AXES)


@dataclass(frozen=True)
class StackInput:
    """An image file that is a stack: its layout and the axis letters its metadata gives."""

    path: Path
    layout: StackLayout
    axes: Optional[str] = None

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The looped axes' lengths (the outputs' leading axes)."""
        return tuple(self.layout.data_shape[a] for a in self.layout.loop_axes)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The labels' shape: looped axes, then the plane (channel and RGB axes dropped)."""
        return self.lead_shape + tuple(self.layout.plane_shape)


def _metadata_axes(path: Path, ndim: int) -> Optional[str]:
    """The axis letters of a TIFF's first series when its metadata names them, else None."""
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return None
    import tifffile

    with contextlib.suppress(Exception), tifffile.TiffFile(path) as tif:
        if tif.series and (tif.is_ome or tif.is_imagej or tif.is_shaped):
            axes = str(tif.series[0].axes).upper()
            if len(axes) == ndim:  # Q and I are unnamed axes
                return axes
    return None


def _empty_page(path: Path) -> Optional[int]:
    """The number of the first page of a TIFF that holds no pixels, else None."""
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                shape = getattr(page, "shape", None)
                if shape is not None and (len(shape) == 0 or min(shape) < 1):
                    return i
    except Exception as exc:  # a damaged page directory: one line naming the file
        raise InvalidInputError(
            f"Cannot read the pages of {path} ({' '.join(str(exc).split())[:200]}); the file is "
            "truncated or damaged: save the stack again."
        ) from exc
    return None


def stack_input(
    path: Path,
    shape: Sequence[int],
    *,
    channel_axis: Optional[int],
    channels: Optional[Sequence[int]],
) -> Optional[StackInput]:
    """A :class:`StackInput` when the file of ``shape`` is a stack or time series, None for a 2D
    image (grey, RGB(A), or ``H x W x C``/``C x H x W`` with ``--channel-axis``/``--channels``).

    Raises a one-line :class:`InvalidInputError` for stacks the command line cannot loop over:
    a channel axis that is not a leading axis, more than two looped axes, an empty page.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    axes = _metadata_axes(path, ndim) if ndim > 2 else None
    rgb = bool(axes and axes.endswith("S") and shape[-1] in (3, 4))
    if axes is None and ndim >= 4 and channel_axis is None and shape[-1] in (3, 4):
        rgb = True  # frames of colour pictures (a file without axis names)
    plane_ndim = 3 if rgb else 2
    if ndim <= 2 or (ndim == 3 and (rgb or channel_axis is not None or channels is not None
                                    or (axes is None and shape[-1] in (1, 3, 4))
                                    or (axes is not None and ("C" in axes or axes[0] == "S")))):
        return None  # a 2D image: the usual path decides about its channels
    if channel_axis is None and axes and "C" in axes[: ndim - plane_ndim]:
        channel_axis = axes.index("C")  # from the OME/ImageJ metadata
    if channel_axis is not None:
        if not -ndim <= channel_axis < ndim:
            raise InvalidInputError(
                f"{path} has {ndim} axes (shape {shape}): --channel-axis {channel_axis} is not "
                f"one of them; give an axis 0..{ndim - 1 - plane_ndim}."
            )
        channel_axis %= ndim
        if channel_axis >= ndim - plane_ndim:
            raise InvalidInputError(
                f"{path} is a stack of shape {shape}: --channel-axis {channel_axis} is an axis "
                f"of the image plane; a stack's channel axis must be one of the leading axes "
                f"0..{ndim - 1 - plane_ndim}."
            )
    layout = StackLayout(shape, rgb=rgb, channel_axis=channel_axis)
    if len(layout.loop_axes) > MAX_LOOP_AXES:
        raise InvalidInputError(
            f"{path} has shape {shape}: {len(layout.loop_axes)} axes to loop over besides the "
            f"image plane{' and the channels' if channel_axis is not None else ''}. The command "
            "line segments stacks with at most two (time and z); if one of them holds channels, "
            "give it with --channel-axis."
        )
    if channels is not None and channel_axis is None:
        raise InvalidInputError(
            f"{path} is a stack of shape {shape}: --channels needs --channel-axis (which of the "
            "leading axes holds the channels)."
        )
    if channels is not None:
        n = shape[channel_axis]
        bad = [c for c in channels if not 0 <= c < n]
        if bad:
            raise InvalidInputError(
                f"--channels {','.join(map(str, channels))}: {path} has {n} channels on axis "
                f"{channel_axis} (0..{n - 1})."
            )
    empty = _empty_page(path)
    if empty is not None:
        raise InvalidInputError(
            f"{path}: page {empty} of the stack holds no pixels; every slice of a stack must be "
            "an image of the same size. Remove the empty page or save the stack again."
        )
    return StackInput(path, layout, axes)


class TiffPlanes:
    """The first series of a TIFF as a lazy array: indexing decodes only the pages it needs.

    Keys are tuples of integers and ``slice(None)`` over the leading (page) axes, as
    :meth:`StackLayout.read_plane` and the export's slicing give; a file whose pages are not one
    plane each (a planar RGB page, a volume per page) is read whole on first use.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import tifffile

        self.path = Path(path)
        try:
            with tifffile.TiffFile(self.path) as tif:
                if not tif.series:
                    raise ValueError("no image data")
                series = tif.series[0]
                self.shape = tuple(int(s) for s in series.shape)
                self.dtype = np.dtype(series.dtype)
                self.axes = str(series.axes)
                n_pages = len(series.pages)
        except Exception as exc:
            raise InvalidInputError(f"Cannot read the TIFF {self.path}: "
                                    f"{' '.join(str(exc).split())[:200]}") from exc
        page_ndim = 3 if self.axes.endswith("S") else 2
        self._lead = self.shape[: len(self.shape) - page_ndim]
        self._paged = n_pages == int(np.prod(self._lead, dtype=np.int64)) and len(self._lead) > 0
        self._whole: Optional[np.ndarray] = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self[()]
        return array if dtype is None else array.astype(dtype)

    def _read(self, pages: list[int]) -> np.ndarray:
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                if not self._paged:
                    if self._whole is None:
                        self._whole = np.asarray(tif.series[0].asarray())
                    return self._whole
                data = tif.series[0].asarray(key=pages if len(pages) > 1 else pages[0])
        except Exception as exc:  # a truncated or corrupt page: one line naming the file
            raise InvalidInputError(
                f"Cannot read pages of {self.path} ({' '.join(str(exc).split())[:200]}); the file "
                "is truncated or damaged: save the stack again."
            ) from exc
        return np.asarray(data).reshape((len(pages),) + self.shape[len(self._lead):])

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        lead = list(key[: len(self._lead)]) + [slice(None)] * (len(self._lead) - len(key))
        rest = tuple(key[len(self._lead):])
        ranges = [range(n)[k] if isinstance(k, slice) else [range(n)[int(k)]]
                  for k, n in zip(lead, self._lead)]
        picked = [list(r) for r in ranges]
        if not self._paged:
            return self._read([])[tuple(key)]
        grid = np.stack(np.meshgrid(*picked, indexing="ij"), axis=-1).reshape(-1, len(picked))
        pages = [int(np.ravel_multi_index(tuple(g), self._lead)) for g in grid]
        data = self._read(pages)
        data = data.reshape(tuple(len(p) for p in picked) + data.shape[1:])
        scalar = tuple(0 if not isinstance(k, slice) else slice(None) for k in lead)
        return data[scalar + rest]


class PagedStackWriter(RawSpool):
    """A TIFF of ``shape`` (pages over all leading axes) written one page or block at a time.

    :meth:`put` takes whole pages, :meth:`rows` blocks of rows of some pages (as the engine
    streams a huge slice's confidence); they go to a temporary raw file beside the target, so
    memory holds what the caller passes. :meth:`commit` compresses the pages, in page order, into
    the TIFF at its path, atomically; :meth:`discard` drops the temporary file (also on failure).
    Float pages with NaN or infinite values are refused.
    """

    def __init__(self, folder: str | os.PathLike, shape: Sequence[int], dtype: Any) -> None:
        super().__init__(folder)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.lead = self.shape[:-2]
        self.height, self.width = self.shape[-2:]
        self.page_bytes = self.height * self.width * self.dtype.itemsize
        self.n_pages = int(np.prod(self.lead, dtype=np.int64))
        self._rows = np.zeros(self.n_pages, dtype=np.int64)  # rows written per page
        #: The largest array this writer was handed at once (bytes), for the memory tests.
        self.largest_block = 0

    def page(self, index: Sequence[int]) -> int:
        """The page number of a leading index."""
        return int(np.ravel_multi_index(tuple(int(i) for i in index), self.lead))

    def rows(self, pages: Sequence[int], y0: int, y1: int, block: np.ndarray) -> None:
        """Rows ``y0:y1`` of ``pages``: ``block`` is ``len(pages) x (y1 - y0) x W``."""
        block = np.asarray(block)
        if block.shape != (len(pages), y1 - y0, self.width):
            raise ValueError(f"block of shape {block.shape} for rows {y0}:{y1} of {len(pages)} pages")
        if np.issubdtype(self.dtype, np.floating) and not np.isfinite(block).all():
            raise InvalidInputError("Refusing to write confidence maps holding NaN or infinite "
                                    "values (a bug); nothing was written, please report it.")
        self.largest_block = max(self.largest_block, block.nbytes)
        for page, plane in zip(pages, block):
            if self._rows[page] != y0:
                raise ValueError(f"rows {y0}:{y1} of page {page} out of order")
            self._file.seek(page * self.page_bytes + y0 * self.width * self.dtype.itemsize)
            self._file.write(np.ascontiguousarray(plane, dtype=self.dtype).tobytes())
            self._rows[page] = y1

    def put(self, pages: Sequence[int], planes: np.ndarray) -> None:
        """Whole ``pages``: ``planes`` is ``len(pages) x H x W``."""
        self.rows(pages, 0, self.height, planes)

    def _pages(self) -> Iterator[np.ndarray]:
        for page in range(self.n_pages):
            self._file.seek(page * self.page_bytes)
            data = self._file.read(self.page_bytes)
            yield np.frombuffer(data, dtype=self.dtype).reshape(self.height, self.width)

    def commit(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the TIFF (every page must be complete) and drop the temporary file."""
        import tifffile

        from .atomic import atomic_write

        missing = np.flatnonzero(self._rows != self.height)
        if missing.size:
            raise ValueError(f"{missing.size} of {self.n_pages} pages not written")
        self._file.flush()
        target = Path(path)
        try:
            with atomic_write(target, overwrite=overwrite) as tmp:
                tifffile.imwrite(tmp, self._pages(), shape=self.shape, dtype=self.dtype,
                                 compression="zlib", photometric="minisblack")
        finally:
            self.discard()
        return target
