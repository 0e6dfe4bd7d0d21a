"""Splitting what the user exports (a 2D image or a stack) into 2D samples.

The labels fix the geometry: ``H x W`` is one sample; ``Z x H x W`` gives one sample per slice
(``<name>_z0003``); ``T x Z x H x W`` one per (t, z) (``<name>_t0001_z0003``). The image matches
the labels, optionally with one channel axis (moved last in the files); probabilities put the
class axis first (``C x ...labels.shape``, or a list of ``C`` arrays shaped like the labels);
``edited`` is shaped like the labels. Slices are pulled one at a time, so lazy (dask, zarr)
layers are read slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..array_checks import require_array, require_kind
from ..errors import InvalidInputError
from ..stacks import DEFAULT_AXES, leading_indices
from .layout import check_sample_name, slice_name

__all__ = ["SliceData", "StackPlan", "plan_stack", "DEFAULT_AXES"]

EditedLike = Union[None, bool, np.ndarray]


@dataclass
class SliceData:
    """One 2D sample cut from the inputs."""

    name: str
    index: tuple[int, ...]
    image: Optional[np.ndarray]
    labels: np.ndarray
    probabilities: Optional[np.ndarray]
    edited: Optional[np.ndarray]


@dataclass
class StackPlan:
    """Validated inputs, and the slices (name, leading index) to export."""

    image: Any
    labels: Any
    probabilities: Any
    edited: Any
    slices: list[tuple[str, tuple[int, ...]]]
    n_probability_channels: Optional[int]

    def get(self, i: int) -> SliceData:
        name, index = self.slices[i]
        image = None if self.image is None else np.asarray(self.image[index] if index else self.image)
        labels = np.asarray(self.labels[index] if index else self.labels)
        probabilities = None
        if self.probabilities is not None:
            if isinstance(self.probabilities, list):
                probabilities = np.stack([np.asarray(p[index] if index else p) for p in self.probabilities])
            else:
                probabilities = np.asarray(self.probabilities[(slice(None),) + index])
        edited: Optional[np.ndarray]
        if isinstance(self.edited, bool):
            edited = np.full(labels.shape, self.edited, dtype=bool)
        elif self.edited is None:
            edited = None
        else:
            edited = np.asarray(self.edited[index] if index else self.edited, dtype=bool)
        return SliceData(name, index, image, labels, probabilities, edited)


def _shape(array: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in array.shape)


def _align_image(image: Any, labels_shape: tuple[int, ...], channel_axis: Optional[int]) -> Any:
    """The image with its channel axis (if any) last, checked against the labels' shape."""
    if channel_axis is not None:
        ndim = len(_shape(image))
        if not -ndim <= channel_axis < ndim:
            raise InvalidInputError(f"channel_axis {channel_axis} is outside the image's {ndim} axes.")
        image = np.moveaxis(image, channel_axis, -1)
    shape = _shape(image)
    if shape == labels_shape or shape[:-1] == labels_shape:
        return image
    if channel_axis is None and len(shape) == len(labels_shape) + 1:
        fits = [a for a in range(len(shape)) if shape[:a] + shape[a + 1:] == labels_shape]
        if len(fits) == 1:
            return np.moveaxis(image, fits[0], -1)
    raise InvalidInputError(
        f"The image (shape {shape}) does not match the labels (shape {labels_shape}): they must "
        "have the same size, the image optionally with one channel axis (give channel_axis)."
    )


def _checked_maps(maps: Any) -> Any:
    maps = require_array(maps, "The probabilities")
    require_kind(maps, "The probabilities", "f", "floats in 0..1 (one map per class)")
    return maps


def _align_probabilities(probabilities: Any, labels_shape: tuple[int, ...]) -> tuple[Any, int]:
    if isinstance(probabilities, (list, tuple)) and all(hasattr(p, "shape") for p in probabilities):
        maps = [_checked_maps(p) for p in probabilities]
        for p in maps:
            if _shape(p) != labels_shape:
                raise InvalidInputError(
                    f"A probability map has shape {_shape(p)}; each must match the labels {labels_shape}."
                )
        return maps, len(maps)
    probabilities = _checked_maps(probabilities)
    shape = _shape(probabilities)
    if shape[1:] != labels_shape:
        raise InvalidInputError(
            f"Probabilities of shape {shape} do not match labels {labels_shape}: expected "
            f"C x {' x '.join(map(str, labels_shape))} (one map per class, class axis first)."
        )
    return probabilities, shape[0]


def plan_stack(
    name: str,
    image: Any,
    labels: Any,
    *,
    probabilities: Any = None,
    edited: EditedLike = None,
    channel_axis: Optional[int] = None,
    slices: Optional[Iterable[Union[int, Sequence[int]]]] = None,
    axis_names: Optional[Sequence[str]] = None,
) -> StackPlan:
    """Check the inputs against each other and list the samples they make."""
    check_sample_name(name)
    if labels is None or not hasattr(labels, "shape"):
        raise InvalidInputError("Labels must be an array (H x W, or a stack of them).")
    labels_shape = _shape(labels)
    if len(labels_shape) < 2:
        raise InvalidInputError(f"Labels must be at least 2D (H x W), got shape {labels_shape}.")
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise InvalidInputError(f"Labels must hold integers (class indices), got {labels.dtype}.")
    if min(labels_shape[-2:]) < 1:
        raise InvalidInputError(f"Labels of shape {labels_shape} are empty.")
    lead = labels_shape[:-2]
    if axis_names is None:
        if len(lead) not in DEFAULT_AXES:
            raise InvalidInputError(
                f"Labels with {len(labels_shape)} axes: name the {len(lead)} non-spatial axes "
                "(axis_names), e.g. ('t', 'c', 'z')."
            )
        axes = DEFAULT_AXES[len(lead)]
    else:
        axes = tuple(axis_names)
        if len(axes) != len(lead) or not all(a.isalnum() for a in axes):
            raise InvalidInputError(f"axis_names {axes!r} must name the {len(lead)} non-spatial axes with letters.")

    if image is not None:
        image = require_array(image, "The image")
        require_kind(image, "The image", "biuf", "numbers (gray, RGB(A) or channels)")
        image = _align_image(image, labels_shape, channel_axis)
    n_channels = None
    if probabilities is not None:
        probabilities, n_channels = _align_probabilities(probabilities, labels_shape)
    if edited is not None and not isinstance(edited, (bool, np.bool_)):
        edited = require_array(edited, "The edited mask")
        require_kind(edited, "The edited mask", "biu", "booleans (True where a person painted)")
        if _shape(edited) != labels_shape:
            raise InvalidInputError(f"The edited mask {_shape(edited)} must match the labels {labels_shape}.")
    elif isinstance(edited, np.bool_):
        edited = bool(edited)

    if slices is None:
        indices = leading_indices(labels_shape)
    else:
        indices = []
        for item in slices:
            idx = (int(item),) if np.isscalar(item) else tuple(int(i) for i in item)
            if len(idx) != len(lead) or any(not 0 <= i < s for i, s in zip(idx, lead)):
                raise InvalidInputError(f"Slice {idx} is not inside the stack's {lead} leading axes.")
            if idx not in indices:
                indices.append(idx)
        if not indices:
            raise InvalidInputError("No slices selected for export.")
    named = [(slice_name(name, idx, axes, lead) if lead else name, idx) for idx in indices]
    return StackPlan(image, labels, probabilities, edited, named, n_channels)
