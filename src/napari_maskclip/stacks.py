"""Stack geometry: which axes of an array are the image plane, which one holds channels, which
ones are looped over slice by slice, and how slices are indexed and named. The one version used
by the napari plugin, the export and the export planner (and open to the CLI).

The engine (or a trained student) segments one 2D image at a time. An image may be a 2D photo,
an RGB(A) image, a stack or time series with any number of leading axes, an array with a channel
axis, or a lazy dask/zarr array. :class:`StackLayout` says which axes are the plane (the last two
non-RGB axes), which one holds channels, and which ones are looped over; it reads **one slice at
a time** (``np.asarray(data[index])``, so a lazy array is never loaded whole).

Outputs (labels, confidence maps) have the source's axes without RGB and channel axes, so they
overlay the image. A *leading* channel axis is dropped (napari aligns layers by their trailing
axes). A channel axis *between* other axes (e.g. Z, C, Y, X) is kept with length 1 (see
:meth:`StackLayout.output_scale_translate`); :class:`SampleAxes` drops it again when labels are
cut into 2D samples.

Slices are named by their leading integer indices: :func:`slice_key` (``""``, ``"3"``,
``"0,3"``) in records, :data:`DEFAULT_AXES` (``z``; ``t``, ``z``) in sample names.

Imports neither torch nor napari nor Qt (numpy only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = [
    "DEFAULT_AXES",
    "Index",
    "SampleAxes",
    "StackLayout",
    "clamp_index",
    "index_of_key",
    "leading_axis_names",
    "leading_indices",
    "slice_key",
]

Index = tuple[int, ...]

#: Names of the leading (non-plane) axes of labels, by their count (for sample names).
DEFAULT_AXES: dict[int, tuple[str, ...]] = {0: (), 1: ("z",), 2: ("t", "z")}


def leading_indices(shape: Sequence[int]) -> list[Index]:
    """Every leading (non-plane) index of an array of ``shape``, in C order (``[()]`` for 2D)."""
    if len(shape) <= 2:
        return [()]
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*shape[:-2])]


def slice_key(index: Sequence[Any]) -> str:
    """A slice's key: its leading integer indices (``""`` for 2D, ``"3"``, ``"0,3"``); slices
    (``slice(None)`` of an output index) are skipped."""
    return ",".join(str(int(i)) for i in index if not isinstance(i, slice))


def index_of_key(key: str) -> Index:
    """The leading index a :func:`slice_key` names (``"0,3"`` -> ``(0, 3)``)."""
    return tuple(int(i) for i in key.split(",")) if key else ()


def leading_axis_names(n: int) -> tuple[str, ...]:
    """Names for ``n`` leading axes in sample names: :data:`DEFAULT_AXES`, else d0, d1, ..."""
    return DEFAULT_AXES.get(n) or tuple(f"d{i}" for i in range(n))


def clamp_index(point: Sequence[Any], shape: Sequence[int], axes: Sequence[int]) -> Index:
    """The integer index along ``axes`` of ``shape`` at a point in data coordinates (napari's
    ``layer.world_to_data``): rounded, clipped into the array, NaN/None read as 0.

    A point with more coordinates than ``shape`` has axes uses its trailing ones, a shorter one is
    padded with leading zeros (napari aligns axes by the end).
    """
    ndim = len(shape)
    values = list(point)
    values = values[-ndim:] if len(values) >= ndim else [0.0] * (ndim - len(values)) + values
    index = []
    for ax in axes:
        value = values[ax]
        value = 0.0 if value is None or not math.isfinite(float(value)) else float(value)
        index.append(int(min(max(round(value), 0), int(shape[ax]) - 1)))
    return tuple(index)


@dataclass(frozen=True)
class StackLayout:
    """How the axes of an image array map to 2D planes (see the module doc)."""

    data_shape: tuple[int, ...]
    rgb: bool = False
    channel_axis: Optional[int] = None

    def __post_init__(self) -> None:
        ndim = self.ndim
        if ndim < 2:
            raise InvalidInputError(
                f"The layer's data has shape {self.data_shape}: segmenting needs at least 2 axes."
            )
        if self.rgb and self.data_shape[-1] not in (3, 4):
            raise InvalidInputError(
                f"An RGB layer needs 3 or 4 colours, got {self.data_shape[-1]}."
            )
        if self.channel_axis is not None:
            if self.rgb:
                raise InvalidInputError(
                    "This layer is RGB: its colours already are the channels. Set the channel "
                    "axis to 'none'."
                )
            if not 0 <= self.channel_axis < ndim - 2:
                raise InvalidInputError(
                    f"Channel axis {self.channel_axis} is not available: it must be one of the "
                    f"leading axes 0..{ndim - 3} (the last two axes are the image plane)."
                    if ndim > 2
                    else "A 2D layer has no channel axis; set the channel axis to 'none'."
                )
        if min(self.plane_shape) < 1:
            raise InvalidInputError(f"The layer is empty (shape {self.data_shape}).")

    # ---- axes ------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of non-RGB axes (napari's ``layer.ndim``)."""
        return len(self.data_shape) - (1 if self.rgb else 0)

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.data_shape[self.ndim - 2], self.data_shape[self.ndim - 1]

    @property
    def loop_axes(self) -> tuple[int, ...]:
        """Leading axes iterated slice by slice (stack, time...)."""
        return tuple(ax for ax in range(self.ndim - 2) if ax != self.channel_axis)

    @property
    def n_channels(self) -> Optional[int]:
        return None if self.channel_axis is None else self.data_shape[self.channel_axis]

    @property
    def output_axes(self) -> tuple[int, ...]:
        """Data axis of each output axis (a leading channel axis is dropped)."""
        return tuple(ax for ax in range(self.ndim) if not (ax == self.channel_axis == 0))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(
            1 if ax == self.channel_axis else self.data_shape[ax] for ax in self.output_axes
        )

    @property
    def n_slices(self) -> int:
        return int(np.prod([self.data_shape[ax] for ax in self.loop_axes], dtype=np.int64))

    # ---- slices ----------------------------------------------------------------------------
    def all_slices(self) -> list[Index]:
        """Every loop index, in C order (time, then z...)."""
        return leading_indices(tuple(self.data_shape[a] for a in self.loop_axes) + (1, 1))

    def slice_at(self, data_point: Sequence[float]) -> Index:
        """The loop index at a point in data coordinates (napari ``layer.world_to_data``)."""
        return clamp_index(data_point, self.data_shape[: self.ndim], self.loop_axes)

    def describe_slice(self, index: Index) -> str:
        if not index:
            return "the image"
        return "slice " + ", ".join(str(i) for i in index)

    def read_plane(self, data: Any, index: Index) -> np.ndarray:
        """Read one 2D plane (plus channels/colours) from ``data``; lazy arrays read only it.
        Channels come first (:attr:`plane_channel_axis`), colours last."""
        key: list[Any] = [slice(None)] * len(self.data_shape)
        for ax, i in zip(self.loop_axes, index):
            key[ax] = i
        return np.asarray(data[tuple(key)])

    @property
    def plane_channel_axis(self) -> Optional[int]:
        """The channel axis of a plane returned by :meth:`read_plane` (it comes first)."""
        return 0 if self.channel_axis is not None else None

    def sample_channels(self, channels: Optional[Sequence[int]] = None) -> tuple[int, ...]:
        """The trailing axis a sample image has (colours or channels; ``()`` for one channel)."""
        if self.rgb:
            return (self.data_shape[-1],)
        if self.channel_axis is None:
            return ()
        n = len(channels) if channels else self.n_channels
        return (n,) if n and n > 1 else ()

    def read_sample(
        self, data: Any, index: Index, channels: Optional[Sequence[int]] = None
    ) -> np.ndarray:
        """One plane as a 2D sample image: the picked ``channels`` (all by default) last, a
        single channel dropped (``H x W``), RGB(A) as it is."""
        plane = self.read_plane(data, index)
        if self.channel_axis is not None:
            if channels:
                plane = plane[list(channels)]
            plane = plane[0] if plane.shape[0] == 1 else np.moveaxis(plane, 0, -1)
        return plane

    def output_index(self, index: Index) -> tuple[Any, ...]:
        """Where the plane of loop ``index`` goes in the output arrays."""
        loop = dict(zip(self.loop_axes, index))
        key: list[Any] = []
        for ax in self.output_axes:
            if ax == self.channel_axis:
                key.append(0)
            elif ax in loop:
                key.append(loop[ax])
            else:
                key.append(slice(None))
        return tuple(key)

    def output_values(self, values: Sequence[Any]) -> list[Any]:
        """Per-output-axis copies of per-data-axis values (axis labels, units)."""
        values = list(values)
        return [values[ax] for ax in self.output_axes]

    def output_scale_translate(
        self, scale: Sequence[float], translate: Sequence[float]
    ) -> tuple[list[float], list[float]]:
        """The output layers' ``scale`` and ``translate``, from the source layer's.

        Equal on every axis, except a kept (length-1) channel axis: its scale is multiplied by the
        channel count and its translate moved to the channels' centre, so the one output plane
        covers every channel position and shows whichever channel the viewer is on.
        """
        out_scale, out_translate = [], []
        for ax in self.output_axes:
            s, t = float(scale[ax]), float(translate[ax])
            if ax == self.channel_axis:
                n = self.data_shape[ax]
                s, t = s * n, t + s * (n - 1) / 2
            out_scale.append(s)
            out_translate.append(t)
        return out_scale, out_translate


@dataclass(frozen=True)
class SampleAxes:
    """Labels shaped like a layout's output, seen as 2D samples: the leading axes to cut along,
    with a kept length-1 channel axis (``Z x 1 x H x W``) dropped (``Z x H x W``)."""

    output_shape: tuple[int, ...]
    squeeze: Optional[int] = None  # position of the kept channel axis among the leading axes

    @classmethod
    def of(cls, output_shape: Sequence[int], layout: Optional[StackLayout] = None) -> "SampleAxes":
        """The sample axes of labels of ``output_shape`` made from an image of ``layout``."""
        shape = tuple(int(s) for s in output_shape)
        squeeze = None
        if (layout is not None and layout.channel_axis not in (None, 0)
                and layout.output_shape == shape):
            squeeze = layout.output_axes.index(layout.channel_axis)
        return cls(shape, squeeze)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.squeeze is None:
            return self.output_shape
        return self.output_shape[: self.squeeze] + self.output_shape[self.squeeze + 1:]

    @property
    def n_lead(self) -> int:
        return len(self.shape) - 2

    def to_output(self, lead: Index) -> Index:
        """The output (labels) index of the sample ``lead``."""
        if self.squeeze is None:
            return lead
        return lead[: self.squeeze] + (0,) + lead[self.squeeze:]

    def from_output(self, lead: Sequence[int]) -> Index:
        """The sample index of an output (labels) leading index."""
        lead = tuple(int(i) for i in lead)
        if self.squeeze is None:
            return lead
        return lead[: self.squeeze] + lead[self.squeeze + 1:]

    def all_leads(self) -> list[Index]:
        return leading_indices(self.shape)

    def lead_at(self, data_point: Sequence[float]) -> Index:
        """The sample at a point in the labels' data coordinates (``world_to_data``)."""
        n = len(self.output_shape)
        return self.from_output(clamp_index(data_point, self.output_shape, range(n - 2)))
