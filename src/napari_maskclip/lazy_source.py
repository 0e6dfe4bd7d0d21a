"""Images too big for memory, read lazily: a zarr array, an OME-Zarr group's level, a TIFF.

:func:`open_source` opens the array without reading pixels; :meth:`LazySource.read` returns one
region as a NumPy array, channels last (what :class:`~napari_maskclip.engine.preprocess.PreparedImage`
expects). :func:`plan_source` decides how its values become 0..1 exactly as
:func:`~napari_maskclip.engine.preprocess.plan_image` does for the same array in memory (the
same min/max and ``[::step, ::step]`` subsample), reading it a block at a time.

A :class:`SourceSpec` (a path and a level) is what travels to dask workers: each process opens
the file itself (a TIFF's zarr store holds an open file and cannot be sent).

Sizes are bounded before anything is planned (:data:`MAX_LAZY_PIXELS`), and a chunk that cannot
be decoded is one line naming the store and the chunk (:mod:`.checked_chunks`).

Needs ``zarr`` (the ``distributed`` extra).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .checked_chunks import read_region
from .errors import InvalidInputError

__all__ = ["SourceSpec", "LazySource", "open_source", "plan_source", "is_lazy_source",
           "MAX_LAZY_PIXELS", "MAX_LAZY_CHANNELS"]

_LAZY_SIDE = 1 << 18
#: The largest plane segmented lazily (262144 x 262144 px, ~69 gigapixels: a whole-slide image
#: fits): its tile list and output store are planned from this size.
MAX_LAZY_PIXELS = _LAZY_SIDE * _LAZY_SIDE
#: The most channels a lazy image's channel axis may have (read with every tile).
MAX_LAZY_CHANNELS = 4096

_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff")
_OPEN: dict[SourceSpec, "LazySource"] = {}
_OPEN_LOCK = threading.Lock()


def is_lazy_source(path: str | Path) -> bool:
    """A path ``segment --out X.zarr`` can read lazily: a zarr directory or a TIFF file."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in _TIFF_SUFFIXES or p.name.lower().endswith(".zarr")


def _need_zarr():
    try:
        import zarr
    except ImportError as exc:
        raise InvalidInputError(
            "Huge images need zarr: pip install 'napari-maskclip[distributed]'") from exc
    return zarr


@dataclass(frozen=True)
class SourceSpec:
    """What identifies a lazy image: its path, the pyramid level and the channel options."""

    path: str
    level: Optional[int] = None
    channel_axis: Optional[int] = None
    #: The file's (or zarr metadata's) size and modification time: a rewritten file is reopened.
    stamp: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, path: str | Path, level: Optional[int] = None,
           channel_axis: Optional[int] = None) -> "SourceSpec":
        p = Path(path).resolve()
        stamp = (0, 0)
        for candidate in (p, p / "zarr.json", p / ".zarray", p / ".zgroup"):
            if candidate.is_file():
                st = candidate.stat()
                stamp = (int(st.st_size), int(st.st_mtime_ns))
                break
        return cls(str(p), level, channel_axis, stamp)

    def open(self) -> "LazySource":
        """The opened source, once per process (workers reuse it for every tile)."""
        with _OPEN_LOCK:
            if self not in _OPEN:
                _OPEN[self] = open_source(self.path, level=self.level,
                                          channel_axis=self.channel_axis)
            return _OPEN[self]


class LazySource:
    """A 2D image (optionally with channels) inside an N-D lazy array."""

    def __init__(self, array: Any, name: str, y: int, x: int, c: Optional[int],
                 where: str = "") -> None:
        self.array, self.name = array, name
        #: The store or file, named when a chunk cannot be read.
        self.where = where or name
        self.y, self.x, self.c = y, x, c
        self.dtype = np.dtype(array.dtype)
        self.height, self.width = int(array.shape[y]), int(array.shape[x])
        self.channels = None if c is None else int(array.shape[c])

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0:y1``, columns ``x0:x1`` as ``h x w`` or ``h x w x C`` (channels last)."""
        index: list[Any] = [0] * len(self.array.shape)
        index[self.y], index[self.x] = slice(y0, y1), slice(x0, x1)
        kept = [self.y, self.x]
        if self.c is not None:
            index[self.c] = slice(None)
            kept.append(self.c)
        data = read_region(self.array, tuple(index), self.where)
        order = sorted(kept)  # the axes left, in stored order
        return np.transpose(data, [order.index(a) for a in kept])


def open_source(path: str | Path, *, level: Optional[int] = None,
                channel_axis: Optional[int] = None) -> LazySource:
    """Open ``path`` (a zarr array, an OME-Zarr group: level ``level`` or 0, or a TIFF read
    through tifffile's zarr store) without reading its pixels."""
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file or folder.")
    zarr = _need_zarr()
    axes = None
    if p.is_dir():
        if _own_result(p):
            raise InvalidInputError(f"{p} is a napari-maskclip result, not an image.")
        try:
            node = zarr.open(str(p), mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for a non-zarr folder
            raise InvalidInputError(f"{p} is not a zarr array or OME-Zarr group "
                                    f"({type(exc).__name__}).") from exc
        if not hasattr(node, "shape"):
            node, axes = _ome_level(node, p, level)
        elif level not in (None, 0):
            raise InvalidInputError(f"{p} is a single zarr array: it has no level {level}.")
    elif p.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        try:
            store = tifffile.imread(str(p), aszarr=True, level=level or 0)
            node = zarr.open(store, mode="r")
        except IndexError as exc:
            raise InvalidInputError(f"{p} has no pyramid level {level}.") from exc
        except Exception as exc:  # noqa: BLE001 - tifffile/zarr errors for a broken TIFF
            raise InvalidInputError(f"{p} cannot be read as a TIFF ({type(exc).__name__}).") from exc
        if not hasattr(node, "shape"):
            raise InvalidInputError(f"{p}: a TIFF of several series; save the image alone.")
    else:
        raise InvalidInputError(f"{p}: huge images are read from a .zarr folder or a TIFF file.")
    return _source(node, p.name, axes, channel_axis, str(p))


def _own_result(path: Path) -> bool:
    meta = path / "zarr.json"
    try:
        if meta.stat().st_size > (1 << 20):
            return False
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, RecursionError, AttributeError):
        return False
    return isinstance(attrs, dict) and "napari_maskclip" in attrs


def _ome_level(group: Any, path: Path, level: Optional[int]):
    """The array of OME-Zarr level ``level`` (0: full resolution) and its axes."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    multiscales = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict)
                                               else None)
    if not multiscales:
        raise InvalidInputError(
            f"{path} is a zarr group without OME-Zarr multiscales: give the path of its image "
            "array (e.g. IMAGE.zarr/0).")
    if (not isinstance(multiscales, list) or not isinstance(multiscales[0], dict)
            or not isinstance(multiscales[0].get("datasets") or [], list)
            or not isinstance(multiscales[0].get("axes") or [], list)):
        raise InvalidInputError(f"{path}: its OME-Zarr multiscales metadata is malformed (a list "
                                "of objects with 'datasets' and 'axes' lists expected).")
    datasets = multiscales[0].get("datasets") or []
    level = level or 0
    if not 0 <= level < len(datasets):
        raise InvalidInputError(f"{path} has {len(datasets)} level(s); there is no level {level}.")
    try:
        array = group[datasets[level]["path"]]
    except Exception as exc:  # noqa: BLE001 - a missing or malformed path: zarr raises many kinds
        raise InvalidInputError(f"{path}: level {level}'s array is missing.") from exc
    axes = multiscales[0].get("axes")
    names = [a.get("name") if isinstance(a, dict) else a for a in axes] if axes else None
    return array, names


def _source(array: Any, name: str, axes: Optional[Sequence[str]], channel_axis: Optional[int],
            where: str = "") -> LazySource:
    source = _source_axes(array, name, axes, channel_axis, where)
    _check_size(source)
    return source


def _check_size(source: LazySource) -> None:
    """Refuse sizes no image has (a zarr.json or TIFF tag can claim any): the work and the
    output store follow the plane's size, so it is bounded before anything is planned."""
    if source.height * source.width > MAX_LAZY_PIXELS:
        raise InvalidInputError(
            f"{source.where} declares a {source.width} x {source.height} image: more than "
            f"napari-maskclip segments ({MAX_LAZY_PIXELS / 1e9:.0f} gigapixels, e.g. "
            f"{_LAZY_SIDE} x {_LAZY_SIDE}). Check its metadata, or crop it first.")
    if source.channels is not None and source.channels > MAX_LAZY_CHANNELS:
        raise InvalidInputError(
            f"{source.where} has {source.channels} channels on its channel axis (at most "
            f"{MAX_LAZY_CHANNELS}); check --channel-axis or its metadata.")


def _source_axes(array: Any, name: str, axes: Optional[Sequence[str]],
                 channel_axis: Optional[int], where: str) -> LazySource:
    shape = tuple(int(n) for n in array.shape)
    if not np.issubdtype(np.dtype(array.dtype), np.number) and np.dtype(array.dtype) != np.bool_:
        raise InvalidInputError(f"{name}: values of type {array.dtype} are not an image.")
    if axes is not None and len(axes) == len(shape) and "y" in axes and "x" in axes:
        y, x = axes.index("y"), axes.index("x")
        c = axes.index("c") if "c" in axes else None
        if channel_axis is not None:
            c = channel_axis % len(shape)
        others = [i for i in range(len(shape)) if i not in (y, x, c) and shape[i] != 1]
        if others:
            raise InvalidInputError(
                f"{name} has axes {''.join(axes)} of shape {shape}: huge images are one 2D plane; "
                "save the plane (one t, one z) as its own array.")
        return LazySource(array, name, y, x, c, where)
    if len(shape) == 2:
        if channel_axis is not None:
            raise InvalidInputError(f"{name} is 2D ({shape}): it has no channel axis.")
        return LazySource(array, name, 0, 1, None, where)
    if len(shape) == 3:
        if channel_axis is not None and not -3 <= channel_axis < 3:
            raise InvalidInputError(f"channel_axis {channel_axis} is out of range for {shape}.")
        c = 2 if channel_axis is None else channel_axis % 3
        y, x = [a for a in range(3) if a != c]
        return LazySource(array, name, y, x, c, where)
    raise InvalidInputError(
        f"{name} has shape {shape}: huge images are 2D (gray), or 2D with a channel axis "
        "(--channel-axis); OME-Zarr axes other than c, y, x must have size 1.")


def plan_source(source: LazySource, channels: Optional[Sequence[int]], block: int = 1024):
    """``(channels, rule)`` of :class:`~napari_maskclip.engine.preprocess.PreparedImage` for
    the whole source: the same decision and the same numbers as ``plan_image`` on it in memory,
    from one pass over it in ``block``-px squares (none for uint8 and bool images)."""
    from .engine.preprocess import subsample_step, unit_rule

    mode: Any
    n = source.channels
    picks: Any  # what plan_image's rule sees: the whole 2D array, one channel, or a list
    if n is None:
        mode, picks, per_channel = None, None, False
    elif channels is None:
        if n == 1:
            mode, picks, per_channel = None, 0, False
        elif n in (3, 4):
            mode, picks, per_channel = "rgb", [0, 1, 2], False
        else:
            raise InvalidInputError(
                f"The image has {n} channels: choose 1 or 3 of them (--channels I or R,G,B) to "
                "show CLIP as gray or RGB.")
    else:
        picks = [int(c) for c in channels]
        if len(picks) not in (1, 3):
            raise InvalidInputError(f"Pick 1 or 3 channels, got {len(picks)}.")
        for c in picks:
            if not -n <= c < n:
                raise InvalidInputError(f"Channel {c} does not exist (the image has {n}).")
        mode, per_channel = picks, True
    dtype = source.dtype
    if np.iscomplexobj(np.zeros(0, dtype)):
        raise InvalidInputError("Complex-valued images are not supported; pass magnitudes.")
    floating = np.issubdtype(dtype, np.floating)
    step = subsample_step(source.shape)
    stats = _Stats(floating, dtype not in (np.dtype(np.uint8), np.dtype(np.bool_)), step,
                   source.shape, len(picks) if isinstance(picks, list) else None)
    if stats.needed:
        for y0 in range(0, source.height, block):
            for x0 in range(0, source.width, block):
                y1, x1 = min(source.height, y0 + block), min(source.width, x0 + block)
                raw = source.read(y0, y1, x0, x1)
                if floating and not np.isfinite(raw).all():
                    raise InvalidInputError(
                        "The image contains NaN or infinite values; replace them (e.g. "
                        "np.nan_to_num) first.")
                stats.add(raw if picks is None else raw[..., picks], y0, x0)
    rule = unit_rule(dtype, source.shape, stats.min_max, stats.sample, per_channel=per_channel)
    return mode, rule


class _Stats:
    """Min/max and the ``[::step, ::step]`` subsample of an image seen block by block."""

    def __init__(self, floating: bool, sampled: bool, step: int, shape: tuple[int, int],
                 channels: Optional[int]) -> None:
        self.floating, self.sampled, self.step = floating, sampled, step
        self.needed = floating or sampled
        self.lo, self.hi = np.inf, -np.inf
        rows, cols = -(-shape[0] // step), -(-shape[1] // step)
        extra = () if channels is None else (channels,)
        self._sample: Optional[np.ndarray] = None
        self._shape = (rows, cols, *extra)

    def add(self, block: np.ndarray, y0: int, x0: int) -> None:
        if self.floating:
            self.lo = min(self.lo, float(np.min(block)))
            self.hi = max(self.hi, float(np.max(block)))
        if self.sampled:
            if self._sample is None:
                self._sample = np.zeros(self._shape, block.dtype)
            oy, ox = (-y0) % self.step, (-x0) % self.step
            part = block[oy::self.step, ox::self.step]
            ry, rx = (y0 + oy) // self.step, (x0 + ox) // self.step
            self._sample[ry:ry + part.shape[0], rx:rx + part.shape[1]] = part

    def min_max(self) -> tuple[float, float]:
        return self.lo, self.hi

    def sample(self, step: int) -> np.ndarray:
        assert step == self.step and self._sample is not None
        return self._sample
