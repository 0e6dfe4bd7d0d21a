"""Sliding-window geometry: which crops cover an image, and how often each pixel is covered.

Windows follow the usual segmentation-toolkit layout: a regular grid of ``window``-sized crops
every ``stride`` pixels, with the last row/column shifted back to end exactly at the image edge,
and a single crop along an axis that is shorter than the window. Scores are summed over the crops
and divided by the coverage count; the count is separable (rows x columns), so it costs O(H + W).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError

__all__ = ["Box", "window_boxes", "axis_starts", "coverage"]


@dataclass(frozen=True)
class Box:
    """A crop ``[y0:y1, x0:x1]`` of the (resized) image."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def axis_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the crops along one axis of length ``size``."""
    if window <= 0 or stride <= 0:
        raise InvalidInputError("Window and stride must be positive.")
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


def window_boxes(height: int, width: int, window: int, stride: int) -> list[Box]:
    """All crops covering a ``height x width`` image, row by row."""
    ys = axis_starts(height, window, stride)
    xs = axis_starts(width, window, stride)
    return [
        Box(y, x, min(y + window, height), min(x + window, width)) for y in ys for x in xs
    ]


def coverage(size: int, window: int, stride: int) -> np.ndarray:
    """How many crops cover each position along one axis (float32)."""
    count = np.zeros(size, dtype=np.float32)
    for start in axis_starts(size, window, stride):
        count[start:min(start + window, size)] += 1.0
    return count
