"""A widget run over a napari layer's data: 2D planes for the engine, full-shape outputs back.

:func:`segment_stack_iter` runs the engine slice by slice (:func:`predict_stack_iter`: a MaskCLIP+
student) over the slices a :class:`StackRequest` asks for, reading **one slice at a time** through
the core's :class:`~napari_maskclip.stacks.StackLayout` (so a dask or zarr array is never loaded
whole), and assembles full-shape outputs: the source's axes without RGB and channel axes, so the
Labels layer overlays the image with the same scale and translate (a channel axis between other
axes is kept with length 1, see :meth:`~napari_maskclip.stacks.StackLayout.output_scale_translate`).

Memory: outputs are ``np.zeros`` arrays, whose pages the operating system commits only when
written, so a "current slice" run on a long stack costs one slice of memory; "all slices" costs
labels (1-2 bytes per pixel) plus 4 bytes per pixel per class for confidence maps, checked
against :data:`MEMORY_BUDGET` before any work starts. Qt-free; torch is not imported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator, Optional

import numpy as np

from ..classes import class_colors, parse_classes
from ..errors import InvalidInputError
from ..progress import Progress
from ..stacks import Index, StackLayout

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Segmenter, SegmentSettings
    from ..student import StudentSegmenter

__all__ = [
    "MEMORY_BUDGET",
    "check_region_data",
    "StackRequest",
    "StackResult",
    "predict_stack_iter",
    "segment_stack_iter",
]

#: Largest amount of output memory (labels + confidence maps) a run may commit.
MEMORY_BUDGET = 4 << 30
#: Share of a slice's progress bar given to encoding (the rest is the query).
_ENCODE_SHARE = 0.85


@dataclass
class StackRequest:
    """One run of the widget: which data, which slices, which classes, which settings."""

    data: Any
    layout: StackLayout
    slices: list[Index]
    classes: str
    background: str = ""
    channels: Optional[tuple[int, ...]] = None
    settings: "Optional[SegmentSettings]" = None
    keep_confidence: bool = True
    memory_budget: int = MEMORY_BUDGET
    #: Region voting's label image (a napari Labels layer's data): one 2D plane of the image's
    #: size for every slice, or shaped like the outputs (one plane per slice); read one slice at
    #: a time (see :func:`check_region_data`). None: the settings' own regions, if any.
    regions: Any = None


def check_region_data(data: Any, layout: StackLayout, name: str = "the Labels layer") -> None:
    """Refuse (with what to do) region data that fits neither one slice nor the whole stack."""
    shape = tuple(int(s) for s in getattr(data, "shape", ()))
    plane = tuple(layout.plane_shape)
    if shape == plane or shape == tuple(layout.output_shape):
        return
    h, w = plane
    stack = "" if shape[-2:] != plane else (
        f" (a stack of {len(shape) - 2}D slices must match the image's "
        f"{'x'.join(str(s) for s in layout.output_shape)})")
    raise InvalidInputError(
        f"{name} has shape {'x'.join(str(s) for s in shape) or '()'} but the image's slices are "
        f"{h}x{w} (rows x columns){stack}: choose a Labels layer of the image's size as regions, "
        "or 'no regions'."
    )


def _region_plane(request: StackRequest, index: Index) -> Optional[np.ndarray]:
    """The region ids of slice ``index`` (only that slice is read from a lazy array)."""
    data = request.regions
    if data is None:
        return None
    if tuple(data.shape) == tuple(request.layout.plane_shape):
        return np.asarray(data)
    return np.asarray(data[request.layout.output_index(index)])


@dataclass
class StackResult:
    """Full-shape outputs of a run; only ``slices`` were computed (the rest is 0).

    Shaped like :class:`~napari_maskclip.engine.SegmentationResult` where it matters (``labels``,
    ``class_names``, ``colors``), so the layer code serves both.
    """

    labels: np.ndarray
    #: ``(n_classes, *labels.shape)`` float32, or ``[]`` when confidence maps are off.
    probabilities: Any
    class_names: list[str]
    class_texts: list[str]
    background: str
    slices: list[Index]
    output_indices: list[tuple[Any, ...]]
    removed_classes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    encoder_calls: int = 0
    encoded_slices: int = 0
    seconds: float = 0.0

    @property
    def colors(self) -> list[tuple[float, float, float, float]]:
        return class_colors(self.class_names)

    def class_pixel_counts(self) -> list[int]:
        """Pixels of each class in the computed slices (for choosing which maps to show)."""
        counts = np.zeros(len(self.class_names) + 1, dtype=np.int64)
        for key in self.output_indices:
            counts += np.bincount(self.labels[key].ravel(), minlength=counts.size)[: counts.size]
        return [int(c) for c in counts[1:]]


def _estimate_bytes(layout: StackLayout, n_slices: int, n_classes: int, keep_confidence: bool) -> int:
    plane = layout.plane_shape[0] * layout.plane_shape[1]
    label_bytes = 1 if n_classes <= 255 else 2
    per_pixel = label_bytes + (4 * n_classes if keep_confidence else 0)
    return n_slices * plane * per_pixel


def _scaled(progress: Progress, i: int, n: int, start: float, share: float) -> Progress:
    overall = (i + start + share * progress.fraction) / max(n, 1)
    prefix = f"slice {i + 1}/{n}: " if n > 1 else ""
    info = dict(progress.info)
    info.update(fraction=overall, slice=i, slices=n, inner_stage=progress.stage)
    return Progress("segment", i, n, prefix + progress.message, info)


def segment_stack_iter(
    segmenter: "Segmenter", request: StackRequest
) -> Generator[Progress, None, StackResult]:
    """Segment the requested slices one by one; yields progress (``info['fraction']`` overall).

    Closing the generator stops at the next window; nothing partial is returned.
    """
    started = time.perf_counter()
    layout = request.layout
    fg = parse_classes(request.classes)  # fail fast on a bad class list
    bg = parse_classes(request.background, allow_empty=True) if request.background.strip() else []
    parse_classes(fg + bg)
    labels, probabilities = _allocate(request, len(fg))
    n = len(request.slices)
    settings = request.settings
    calls_before = segmenter.image_encoder_calls
    encoded = 0
    removed: list[str] = []
    record: dict[str, Any] = {}
    out_indices: list[tuple[Any, ...]] = []
    for i, index in enumerate(request.slices):
        plane = layout.read_plane(request.data, index)
        calls = segmenter.image_encoder_calls
        encoder = segmenter.encode_iter(
            plane,
            channel_axis=layout.plane_channel_axis,
            channels=request.channels,
            settings=settings,
        )
        features = yield from _forward(encoder, i, n, 0.0, _ENCODE_SHARE)
        encoded += segmenter.image_encoder_calls > calls
        query = segmenter.segment_iter(
            features, request.classes, background=request.background or None, settings=settings,
            regions=_region_plane(request, index),
        )
        result = yield from _forward(query, i, n, _ENCODE_SHARE, 1.0 - _ENCODE_SHARE)
        key = layout.output_index(index)
        out_indices.append(key)
        labels[key] = result.labels
        for k, prob in enumerate(probabilities):
            prob[key] = result.probabilities[k]
        removed.extend(name for name in result.removed_classes if name not in removed)
        record = result.settings
    return StackResult(
        labels=labels,
        probabilities=probabilities,
        class_names=[spec.name for spec in fg],
        class_texts=[spec.text for spec in fg],
        background=", ".join(spec.text for spec in bg),
        slices=list(request.slices),
        output_indices=out_indices,
        removed_classes=removed,
        settings=record,
        encoder_calls=segmenter.image_encoder_calls - calls_before,
        encoded_slices=encoded,
        seconds=time.perf_counter() - started,
    )


def _allocate(request: StackRequest, n_classes: int) -> tuple[np.ndarray, Any]:
    """Full-shape outputs (pages committed only when written), after the memory check."""
    layout = request.layout
    if not request.slices:
        raise InvalidInputError("No slice to segment.")
    n = len(request.slices)
    needed = _estimate_bytes(layout, n, n_classes, request.keep_confidence)
    if needed > request.memory_budget:
        raise InvalidInputError(
            f"Segmenting {n} slices of {layout.plane_shape[1]}x{layout.plane_shape[0]} px into "
            f"{n_classes} classes needs about {needed / 2**30:.1f} GiB for the outputs (limit "
            f"{request.memory_budget / 2**30:.1f} GiB). Segment the current slice, use fewer "
            "classes, or turn off the confidence maps."
        )
    label_dtype = np.uint8 if n_classes <= 255 else np.uint16
    labels = np.zeros(layout.output_shape, dtype=label_dtype)
    # One (n_classes, ...) block: the confidence layer keeps it as it is (no stacking copy).
    probabilities = (
        np.zeros((n_classes, *layout.output_shape), dtype=np.float32)
        if request.keep_confidence else []
    )
    return labels, probabilities


def predict_stack_iter(
    student: "StudentSegmenter", request: StackRequest
) -> Generator[Progress, None, StackResult]:
    """:func:`segment_stack_iter` for a trained MaskCLIP+ student (same outputs, same layers).

    ``request.classes`` picks a subset of the student's classes (empty: all of them); the
    background and the MaskCLIP settings were fixed by training and are not used.
    """
    started = time.perf_counter()
    layout = request.layout
    subset = request.classes.strip() or None
    picked = [student.classes[k - 1] for k in student.resolve_classes(subset)]
    labels, probabilities = _allocate(request, len(picked))
    n = len(request.slices)
    record: dict[str, Any] = {}
    out_indices: list[tuple[Any, ...]] = []
    for i, index in enumerate(request.slices):
        plane = layout.read_plane(request.data, index)
        run = student.run_iter(
            plane, subset, channel_axis=layout.plane_channel_axis, channels=request.channels
        )
        result = yield from _forward(run, i, n, 0.0, 1.0)
        key = layout.output_index(index)
        out_indices.append(key)
        labels[key] = result.labels
        for k, prob in enumerate(probabilities):
            prob[key] = result.probabilities[k]
        record = result.settings
    return StackResult(
        labels=labels,
        probabilities=probabilities,
        class_names=[spec.name for spec in picked],
        class_texts=[spec.text for spec in picked],
        background=", ".join(spec.text for spec in student.background),
        slices=list(request.slices),
        output_indices=out_indices,
        settings=record,
        seconds=time.perf_counter() - started,
    )


def _forward(gen, i: int, n: int, start: float, share: float):
    """``yield from`` an engine generator, rescaling its progress into the whole run."""
    try:
        while True:
            try:
                step = next(gen)
            except StopIteration as stop:
                return stop.value
            yield _scaled(step, i, n, start, share)
    finally:
        gen.close()
