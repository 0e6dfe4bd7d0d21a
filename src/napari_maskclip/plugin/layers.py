"""Results -> napari layers, and re-runs that never lose what the user painted.

:func:`result_layer_data` turns any result with ``labels``, ``probabilities``, ``class_names`` and
``colors`` (an engine :class:`~napari_maskclip.engine.SegmentationResult` or a stack result) into
napari layer-data tuples: one Labels layer with the class names as ``features`` (shown in the
status bar on hover) and a stable colour per class name, and **one** confidence Image per run.

Why one confidence layer, not one per class: twelve classes made twelve layers whose long names
(``<image> [maskclip] <class>``) were cut to the same prefix in the layer list, and a person looks
at one class's confidence at a time anyway. The run's layer ``<labels layer> confidence`` holds
every class's map (``(n_classes, *shape)`` in its :class:`~.records.ConfidenceRecord`, for export
and instant switching) and shows one, in that class's colour: the class of the label picked in the
Labels layer (picking a label to paint shows how sure the model was about it), or the one chosen
in the dock (:func:`show_confidence`). Switching is a view swap, no copy and no re-run. The layer
belongs to its Labels layer: deleting the Labels layer deletes it (:func:`link_run_layers`).

:func:`apply_result` puts a run into the viewer. The plugin's layers are found by their metadata
(:mod:`.records`: a :class:`~.records.RunRecord` on the Labels layer, a
:class:`~.records.ConfidenceRecord` on each map), not by name. The Labels layer remembers a
fingerprint (hash) of every slice the plugin wrote. On a re-run:

* **same class names, and none of the slices being written was edited**: the run's slices are
  written into the existing layers in place (other slices keep their content, edited or not);
  this is how "current slice" runs fill a stack slice by slice;
* **other class names, nothing edited anywhere**: the layers are replaced in place;
* **otherwise** (an edit would be overwritten, or its label values would change meaning): the
  edited Labels layer is left exactly as it is and no longer managed by the plugin, and the
  result goes into a **new** Labels layer. Nothing the user painted is ever overwritten.

Besides the fingerprints, the layer keeps a compressed copy of every slice the plugin wrote
(``predicted``, see :mod:`.edits`), so an export can tell *which pixels* were edited, and a
``run_id`` shared with its confidence layers, so an export pairs the labels with the maps of
the same run (after a re-run into a new layer, the old layer's maps are gone, not mixed up).

Uses public napari API only.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..stacks import leading_indices, slice_key
from .edits import record_planes
from .records import LABELS, META_KEY, ConfidenceRecord, RunRecord, plugin_metadata

__all__ = [
    "EDIT_POLICY",
    "confidence_layer_of",
    "link_run_layers",
    "recolor_class",
    "show_confidence",
    "META_KEY",
    "ApplyReport",
    "Geometry",
    "apply_result",
    "confidence_layer_name",
    "labels_layer_name",
    "managed_layers",
    "result_layer_data",
    "slice_fingerprint",
]

#: The re-run rule in one sentence, for tooltips and docs.
EDIT_POLICY = (
    "Re-running never overwrites labels you edited: with the same class names, only the slices "
    "you have not edited are rewritten; otherwise your edited Labels layer is kept as it is and "
    "the result goes into a new Labels layer."
)
_UNLISTED_LABEL_COLOR = (0.6, 0.6, 0.6, 1.0)  # values the user paints beyond the class list
_CONFIDENCE_OPACITY = 0.6


@dataclass(frozen=True)
class Geometry:
    """Where outputs sit in the world: copied from the source layer's (output) axes."""

    scale: tuple[float, ...]
    translate: tuple[float, ...]
    axis_labels: Optional[tuple[str, ...]] = None
    units: Optional[tuple[Any, ...]] = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scale": list(self.scale), "translate": list(self.translate)}
        if self.axis_labels is not None:
            out["axis_labels"] = list(self.axis_labels)
        if self.units is not None:
            out["units"] = list(self.units)
        return out


def labels_layer_name(source_name: str) -> str:
    return f"{source_name} [maskclip]"


def confidence_layer_name(labels_name: str) -> str:
    """The run's confidence layer is named after its Labels layer (``(2)`` runs included)."""
    return f"{labels_name} confidence"


def _labels_colormap(class_names: Sequence[str], colors: Sequence[Sequence[float]]) -> dict:
    colormap: dict[Any, Any] = {None: _UNLISTED_LABEL_COLOR, 0: (0.0, 0.0, 0.0, 0.0)}
    for k, color in enumerate(colors, start=1):
        colormap[k] = tuple(float(c) for c in color)
    return colormap


def _labels_features(class_names: Sequence[str]) -> dict[str, list]:
    return {"index": list(range(len(class_names) + 1)), "name": ["background", *class_names]}


#: Characters of a confidence colormap's display name (as many as napari's longest built-in
#: one, "twilight shifted"): see :func:`colormap_display_name`.
COLORMAP_NAME_CHARS = 16


def colormap_display_name(class_name: str) -> str:
    """The name napari shows for a class's confidence colormap: the class name, shortened to
    :data:`COLORMAP_NAME_CHARS` characters (an ellipsis at the end).

    napari lists every registered colormap in the colormap box of every image layer's controls,
    and that box is as wide as its longest name: one long name ("red triangle confidence")
    widened the layer-controls panel, narrowed the canvas and pushed the image's right part out
    of view. The confidence layer's own name says "confidence", so the colormap's is the class
    alone."""
    name = " ".join(class_name.split())
    if len(name) <= COLORMAP_NAME_CHARS:
        return name
    return name[:COLORMAP_NAME_CHARS - 1].rstrip() + "\u2026"


def _confidence_colormap(class_name: str, color: Sequence[float]):
    from napari.utils.colormaps import Colormap

    r, g, b = (float(c) for c in color[:3])
    # napari registers colormaps by name: the colour is part of it, so a new colour is used.
    hex_rgb = "".join(f"{round(c * 255):02x}" for c in (r, g, b))
    return Colormap(
        colors=[[r, g, b, 0.0], [r, g, b, 1.0]], name=f"maskclip {class_name} #{hex_rgb}",
        display_name=colormap_display_name(class_name),
    )


def _top_class(result: Any) -> int:
    """Index of the class covering most pixels (shown first)."""
    counts = result.class_pixel_counts() if hasattr(result, "class_pixel_counts") else np.bincount(
        np.asarray(result.labels).ravel(), minlength=len(result.class_names) + 1)[1:]
    return int(np.argmax(counts)) if len(counts) else 0


def _stacked(probabilities: Any) -> Optional[np.ndarray]:
    """The maps as one ``(n_classes, ...)`` float32 array (no copy when they already are; a
    lazy array such as dask's stays lazy)."""
    if hasattr(probabilities, "ndim") and hasattr(probabilities, "dtype"):
        return probabilities if probabilities.dtype == np.float32 else probabilities.astype(
            np.float32)
    maps = list(probabilities)
    return np.stack(maps).astype(np.float32, copy=False) if maps else None


def result_layer_data(
    result: Any,
    *,
    source_name: str,
    geometry: Optional[Geometry] = None,
    record: Optional[RunRecord] = None,
) -> list[tuple[Any, dict[str, Any], str]]:
    """Layer-data tuples (the run's confidence image first when it has maps, labels last).

    ``result`` needs ``labels``, ``probabilities`` (one map per class: a ``(n, ...)`` array or a
    list), ``class_names`` and ``colors``; ``record`` (its class names set from ``result``) goes
    into the Labels layer's metadata, its source and run into the confidence layer's, with every
    class's map. The confidence layer shows the class covering most pixels.
    """
    geo = geometry.kwargs() if geometry is not None else {}
    names = list(result.class_names)
    colors = list(result.colors)
    record = (record or RunRecord()).replace(class_names=names, role=LABELS)
    layers: list[tuple[Any, dict[str, Any], str]] = []
    maps = _stacked(result.probabilities)
    if maps is not None and len(maps) == len(names):
        k = _top_class(result)
        layers.append((
            maps[k],
            {
                "name": confidence_layer_name(labels_layer_name(source_name)),
                "colormap": _confidence_colormap(names[k], colors[k]),
                "blending": "translucent",
                "opacity": _CONFIDENCE_OPACITY,
                "contrast_limits": (0.0, 1.0),
                "rgb": False,
                "metadata": ConfidenceRecord.of_run(names[k], record, maps).to_metadata(),
                **geo,
            },
            "image",
        ))
    layers.append((
        result.labels,
        {
            "name": labels_layer_name(source_name),
            "colormap": _labels_colormap(names, colors),
            "features": _labels_features(names),
            "opacity": 0.6,
            "metadata": record.to_metadata(),
            **geo,
        },
        "labels",
    ))
    return layers


# ---- fingerprints ------------------------------------------------------------------------------
def slice_fingerprint(plane: np.ndarray) -> str:
    """A content hash of one slice of labels (shape and dtype included)."""
    data = np.ascontiguousarray(plane)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.shape}|{data.dtype}".encode())
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


def edited_slices(layer: Any) -> set[str]:
    """Keys of the slices of a managed Labels layer that differ from what the plugin wrote.

    A slice the plugin never wrote counts as edited as soon as it holds any non-zero label.
    """
    record = RunRecord.from_metadata(layer.metadata)
    prints = record.fingerprints if record is not None else {}
    data = layer.data
    if not isinstance(data, np.ndarray):
        return {"*"}
    edited = set()
    for lead in leading_indices(data.shape):
        key = slice_key(lead)
        plane = data[lead] if lead else data
        if key in prints:
            if slice_fingerprint(plane) != prints[key]:
                edited.add(key)
        elif plane.any():
            edited.add(key)
    return edited


# ---- finding the plugin's layers -----------------------------------------------------------------
def managed_layers(viewer: Any, source_id: str) -> tuple[Any, Any]:
    """The managed Labels layer of a source (or None) and its run's confidence layer (or None).

    A confidence layer belongs to the run of its Labels layer (same ``run_id``): that of a Labels
    layer a person edited and a re-run left alone stays with it."""
    labels = None
    for layer in viewer.layers:
        meta = plugin_metadata(getattr(layer, "metadata", None))
        if meta.get("source_id") == source_id and meta.get("role") == LABELS:
            record = RunRecord.from_metadata(layer.metadata)
            if record is not None and record.managed:
                labels = layer
                break
    return labels, (confidence_layer_of(viewer.layers, labels) if labels is not None else None)


def confidence_layer_of(layers: Any, labels_layer: Any) -> Any:
    """The confidence layer of ``labels_layer``'s run (same ``run_id``), or None."""
    record = RunRecord.from_metadata(getattr(labels_layer, "metadata", None))
    if record is None or not record.run_id:
        return None
    for layer in layers:
        conf = ConfidenceRecord.from_metadata(getattr(layer, "metadata", None))
        if conf is not None and conf.run_id == record.run_id and conf.maps is not None:
            return layer
    return None


def show_confidence(layers: Any, labels_layer: Any, class_name: str) -> Any:
    """Show ``class_name``'s map in the confidence layer of ``labels_layer``'s run (a view swap:
    every map is already there) and pick its label for painting, so both say the same class.
    Returns the layer, or None when the run has no such map."""
    layer = confidence_layer_of(layers, labels_layer)
    record = ConfidenceRecord.from_metadata(getattr(layer, "metadata", None))
    if record is None or class_name not in record.class_names:
        return None
    k = record.class_names.index(class_name)
    if labels_layer.selected_label != k + 1:
        labels_layer.selected_label = k + 1  # shows the map through _follow_selected_label
    if record.class_name != class_name or layer.data is not record.maps[k]:
        layer.data = record.maps[k]
        layer.metadata = {**layer.metadata, **record.replace(class_name=class_name).to_metadata()}
    layer.colormap = _confidence_colormap(class_name, _label_color(labels_layer, k + 1))
    layer.contrast_limits = (0.0, 1.0)
    return layer


def _label_color(labels_layer: Any, value: int) -> tuple[float, ...]:
    color = labels_layer.colormap.color_dict.get(value)
    return tuple(float(c) for c in color) if color is not None else _UNLISTED_LABEL_COLOR


def recolor_class(layers: Any, class_name: str, color: Sequence[float]) -> list[Any]:
    """Give ``class_name`` the colour ``color`` in every Labels layer a run made (and in the
    confidence layer showing it). Returns the Labels layers changed."""
    rgba = tuple(float(c) for c in color[:3]) + (1.0,)
    changed = []
    for layer in list(layers):
        record = RunRecord.from_metadata(getattr(layer, "metadata", None))
        if record is None or record.role != LABELS or class_name not in (record.class_names or []):
            continue
        value = record.class_names.index(class_name) + 1
        colors = {k: tuple(float(c) for c in v) for k, v in layer.colormap.color_dict.items()}
        colors[value] = rgba
        layer.colormap = colors
        changed.append(layer)
        conf = ConfidenceRecord.from_metadata(
            getattr(confidence_layer_of(layers, layer), "metadata", None))
        if conf is not None and conf.class_name == class_name:
            show_confidence(layers, layer, class_name)
    return changed


# ---- a run's layers live and die together --------------------------------------------------------
def link_run_layers(viewer: Any) -> None:
    """Deleting a run's Labels layer deletes its confidence layer too (once per viewer: napari
    ignores a second connection of the same callback)."""
    viewer.layers.events.removed.connect(_on_layer_removed)


def _on_layer_removed(event: Any) -> None:
    layers = event.source
    record = RunRecord.from_metadata(getattr(event.value, "metadata", None))
    if record is None or record.role != LABELS or not record.run_id:
        return
    for layer in layers:  # a duplicate of the Labels layer still uses the maps
        other = RunRecord.from_metadata(getattr(layer, "metadata", None))
        if other is not None and other.role == LABELS and other.run_id == record.run_id:
            return
    for layer in list(layers):
        conf = ConfidenceRecord.from_metadata(getattr(layer, "metadata", None))
        if conf is not None and conf.run_id == record.run_id:
            layers.remove(layer)


def _follow_selected_label(layers_ref: Any, labels_ref: Any, event: Any = None) -> None:
    """The confidence layer shows the class of the label picked for painting."""
    layers, labels = layers_ref(), labels_ref()
    if layers is None or labels is None:
        return
    record = RunRecord.from_metadata(labels.metadata)
    names = (record.class_names or []) if record is not None else []
    value = int(labels.selected_label)
    if 1 <= value <= len(names):
        show_confidence(layers, labels, names[value - 1])


def _link_labels(viewer: Any, labels_layer: Any) -> None:
    link_run_layers(viewer)
    labels_layer.events.selected_label.connect(functools.partial(
        _follow_selected_label, weakref.ref(viewer.layers), weakref.ref(labels_layer)))


# ---- applying a run ------------------------------------------------------------------------------
@dataclass
class ApplyReport:
    """What :func:`apply_result` did, for the status line and tests."""

    mode: str  # "new", "updated", "replaced", "kept-edited"
    labels_layer: Any
    confidence_layer: Any = None
    kept_layer_name: Optional[str] = None
    edited: list[str] = field(default_factory=list)

    def describe(self) -> str:
        name = self.labels_layer.name
        if self.mode == "new":
            return f"added '{name}'"
        if self.mode == "updated":
            return f"updated '{name}' in place"
        if self.mode == "replaced":
            return f"replaced '{name}' in place"
        return (
            f"your edited labels stay untouched in '{self.kept_layer_name}'; "
            f"the new result is in '{name}'"
        )


def _unique_name(viewer: Any, base: str) -> str:
    names = {layer.name for layer in viewer.layers}
    if base not in names:
        return base
    n = 2
    while f"{base} ({n})" in names:
        n += 1
    return f"{base} ({n})"


def _layer_from_tuple(data: Any, kwargs: dict[str, Any], kind: str) -> Any:
    from napari.layers import Image, Labels

    return (Labels if kind == "labels" else Image)(data, **kwargs)


def apply_result(
    viewer: Any,
    result: Any,
    *,
    source_id: str,
    source_name: str,
    geometry: Geometry,
    run: Optional[RunRecord] = None,
) -> ApplyReport:
    """Show a stack result in ``viewer`` following the re-run rules in the module doc.

    ``result`` is a :class:`~napari_maskclip.plugin.stack_run.StackResult` (full-shape ``labels``,
    one full-shape map per class, ``output_indices`` of the slices it computed); ``run`` says
    what the run was (classes as typed, settings, model, source layout: :data:`.records.RUN_FIELDS`).
    """
    names = list(result.class_names)
    written = {slice_key(idx): idx for idx in result.output_indices}
    labels_layer, confidence = managed_layers(viewer, source_id)

    mode = "new"
    edited: set[str] = set()
    old = RunRecord.from_metadata(labels_layer.metadata) if labels_layer is not None else None
    if labels_layer is not None:
        same_layout = (
            isinstance(labels_layer.data, np.ndarray)
            and labels_layer.data.flags.writeable
            and labels_layer.data.shape == result.labels.shape
            and labels_layer.data.dtype == result.labels.dtype
        )
        edited = edited_slices(labels_layer) if same_layout else {"*"}
        same_classes = old is not None and old.class_names == names
        if same_layout and same_classes and not (edited & set(written)):
            mode = "updated"
        elif same_layout and not edited:
            mode = "replaced"
        else:
            mode = "kept-edited"

    run_id = uuid.uuid4().hex
    if mode == "updated":  # the same run continues: its confidence layer stays paired
        run_id = old.run_id or run_id
    record = RunRecord(class_names=names, source_id=source_id, source_name=source_name,
                       run_id=run_id)
    if run is not None:
        record = record.with_run(run)
    tuples = result_layer_data(result, source_name=source_name, geometry=geometry, record=record)
    *conf_tuples, labels_tuple = tuples
    report = ApplyReport(mode=mode, labels_layer=None, edited=sorted(edited))

    if mode == "updated":
        prints = dict(old.fingerprints)
        predicted = dict(old.predicted)  # a new dict: copies of the layer share the old one
        for key, idx in written.items():
            labels_layer.data[idx] = result.labels[idx]
            prints[key] = slice_fingerprint(labels_layer.data[idx])
        predicted.update(record_planes(result.labels, written.values()))
        # What the layer recorded stays unless this run says otherwise.
        kept = old if run is None else old.with_run(run)
        updated = kept.replace(source_id=source_id, source_name=source_name, run_id=run_id,
                               class_names=names, fingerprints=prints, predicted=predicted,
                               managed=True, role=LABELS)
        labels_layer.metadata = {**labels_layer.metadata, **updated.to_metadata()}
        labels_layer.refresh()
        report.labels_layer = labels_layer
    else:
        data, kwargs, _ = labels_tuple
        record = record.replace(
            role=LABELS, managed=True,
            fingerprints={key: slice_fingerprint(result.labels[idx]) for key, idx in written.items()},
            predicted=record_planes(result.labels, written.values()),
        )
        kwargs["metadata"] = record.to_metadata()
        if mode == "replaced":
            labels_layer.data = data
            labels_layer.colormap = kwargs["colormap"]
            labels_layer.features = kwargs["features"]
            labels_layer.metadata = {**labels_layer.metadata, **kwargs["metadata"]}
            report.labels_layer = labels_layer
        else:
            if mode == "kept-edited":
                labels_layer.metadata = {**labels_layer.metadata,
                                         **old.replace(managed=False).to_metadata()}
                report.kept_layer_name = labels_layer.name
                kwargs["name"] = _unique_name(viewer, kwargs["name"])
                # The edited layer keeps its own confidence layer (an export of it pairs the
                # maps by run); the new result gets a new one.
                confidence = None
            report.labels_layer = viewer.add_layer(_layer_from_tuple(data, kwargs, "labels"))
            _link_labels(viewer, report.labels_layer)

    report.confidence_layer = _apply_confidence(
        viewer, conf_tuples[0] if conf_tuples else None, confidence, written,
        report.labels_layer, partial=(mode == "updated"),
    )
    # The dock, the label to paint with and the map shown agree: a new layer starts on the
    # class covering most pixels; a re-run into the same layer keeps the label the user picked.
    shown = ConfidenceRecord.from_metadata(getattr(report.confidence_layer, "metadata", None))
    if shown is not None:
        if mode in ("new", "kept-edited"):
            show_confidence(viewer.layers, report.labels_layer, shown.class_name)
        else:
            _follow_selected_label(lambda: viewer.layers, lambda: report.labels_layer)
    return report


def _apply_confidence(
    viewer: Any,
    conf_tuple: Optional[tuple[Any, dict[str, Any], str]],
    existing: Any,
    written: dict[str, Any],
    labels_layer: Any,
    *,
    partial: bool,
) -> Any:
    """Update, add or remove the run's confidence layer (kept just below its labels).

    A partial run (same classes, some slices) writes its slices into the run's maps in place;
    a full one reuses the existing layer (adding and removing napari layers costs far more than
    a re-query itself)."""
    if conf_tuple is None:
        if existing is not None and not partial:
            viewer.layers.remove(existing)
        return None if not partial else existing
    data, kwargs, _ = conf_tuple
    new = ConfidenceRecord.from_metadata(kwargs["metadata"])
    old = ConfidenceRecord.from_metadata(getattr(existing, "metadata", None))
    name = confidence_layer_name(labels_layer.name)
    if partial and old is not None and old.maps.shape == new.maps.shape \
            and old.class_names == new.class_names and old.maps.flags.writeable:
        for idx in written.values():
            old.maps[(slice(None), *idx)] = new.maps[(slice(None), *idx)]
        existing.refresh()
        return existing
    if old is not None and isinstance(existing.data, np.ndarray) \
            and existing.data.shape == data.shape:
        existing.metadata = {**existing.metadata, **kwargs["metadata"]}
        existing.data = data
        existing.name = name
        existing.colormap = kwargs["colormap"]
        existing.contrast_limits = (0.0, 1.0)
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    kwargs["name"] = name
    layer = _layer_from_tuple(data, kwargs, "image")
    viewer.layers.insert(viewer.layers.index(labels_layer), layer)
    return layer
