"""``segment``/``predict`` on one z-stack or time series, slice by slice, with bounded memory.

Each slice (all its channels) is read alone (:class:`~napari_maskclip.stack_files.TiffPlanes`),
segmented like a 2D image, and its labels and confidence maps go to
:class:`~napari_maskclip.stack_files.PagedStackWriter` s at once, so memory holds one slice's
maps (a slice too large to hold streams its rows, as a 2D image does). At the end the labels
TIFF (the leading axes x H x W) and the confidence TIFF (C x the leading axes x H x W) are
written atomically, then ``<stem>_classes.json`` last, as for a 2D image; its ``stack`` entry
gives the leading axes' shape and names (the names export gives each slice's sample).

Imports neither torch nor napari.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import InvalidInputError
from .stack_files import PagedStackWriter, StackInput, TiffPlanes
from .stacks import leading_axis_names, slice_key

__all__ = ["run_stack", "STACK_KEY"]

#: The ``<stem>_classes.json`` entry that marks a stack result (shape and names of its axes).
STACK_KEY = "stack"

Update = Callable[[Any], None]


class _SliceRows:
    """The engine's streaming target for one slice: ``(y0, y1, C x rows x W)`` blocks go
    straight to that slice's pages of the confidence writer."""

    def __init__(self, writer: PagedStackWriter, pages: list[int]) -> None:
        self.writer, self.pages = writer, pages

    def __call__(self, y0: int, y1: int, block: np.ndarray) -> None:
        self.writer.rows(self.pages, y0, y1, block)


def _reader(stack: StackInput) -> Any:
    """The stack's pixels, read slice by slice (TIFF), or whole (other multi-frame files)."""
    if stack.path.suffix.lower() in (".tif", ".tiff"):
        planes = TiffPlanes(stack.path)
        if planes.shape == stack.layout.data_shape:
            return planes
    from .image_files import read_image

    return read_image(stack.path)


def run_stack(
    stack: StackInput,
    out: Path,
    make_run: Callable[..., Any],
    update: Update,
    *,
    confidence: bool,
    n_classes: int,
    in_memory: int,
    extra: Optional[dict[str, Any]] = None,
    writers: Optional[list] = None,
):
    """Segment every slice of ``stack`` with ``make_run(plane, probabilities, stacked=True,
    plane_channel_axis=...)`` (the plane's channels first, or none) and
    write the stack's result files into ``out``. Returns their
    :class:`~napari_maskclip.result_files.ResultFiles`.

    ``in_memory``: the byte size of one slice's maps above which they are streamed by rows.
    ``writers``: a list that receives the writers (the memory tests read them).
    """
    from .atomic import atomic_write_text
    from .progress import run_to_completion
    from .result_files import previous_table, remove_stale_results, result_paths, table_text

    layout = stack.layout
    lead = stack.lead_shape
    height, width = layout.plane_shape
    label_dtype = np.uint8 if n_classes <= 255 else np.uint16
    paths = result_paths(out, stack.path.stem, n_classes=n_classes, confidence=confidence,
                         stack=True)
    data = _reader(stack)
    labels_out = PagedStackWriter(out, stack.output_shape, label_dtype)
    conf_out = (PagedStackWriter(out, (n_classes,) + stack.output_shape, np.float32)
                if confidence else None)
    if writers is not None:
        writers.extend(w for w in (labels_out, conf_out) if w is not None)
    table: Optional[dict[str, Any]] = None
    removed: dict[str, list[str]] = {}
    try:
        for index in layout.all_slices():
            plane = layout.read_plane(data, index)
            pages = ([conf_out.page((c,) + index) for c in range(n_classes)]
                     if conf_out is not None else [])
            probabilities: Any = confidence
            if conf_out is not None and n_classes * height * width * 4 > in_memory:
                probabilities = _SliceRows(conf_out, pages)
            result = run_to_completion(
                make_run(plane, probabilities, stacked=True,
                         plane_channel_axis=layout.plane_channel_axis), update)
            del plane
            if len(result.colors) != n_classes:
                raise InvalidInputError(f"{stack.path.name}: {len(result.colors)} classes in "
                                        f"a slice, {n_classes} expected.")
            labels = np.asarray(result.labels)
            if labels.shape != (height, width) or (labels.size and (
                    labels.min() < 0 or labels.max() > n_classes)):
                raise InvalidInputError(f"{stack.path.name}: labels of slice {index} do not fit "
                                        f"{n_classes} classes of {height}x{width} px; not written.")
            labels_out.put([labels_out.page(index)], labels[None].astype(label_dtype))
            if conf_out is not None and result.probabilities is not None:
                conf_out.put(pages, np.asarray(result.probabilities, dtype=np.float32))
            removed[slice_key(index)] = list(result.removed_classes)
            if table is None:
                table = result.classes_table()
            del result, labels
        assert table is not None  # a stack has at least one slice
        everywhere = set.intersection(*(set(v) for v in removed.values()))
        table["removed_by_denoising"] = [c for c in table["removed_by_denoising"] if c in everywhere]
        table[STACK_KEY] = {
            "shape": list(lead), "axes": list(leading_axis_names(len(lead))),
            "source_shape": list(layout.data_shape), "source_axes": stack.axes,
            "channel_axis": layout.channel_axis, "rgb": layout.rgb,
            "removed_by_denoising": removed,
        }
        table["files"] = {"labels": paths.labels_path.name,
                          "confidence": paths.confidence_path.name if confidence else None}
        if extra:
            table.update(extra)
        text = table_text(table, paths.classes_path)
        previous = previous_table(paths.classes_path)
        labels_path = labels_out.commit(paths.labels_path)
        confidence_path = conf_out.commit(paths.confidence_path) if conf_out is not None else None
        atomic_write_text(paths.classes_path, text)
    finally:
        labels_out.discard()
        if conf_out is not None:
            conf_out.discard()
    remove_stale_results(previous, paths.classes_path.parent, stack.path.stem,
                         keep={labels_path.name, confidence_path.name if confidence_path else ""})
    paths.table = table
    return paths
