"""Results -> napari layers, and re-runs that never lose what the user painted.

:func:`result_layer_data` turns any result with ``labels``, ``probabilities``, ``class_names`` and
``colors`` (an engine :class:`~napari_maskclip.engine.SegmentationResult` or a stack result) into
napari layer-data tuples: one Labels layer with the class names as ``features`` (shown in the
status bar on hover) and a stable colour per class name, and one translucent float32 confidence
Image per class, only the top few visible.

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

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..stacks import leading_indices, slice_key
from .edits import record_planes
from .records import CONFIDENCE, LABELS, META_KEY, ConfidenceRecord, RunRecord, plugin_metadata

__all__ = [
    "EDIT_POLICY",
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
#: Confidence maps visible after a run (the classes covering most pixels); the others are hidden.
VISIBLE_CONFIDENCE = 3
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


def confidence_layer_name(source_name: str, class_name: str) -> str:
    return f"{source_name} [maskclip] {class_name}"


def _labels_colormap(class_names: Sequence[str], colors: Sequence[Sequence[float]]) -> dict:
    colormap: dict[Any, Any] = {None: _UNLISTED_LABEL_COLOR, 0: (0.0, 0.0, 0.0, 0.0)}
    for k, color in enumerate(colors, start=1):
        colormap[k] = tuple(float(c) for c in color)
    return colormap


def _labels_features(class_names: Sequence[str]) -> dict[str, list]:
    return {"index": list(range(len(class_names) + 1)), "name": ["background", *class_names]}


def _confidence_colormap(class_name: str, color: Sequence[float]):
    from napari.utils.colormaps import Colormap

    r, g, b = (float(c) for c in color[:3])
    return Colormap(
        colors=[[r, g, b, 0.0], [r, g, b, 1.0]], name=f"maskclip {class_name}",
        display_name=f"{class_name} confidence",
    )


def _top_classes(result: Any, k: int) -> set[int]:
    counts = result.class_pixel_counts() if hasattr(result, "class_pixel_counts") else [
        int(np.count_nonzero(np.asarray(result.labels) == i + 1))
        for i in range(len(result.class_names))
    ]
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    return {i for i in order[:k] if counts[i] > 0}


def result_layer_data(
    result: Any,
    *,
    source_name: str,
    geometry: Optional[Geometry] = None,
    record: Optional[RunRecord] = None,
    visible_confidence: int = VISIBLE_CONFIDENCE,
) -> list[tuple[Any, dict[str, Any], str]]:
    """Layer-data tuples (confidence images first, labels last) for any segmentation result.

    ``result`` needs ``labels``, ``probabilities`` (one map per class, iterable), ``class_names``
    and ``colors``; ``record`` (its class names set from ``result``) goes into the Labels layer's
    metadata, its source and run into each confidence layer's.
    """
    geo = geometry.kwargs() if geometry is not None else {}
    names = list(result.class_names)
    colors = list(result.colors)
    record = (record or RunRecord()).replace(class_names=names, role=LABELS)
    top = _top_classes(result, visible_confidence)
    layers: list[tuple[Any, dict[str, Any], str]] = []
    for k, prob in enumerate(result.probabilities):
        layers.append((
            prob,
            {
                "name": confidence_layer_name(source_name, names[k]),
                "colormap": _confidence_colormap(names[k], colors[k]),
                "blending": "translucent",
                "opacity": _CONFIDENCE_OPACITY,
                "contrast_limits": (0.0, 1.0),
                "rgb": False,
                "visible": k in top,
                "metadata": ConfidenceRecord.of_run(names[k], record).to_metadata(),
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
def managed_layers(viewer: Any, source_id: str) -> tuple[Any, dict[str, Any]]:
    """The managed Labels layer (or None) and its confidence layers by class, for a source.

    Confidence layers belong to the run of their Labels layer (same ``run_id``): those of a
    Labels layer a person edited and a re-run left alone stay with it. Without a managed Labels
    layer (deleted by the user), the source's confidence layers are all returned, for reuse."""
    labels = None
    run_id = None
    confidence: dict[str, list[Any]] = {}
    for layer in viewer.layers:
        meta = plugin_metadata(getattr(layer, "metadata", None))
        if meta.get("source_id") != source_id:
            continue
        if meta.get("role") == LABELS and labels is None:
            record = RunRecord.from_metadata(layer.metadata)
            if record is not None and record.managed:
                labels, run_id = layer, record.run_id
        elif meta.get("role") == CONFIDENCE:
            confidence.setdefault(meta.get("class_name"), []).append(layer)
    owned: dict[str, Any] = {}
    for name, layers in confidence.items():
        mine = [layer for layer in layers
                if labels is None or plugin_metadata(layer.metadata).get("run_id") == run_id]
        if mine:
            owned[name] = mine[-1]
    return labels, owned


# ---- applying a run ------------------------------------------------------------------------------
@dataclass
class ApplyReport:
    """What :func:`apply_result` did, for the status line and tests."""

    mode: str  # "new", "updated", "replaced", "kept-edited"
    labels_layer: Any
    confidence_layers: dict[str, Any] = field(default_factory=dict)
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
    if mode == "updated":  # the same run continues: its confidence layers stay paired
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
            report.labels_layer = viewer.add_layer(_layer_from_tuple(data, kwargs, "labels"))

    if mode == "kept-edited":
        # The edited layer keeps its own confidence maps (an export of it pairs them by run);
        # the new result gets new ones, named after its new Labels layer.
        confidence = {}
        suffix = report.labels_layer.name[len(labels_layer_name(source_name)):]
        for _, kwargs, _ in conf_tuples:
            kwargs["name"] = _unique_name(viewer, kwargs["name"] + suffix)
    report.confidence_layers = _apply_confidence(
        viewer, conf_tuples, confidence, written, report.labels_layer,
        partial=(mode == "updated"), class_names=names,
    )
    return report


def _apply_confidence(
    viewer: Any,
    conf_tuples: list[tuple[Any, dict[str, Any], str]],
    existing: dict[str, Any],
    written: dict[str, Any],
    labels_layer: Any,
    *,
    partial: bool,
    class_names: list[str],
) -> dict[str, Any]:
    """Update, add or remove the per-class confidence layers (kept just below the labels).

    Layers of classes that are gone are reused for new classes before any is added or removed:
    adding and removing napari layers costs far more than a re-query itself.
    """
    layers: dict[str, Any] = {}
    stale = [existing.pop(name) for name in list(existing) if name not in class_names]
    for name, (data, kwargs, _) in zip(class_names, conf_tuples):
        layer = existing.get(name)
        if layer is None and stale and not partial:
            layer = stale.pop(0)
        usable = (
            layer is not None and isinstance(layer.data, np.ndarray)
            and layer.data.shape == data.shape and layer.data.flags.writeable
        )
        if usable and partial:
            for idx in written.values():
                layer.data[idx] = data[idx]
            layer.refresh()
        elif usable:
            layer.data = data
            layer.name = kwargs["name"]
            layer.colormap = kwargs["colormap"]
            layer.contrast_limits = (0.0, 1.0)
            layer.visible = kwargs["visible"]
            layer.metadata = kwargs["metadata"]
        else:
            if layer is not None:
                viewer.layers.remove(layer)
            layer = _layer_from_tuple(data, kwargs, "image")
            viewer.layers.insert(viewer.layers.index(labels_layer), layer)
        layers[name] = layer
    for layer in stale:
        viewer.layers.remove(layer)
    return layers
