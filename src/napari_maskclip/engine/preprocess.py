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
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = ["prepare_image", "check_image_array", "PERCENTILES"]

PERCENTILES = (1.0, 99.8)


def _percentile_scale(data: np.ndarray, axis: Optional[tuple[int, ...]]) -> np.ndarray:
    data = data.astype(np.float32, copy=False)
    # Subsample big images for the percentiles: exact enough, and 4096^2 stays fast.
    step = max(1, int(np.sqrt(data.shape[0] * data.shape[1] / 1_000_000)))
    sample = data[::step, ::step]
    lo = np.percentile(sample, PERCENTILES[0], axis=axis, keepdims=True)
    hi = np.percentile(sample, PERCENTILES[1], axis=axis, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    out = (data - lo.astype(np.float32)) / span
    return np.clip(out, 0.0, 1.0, out=out)


def _to_unit(data: np.ndarray, *, per_channel: bool) -> np.ndarray:
    if data.dtype == np.bool_:
        return data.astype(np.float32)
    if data.dtype == np.uint8:
        return data.astype(np.float32) / 255.0
    if np.issubdtype(data.dtype, np.floating):
        lo, hi = float(np.min(data)), float(np.max(data))
        if lo >= 0.0 and hi <= 1.0:
            return data.astype(np.float32, copy=False)
    elif not np.issubdtype(data.dtype, np.integer):
        raise InvalidInputError(f"Unsupported image dtype {data.dtype}: use integer or float data.")
    axis = (0, 1) if per_channel else None
    return _percentile_scale(data, axis)


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


def prepare_image(
    image: np.ndarray,
    *,
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Return a float32 ``H x W x 3`` array in 0..1 (see module doc for the rules).

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
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise InvalidInputError(
            "The image contains NaN or infinite values; replace them (e.g. np.nan_to_num) first."
        )
    if np.iscomplexobj(data):
        raise InvalidInputError("Complex-valued images are not supported; pass magnitudes.")

    if data.ndim == 2:
        unit = _to_unit(data, per_channel=False)
        return np.repeat(unit[..., None], 3, axis=-1)

    if channel_axis is not None:
        if not -3 <= channel_axis < 3:
            raise InvalidInputError(f"channel_axis {channel_axis} is out of range for a 3D image.")
        data = np.moveaxis(data, channel_axis, -1)
    n_channels = data.shape[-1]
    if channels is None:
        if n_channels == 1:
            return np.repeat(_to_unit(data[..., 0], per_channel=False)[..., None], 3, axis=-1)
        if n_channels in (3, 4):
            return _to_unit(data[..., :3], per_channel=False)
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
    chosen = data[..., picks]
    unit = _to_unit(chosen, per_channel=True)
    if unit.shape[-1] == 1:
        unit = np.repeat(unit, 3, axis=-1)
    return np.ascontiguousarray(unit, dtype=np.float32)
