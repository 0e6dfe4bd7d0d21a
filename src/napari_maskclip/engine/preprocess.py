"""Turning any 2D image into what CLIP expects.

Accepted: gray ``HxW``, RGB ``HxWx3``, RGBA ``HxWx4`` (alpha dropped), and multichannel images
with an explicit mapping of 1 or 3 channels (microscopy); uint8, uint16, other integers, bool and
float. Intensities become 0..1:

* uint8 / bool: divided by their range, as photos are.
* float already within 0..1: kept.
* anything else (uint16, int, float outside 0..1): robust percentiles (1st and 99.8th) mapped to
  0..1 and clipped, jointly for RGB (colours keep their balance) and per channel for channels
  picked from a multichannel image (fluorescence channels are independent).

Then CLIP's mean/std is applied (by the segmenter). NaN or infinite values, empty images and more
than 3 dimensions are rejected with a message saying what to do.

Finite but extreme values (up to float64's 1.8e308) cannot overflow: values beyond 1e30 in
magnitude are scaled by an exact power of two before the float32 arithmetic, so the range maths
never leaves float32 and no NaN can appear.

The rule is decided once per image (:func:`plan_image`, a few passes over the raw pixels and a
subsample for the percentiles, no float copy) and applied to any crop
(:meth:`PreparedImage.window`), so a huge image is converted window by window: only the window
being encoded is ever in float. :func:`prepare_image` is the whole image at once; a window of it
equals the same window of :func:`prepare_image`'s output bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = ["prepare_image", "plan_image", "PreparedImage", "check_image_array", "PERCENTILES",
           "unit_rule", "subsample_step"]

PERCENTILES = (1.0, 99.8)

# Magnitudes above this are scaled down (by a power of two) before the float32 range maths.
_SAFE_MAGNITUDE = 1e30
# Rows per block when scanning a big image (bounded temporaries).
_SCAN_ROWS = 512


@dataclass(frozen=True)
class _Rule:
    """How one array's raw values become 0..1: ``kind`` and, for percentiles, lo and span."""

    kind: str  # "bool", "uint8", "unit" (float already in 0..1) or "percentile"
    lo: Optional[np.ndarray] = None  # float32, broadcastable to a crop
    span: Optional[np.ndarray] = None
    prescale: Optional[float] = None  # exact power of two applied first (extreme values)

    def apply(self, crop: np.ndarray) -> np.ndarray:
        if self.kind == "bool":
            return crop.astype(np.float32)
        if self.kind == "uint8":
            return crop.astype(np.float32) / 255.0
        if self.kind == "unit":
            return crop.astype(np.float32, copy=False)
        data = _as_float32(crop, self.prescale)
        with np.errstate(over="ignore"):  # a tiny span: saturates to inf, clipped to 1 below
            out = (data - self.lo) / self.span
        return np.clip(out, 0.0, 1.0, out=out)


def _as_float32(data: np.ndarray, prescale: Optional[float]) -> np.ndarray:
    if prescale is None:
        return data.astype(np.float32, copy=False)
    with np.errstate(under="ignore"):
        return (data.astype(np.float64) * prescale).astype(np.float32)


def _scan(data: np.ndarray, fn) -> list:
    """``fn`` on blocks of rows (a full-size temporary of a 16000^2 image is 256 MB and up)."""
    return [fn(data[y:y + _SCAN_ROWS]) for y in range(0, data.shape[0], _SCAN_ROWS)]


def _min_max(data: np.ndarray) -> tuple[float, float]:
    parts = _scan(data, lambda b: (float(np.min(b)), float(np.max(b))))
    return min(p[0] for p in parts), max(p[1] for p in parts)


def _unit_rule(data: np.ndarray, *, per_channel: bool) -> _Rule:
    """The rule for ``data`` (``H x W`` or ``H x W x C``): see the module doc."""
    return unit_rule(data.dtype, data.shape[:2], lambda: _min_max(data),
                     lambda step: data[::step, ::step], per_channel=per_channel)


def subsample_step(shape: Sequence[int]) -> int:
    """The step of the ``[::step, ::step]`` subsample the percentiles are taken from."""
    return max(1, int(np.sqrt(shape[0] * shape[1] / 1_000_000)))


def unit_rule(
    dtype: np.dtype,
    shape: Sequence[int],
    min_max: Callable[[], tuple[float, float]],
    subsample: Callable[[int], np.ndarray],
    *,
    per_channel: bool,
) -> _Rule:
    """The rule of an image known by its dtype, ``H x W`` shape, a ``min_max()`` of all its
    values and a ``subsample(step)`` (its ``[::step, ::step]``): an image that is not in memory
    (a zarr array, :mod:`napari_maskclip.huge`) gets exactly the rule of the same array in memory."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return _Rule("bool")
    if dtype == np.uint8:
        return _Rule("uint8")
    prescale = None
    if np.issubdtype(dtype, np.floating):
        lo, hi = min_max()
        if lo >= 0.0 and hi <= 1.0:
            return _Rule("unit")
        magnitude = max(abs(lo), abs(hi))
        if magnitude > _SAFE_MAGNITUDE:
            # 2**-k brings the largest magnitude to about 1e30: exact, and far from overflow.
            prescale = float(2.0 ** -(int(np.ceil(np.log2(magnitude))) - 100))
    elif not np.issubdtype(dtype, np.integer):
        raise InvalidInputError(f"Unsupported image dtype {dtype}: use integer or float data.")
    axis = (0, 1) if per_channel else None
    # Subsample big images for the percentiles: exact enough, and 4096^2 stays fast.
    sample = _as_float32(subsample(subsample_step(shape)), prescale)
    lo = np.percentile(sample, PERCENTILES[0], axis=axis, keepdims=True)
    hi = np.percentile(sample, PERCENTILES[1], axis=axis, keepdims=True)
    with np.errstate(over="ignore"):
        span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    if not np.all(np.isfinite(span)):  # hi - lo overflowed float32: cannot after the prescale
        raise InvalidInputError("The image's value range cannot be normalised; rescale it first.")
    return _Rule("percentile", lo.astype(np.float32), span, prescale)


@dataclass(frozen=True)
class PreparedImage:
    """A 2D image and the rule that turns any window of it into float32 0..1 RGB.

    ``raw`` is the caller's array (a view, channels last), never copied whole.
    """

    raw: np.ndarray
    #: ``None``: gray (repeated to RGB); ``"rgb"``: the first three channels, jointly scaled;
    #: a list: the picked channels, scaled per channel (one is repeated to RGB).
    channels: object
    rule: _Rule

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.raw.shape[0]), int(self.raw.shape[1])

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Float32 ``h x w x 3`` in 0..1 of rows ``y0:y1``, columns ``x0:x1``."""
        crop = self.raw[y0:y1, x0:x1]
        if self.channels is None:
            if crop.ndim == 3:  # a single channel
                crop = crop[..., 0]
            return np.repeat(self.rule.apply(crop)[..., None], 3, axis=-1)
        if self.channels == "rgb":
            return self.rule.apply(crop[..., :3])
        unit = self.rule.apply(crop[..., list(self.channels)])
        if unit.shape[-1] == 1:
            unit = np.repeat(unit, 3, axis=-1)
        return np.ascontiguousarray(unit, dtype=np.float32)

    def whole(self) -> np.ndarray:
        """The whole image as float32 ``H x W x 3`` in 0..1."""
        return self.window(0, self.shape[0], 0, self.shape[1])


def check_image_array(image: np.ndarray) -> np.ndarray:
    """Cheap checks (no pass over the pixels) that an array can be an image at all."""
    data = np.asarray(image)
    if data.dtype == object or data.size == 0:
        raise InvalidInputError(f"The image is empty or not numeric (shape {data.shape}).")
    if data.ndim < 2 or data.ndim > 3:
        raise InvalidInputError(
            f"Got an array of shape {data.shape}: the engine segments one 2D image at a time "
            "(gray, RGB, RGBA, or channels with channel_axis). Pass one 2D slice of a stack or "
            "time series at a time (the napari widget does this for you, slice by slice)."
        )
    return data


def plan_image(
    image: np.ndarray,
    *,
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
) -> PreparedImage:
    """Check ``image`` and decide how it becomes 0..1 RGB, without converting it (see module doc).

    Args:
        image: a 2D image, optionally with a channel axis.
        channel_axis: the axis holding channels, if not the last one of an RGB(A) image.
        channels: 1 or 3 channel indices to use from a multichannel image (1 = shown as gray).
    """
    data = np.asarray(image)
    if data.dtype == object or data.size == 0:
        raise InvalidInputError("The image is empty or not numeric.")
    if data.ndim > 3 or (data.ndim == 3 and channel_axis is None and data.shape[-1] not in (1, 3, 4)
                         and channels is None):
        raise InvalidInputError(
            f"Got an image of shape {data.shape}: the engine segments one 2D image at a time "
            "(gray, RGB, RGBA, or channels with channel_axis). Pass one 2D slice of a stack or "
            "time series at a time (the napari widget does this for you, slice by slice)."
        )
    if data.ndim < 2:
        raise InvalidInputError(f"Got an array of shape {data.shape}; an image needs 2 dimensions.")
    if np.iscomplexobj(data):
        raise InvalidInputError("Complex-valued images are not supported; pass magnitudes.")
    if np.issubdtype(data.dtype, np.floating) and not all(
            _scan(data, lambda b: bool(np.isfinite(b).all()))):
        raise InvalidInputError(
            "The image contains NaN or infinite values; replace them (e.g. np.nan_to_num) first."
        )

    if data.ndim == 2:
        return PreparedImage(data, None, _unit_rule(data, per_channel=False))

    if channel_axis is not None:
        if not -3 <= channel_axis < 3:
            raise InvalidInputError(f"channel_axis {channel_axis} is out of range for a 3D image.")
        data = np.moveaxis(data, channel_axis, -1)
    n_channels = data.shape[-1]
    if channels is None:
        if n_channels == 1:
            return PreparedImage(data, None, _unit_rule(data[..., 0], per_channel=False))
        if n_channels in (3, 4):
            return PreparedImage(data, "rgb", _unit_rule(data[..., :3], per_channel=False))
        raise InvalidInputError(
            f"The image has {n_channels} channels: choose 1 or 3 of them (channels=[i] or "
            "[r, g, b]) to show CLIP as gray or RGB."
        )
    picks = [int(c) for c in channels]
    if len(picks) not in (1, 3):
        raise InvalidInputError(f"Pick 1 or 3 channels, got {len(picks)}.")
    for c in picks:
        if not -n_channels <= c < n_channels:
            raise InvalidInputError(f"Channel {c} does not exist (the image has {n_channels}).")
    # The percentiles need only a subsample: pick the channels from it, not from the whole image.
    rule = _unit_rule(_PickedView(data, picks, subsample_step(data.shape)), per_channel=True)
    return PreparedImage(data, picks, rule)


class _PickedView:
    """``data[..., picks]`` for :func:`_unit_rule` without copying the whole image: it only
    reads its dtype, its shape, blocks of rows (min/max) and a ``[::step, ::step]`` subsample."""

    def __init__(self, data: np.ndarray, picks: list[int], step: int) -> None:
        self.data, self.picks, self.step = data, picks, step
        self.dtype = data.dtype
        self.shape = (*data.shape[:2], len(picks))
        self.ndim = 3

    def __getitem__(self, key):
        return self.data[key][..., self.picks]


def prepare_image(
    image: np.ndarray,
    *,
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Return a float32 ``H x W x 3`` array in 0..1 (see module doc for the rules)."""
    return plan_image(image, channel_axis=channel_axis, channels=channels).whole()
