"""Semantic labels -> instance labels: one instance per connected component of each class.

Shared by the COCO export (one annotation per instance) and napari's instance layer. A pixel
belongs to an instance when its class is not background (0) and not the ignore value; two pixels
are in the same instance when they have the same class and are connected: ``connectivity`` 1
joins face neighbours only (4-neighbourhood in 2D), ``connectivity`` = number of axes joins
diagonal neighbours too (8-neighbourhood in 2D, the default). Holes stay holes: a region of
another class inside an instance is not part of it. Components smaller than ``min_area`` pixels
are dropped (they become 0 in the instance map, and are counted).

No napari, no Qt, no torch: numpy and scikit-image's labelling (one pass over the image for all
classes at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import InvalidInputError

__all__ = ["InstanceMap", "instance_labels", "DEFAULT_CONNECTIVITY"]

#: Diagonal neighbours connect (8-neighbourhood in 2D), as in OpenCV's and scikit-image's defaults.
DEFAULT_CONNECTIVITY = None


@dataclass
class InstanceMap:
    """Instances of a label image: ``instances`` (0 = none, i = instance i) and per instance its
    class, pixel count and bounding slices (index ``i - 1``)."""

    instances: np.ndarray
    classes: np.ndarray
    areas: np.ndarray
    slices: list[tuple[slice, ...]] = field(default_factory=list)
    #: Components dropped because they had fewer than ``min_area`` pixels.
    dropped_small: int = 0

    def __len__(self) -> int:
        return int(self.classes.size)

    def mask(self, i: int) -> tuple[tuple[slice, ...], np.ndarray]:
        """(bounding slices, bool mask inside them) of instance ``i`` (1-based)."""
        box = self.slices[i - 1]
        return box, self.instances[box] == i


def instance_labels(
    labels: np.ndarray,
    *,
    connectivity: Optional[int] = DEFAULT_CONNECTIVITY,
    min_area: int = 1,
    background: int = 0,
    ignore_index: Optional[int] = None,
) -> InstanceMap:
    """Split a semantic label image (2D, or nD) into connected components of each class.

    ``connectivity``: 1..ndim (None = ndim: diagonals connect). ``min_area``: smaller components
    are dropped. ``background`` and ``ignore_index`` pixels are never part of an instance.
    Instances are numbered in raster order of their first pixel; the map is int32.
    """
    from scipy import ndimage
    from skimage.measure import label as cc_label

    labels = np.asarray(labels)
    if labels.ndim < 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(
            f"Instances need an integer label image, got {labels.dtype} of shape {labels.shape}."
        )
    ndim = labels.ndim
    conn = ndim if connectivity is None else int(connectivity)
    if not 1 <= conn <= ndim:
        raise InvalidInputError(
            f"connectivity must be 1 (face neighbours) .. {ndim} (diagonals too) for {ndim}D "
            f"labels, got {connectivity}."
        )
    if int(min_area) < 1:
        raise InvalidInputError(f"min_area must be at least 1 pixel, got {min_area}.")
    # One labelling pass for every class at once: skimage joins neighbours of equal value, and
    # everything that is not an instance becomes its background value 0.
    excluded = labels == background
    if ignore_index is not None:
        excluded |= labels == ignore_index
    if background == 0:
        work = np.where(excluded, 0, labels) if ignore_index is not None else labels
    else:  # 0 is a class here: shift the values so that it is not taken for background
        work = np.where(excluded, 0, labels.astype(np.int64) + 1)
    components, n = cc_label(work, background=0, connectivity=conn, return_num=True)
    if n == 0:
        return InstanceMap(
            np.zeros(labels.shape, np.int32),
            np.zeros(0, labels.dtype),
            np.zeros(0, np.int64),
            [],
            0,
        )
    areas = np.bincount(components.ravel(), minlength=n + 1)[1:]
    keep = areas >= int(min_area)
    dropped = int(n - np.count_nonzero(keep))
    if dropped:
        lut = np.zeros(n + 1, dtype=np.int64)
        lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
        components = lut[components]
        areas = areas[keep]
    instances = components.astype(np.int32, copy=False)
    boxes = ndimage.find_objects(instances)
    slices = [box for box in boxes if box is not None]
    # All pixels of an instance share one class: its maximum is that class.
    index = np.arange(1, len(slices) + 1)
    classes = np.asarray(ndimage.maximum(labels, instances, index)).astype(labels.dtype)
    return InstanceMap(instances, classes, areas.astype(np.int64), slices, dropped)
