"""From a Labels layer (and its viewer) to a dataset export: what, from where, which slices.

Shared by the Export panel (:mod:`._qt.export_panel`, in a worker) and napari's Save
(:mod:`.writer`, synchronous). :func:`plan_layer_export` only reads metadata and finds layers
(cheap, on the main thread); :meth:`ExportPlan.export_iter` reads pixels, one slice at a time,
and runs :func:`napari_maskclip.export.export_sample_iter`.

What the plugin's layer metadata gives (``metadata["napari_maskclip"]``, written by the widget):

* **classes** (``class_texts`` with synonyms, or ``class_names``; else the layer's ``features``
  table with ``index`` and ``name`` columns), **background** names and the run's provenance;
* **the image**: the file at ``source_path`` if set, else the source Image layer (by
  ``source_id``, else by ``source_name``). With the run's ``source_layout`` (data shape, RGB,
  channel axis, picked channels), slices are read one at a time from the layer's data (dask and
  zarr are never loaded whole), with the channels MaskCLIP saw, channels last;
* **confidence maps**: the confidence layer of the same run (``run_id``), which holds every
  class's map (older one-class layers are read too); slices
  the run did not compute are NaN in the file ("not queried");
* **edited pixels**: ``edited`` (an explicit mask) if present, else the ``predicted`` record
  (:mod:`.edits`): edited = current labels != what MaskCLIP wrote;
* **geometry**: a channel axis kept as length 1 in the labels (``Z x 1 x H x W`` for a
  ``Z x C x H x W`` source) is dropped, so a stack exports one sample per slice (``<name>_z0003``).

Each labels slice is copied once when it is exported, and its mask and edited mask are computed
from that copy, so painting during an export cannot tear a sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from ..classes import parse_classes
from ..errors import DatasetError, InvalidInputError
from ..progress import Progress, ProgressGenerator
from ..stacks import (
    Index,
    SampleAxes,
    StackLayout,
    index_of_key,
    leading_axis_names,
    leading_indices,
    slice_key,
)
from .edits import edited_plane, record_shapes_fit
from .records import LABELS, ConfidenceRecord, RunRecord, SourceLayout

__all__ = [
    "SLICES_ALL",
    "SLICES_LABELLED",
    "ExportPlan",
    "SliceView",
    "export_options_from_meta",
    "plan_layer_export",
]

_LAYER_SUFFIX = " [maskclip]"
#: Every slice of the layer.
SLICES_ALL = "all"
#: Slices MaskCLIP wrote or someone painted (all slices of a layer the plugin did not make).
SLICES_LABELLED = "labelled"
Selection = Union[str, tuple[int, ...]]
Lead = Index


# ---- lazy arrays ---------------------------------------------------------------------------------
class SliceView:
    """A read-only array-like producing one 2D slice (plus channels) at a time.

    The exporter asks ``view[lead]`` (leading integer indices) per sample, or ``np.asarray(view)``
    for a 2D layer, so nothing bigger than a slice is ever read at once.
    """

    def __init__(
        self, shape: Sequence[int], dtype: Any, n_lead: int, read: Callable[[Lead], np.ndarray]
    ):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._n_lead = n_lead
        self._read = read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != self._n_lead or not all(isinstance(i, (int, np.integer)) for i in index):
            raise IndexError(
                f"A slice view takes {self._n_lead} leading integer indices, got {index!r}."
            )
        return self._read(tuple(int(i) for i in index))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self._n_lead == 0:
            out = self._read(())
        else:
            leads = leading_indices(self.shape[: self._n_lead] + (1, 1))
            out = np.stack([self._read(lead) for lead in leads]).reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)


class _LabelsSnapshot:
    """Copies of labels slices, one at a time; the edited mask is computed from the same copy."""

    def __init__(self, data: Any, axes: SampleAxes):
        self._data = data
        self._axes = axes
        self._last: Optional[tuple[Lead, np.ndarray]] = None

    def plane(self, lead: Lead) -> np.ndarray:
        if self._last is None or self._last[0] != lead:
            out = self._axes.to_output(lead)
            self._last = (lead, np.array(self._data[out] if out else self._data, copy=True))
        return self._last[1]


# ---- what the layer says about itself ------------------------------------------------------------
def _names_from_features(features: Any) -> Optional[tuple[list[str], Optional[str]]]:
    """(class names for labels 1..n, background name) from a ``features`` table, if it has one."""
    if features is None:
        return None
    try:
        columns = {key: list(features[key]) for key in ("index", "name")}
    except (KeyError, TypeError, IndexError):
        return None
    rows = sorted(zip(columns["index"], columns["name"]), key=lambda r: int(r[0]))
    if not rows:
        return None
    labels = [int(i) for i, _ in rows]
    named = [(i, str(n)) for i, n in rows if i > 0]
    if [i for i, _ in named] != list(range(1, len(named) + 1)):
        raise DatasetError(
            f"The layer's features give names for labels {labels}; labels 1..n must all be named."
        )
    background = next((str(n) for i, n in rows if int(i) == 0), None)
    return [n for _, n in named], background


def export_options_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What a Labels layer's state (``name``, ``metadata``, ``features``) says about its classes,
    provenance and origin (pure; raises DatasetError when the classes are unknown)."""
    record = RunRecord.from_metadata(meta.get("metadata")) or RunRecord(role=None)
    classes = record.texts
    background = record.background
    if not classes:
        found = _names_from_features(meta.get("features"))
        if found:
            classes, bg_name = found
            background = background or bg_name
    if not classes:
        raise DatasetError(
            "This Labels layer does not say which class each label is: run MaskCLIP on it from "
            "the widget, or give the layer a features table with 'index' and 'name' columns "
            "(row 0 = background)."
        )
    provenance: dict[str, Any] = {
        "model": record.model,
        "pretrained": record.pretrained,
        "settings": record.settings or {},
    }
    if record.labelled_by:
        provenance["labelled_by"] = record.labelled_by
    if record.student_checkpoint:
        provenance["student_checkpoint"] = record.student_checkpoint
    layer_name = str(meta.get("name") or "labels")
    source_name = record.source_name
    name = source_name or (
        layer_name[: -len(_LAYER_SUFFIX)] if layer_name.endswith(_LAYER_SUFFIX) else layer_name
    )
    return {
        "name": name,
        "classes": list(classes),
        "background": background or "background",
        "provenance": provenance,
        "edited": record.edited,
        "source": {"labels_layer": layer_name, "image_layer": source_name,
                   "image_path": record.source_path},
        "source_id": record.source_id,
        "source_path": record.source_path,
    }


def _is_image(layer: Any) -> bool:
    try:
        from napari.layers import Image
    except ImportError:  # pragma: no cover - napari is there whenever a layer is
        return False
    return isinstance(layer, Image)


def _source_layer(options: dict[str, Any], layers: Iterable[Any]) -> Any:
    images = [layer for layer in layers if _is_image(layer)]
    source_id = options.get("source_id")
    if source_id:
        for layer in images:
            if str(getattr(layer, "unique_id", "")) == source_id:
                return layer
    name = options["source"]["image_layer"]
    return next((layer for layer in images if name and layer.name == name), None)


def _fits(image_shape: Sequence[int], labels_shape: Sequence[int]) -> bool:
    image_shape, labels_shape = tuple(image_shape), tuple(labels_shape)
    return image_shape == labels_shape or image_shape[:-1] == labels_shape


def _layout_view(
    data: Any, layout: StackLayout, channels: Optional[tuple[int, ...]], axes: SampleAxes
) -> SliceView:
    """The source as the exporter wants it: shaped like the (squeezed) labels, channels last."""

    def read(lead: Lead) -> np.ndarray:
        return layout.read_sample(data, lead, channels)  # the loop index is the sample index

    return SliceView(axes.shape + layout.sample_channels(channels), data.dtype, axes.n_lead, read)


# ---- the plan ---------------------------------------------------------------------------------
@dataclass
class ExportPlan:
    """Everything an export of one Labels layer needs; pixels are read by :meth:`export_iter`."""

    name: str
    labels_data: Any
    axes: SampleAxes
    classes: list[str]
    background: str
    provenance: dict[str, Any]
    source: dict[str, Any]
    image: Any = None
    probabilities: Optional[list[Any]] = None
    edited: Any = None
    #: What the plugin wrote, per slice (:mod:`.edits`), when the layer records it.
    predicted: Optional[dict[str, Any]] = None
    axis_names: Optional[tuple[str, ...]] = None
    #: What the user should know (missing image, maps or edit information).
    notes: list[str] = field(default_factory=list)
    _snapshot: Optional[_LabelsSnapshot] = None

    @property
    def is_stack(self) -> bool:
        return self.axes.n_lead > 0

    @property
    def written_leads(self) -> list[Lead]:
        """Slices MaskCLIP wrote (squeezed leading indices), from the record."""
        if not self.predicted:
            return []
        leads = []
        for key in self.predicted:
            out = index_of_key(key)
            if len(out) == len(self.axes.output_shape) - 2:
                leads.append(self.axes.from_output(out))
        return sorted(leads)

    def current_lead(self, data_point: Sequence[float]) -> Lead:
        """The slice at a point in the labels layer's data coordinates (``world_to_data``)."""
        return self.axes.lead_at(data_point)

    def slice_name(self, lead: Lead) -> str:
        """The sample name the exporter gives the slice ``lead`` (for messages)."""
        from ..export.layout import slice_name

        axes = self.axis_names or leading_axis_names(len(lead))
        if not lead:
            return self.name
        return slice_name(self.name, lead, axes, self.axes.shape[: len(lead)])

    def _select(self, selection: Selection) -> Optional[list[Lead]]:
        if not self.is_stack:
            return None
        if isinstance(selection, tuple):
            return [selection]
        if selection == SLICES_ALL or self.predicted is None:
            return None
        written = set(self.written_leads)
        picked = []
        for lead in self.axes.all_leads():
            out = self.axes.to_output(lead)
            if lead in written or np.asarray(self.labels_data[out]).any():
                picked.append(lead)
        if not picked:
            raise InvalidInputError(
                "Nothing to export: no slice of this layer holds labels. Run MaskCLIP on a slice "
                "or paint one first."
            )
        return picked

    def _check_values(self, leads: Optional[list[Lead]], ignore: int) -> None:
        """Refuse label values that are no class, before anything is written."""
        m = len(self.classes)
        for lead in leads if leads is not None else self.axes.all_leads():
            out = self.axes.to_output(lead)
            plane = np.asarray(self.labels_data[out] if out else self.labels_data)
            bad = plane[((plane < 0) | (plane > m)) & (plane != ignore)]
            if bad.size:
                where = f" in {self.slice_name(lead)}" if lead else ""
                raise InvalidInputError(
                    f"Label value {int(bad.flat[0])}{where} is not a class (0 = background, 1..{m} "
                    f"= {', '.join(self.display_names[:5])}{', ...' if m > 5 else ''}; {ignore} = "
                    "ignore). Paint it with a listed class, or add the class to the list and "
                    "run again."
                )

    @property
    def display_names(self) -> list[str]:
        return [spec.name for spec in parse_classes(self.classes)]

    def export_iter(
        self,
        dataset_dir: Union[str, os.PathLike],
        *,
        name: Optional[str] = None,
        selection: Selection = SLICES_LABELLED,
        min_confidence: Optional[float] = None,
        save_confidence: bool = True,
        overwrite: bool = False,
        remap: bool = False,
        add_classes: bool = False,
    ) -> ProgressGenerator[Any]:
        """Check, then export; yields progress, returns the export's
        :class:`~napari_maskclip.export.ExportReport`."""
        from ..export import export_sample_iter, ignore_index, safe_sample_name

        if not str(dataset_dir).strip():
            raise InvalidInputError("Choose a dataset folder to export into.")
        if min_confidence is not None and self.probabilities is None:
            raise InvalidInputError(
                "The confidence threshold needs this run's confidence maps, which are not in the "
                "viewer any more (removed, or replaced by a later run). Export without the "
                "threshold, or run MaskCLIP again."
            )
        sample = safe_sample_name((name or self.name).strip() or self.name)
        self.name = sample
        yield Progress("check", 0, 0, "checking the labels")
        leads = self._select(selection)
        self._check_values(leads, ignore_index(len(self.classes)))
        report = yield from export_sample_iter(
            Path(dataset_dir), sample, self.image, self._labels_view(), self.classes,
            background=self.background,
            probabilities=self.probabilities,
            edited=self.edited, min_confidence=min_confidence, save_confidence=save_confidence,
            overwrite=overwrite, remap=remap, add_classes=add_classes,
            provenance=self.provenance, source=self.source, slices=leads,
            axis_names=self.axis_names,
        )
        return report

    def _labels_view(self) -> SliceView:
        snapshot = self._snapshot
        assert snapshot is not None
        data = self.labels_data
        return SliceView(self.axes.shape, data.dtype, self.axes.n_lead, snapshot.plane)


def plan_layer_export(
    *,
    layer_name: str,
    metadata: Optional[dict[str, Any]],
    features: Any,
    data: Any,
    layers: Iterable[Any] = (),
) -> ExportPlan:
    """Plan the export of a Labels layer (its ``data``, ``metadata``, ``features``) found in a
    viewer holding ``layers``. Reads no pixels; raises DatasetError if the classes are unknown."""
    meta = {"name": layer_name, "metadata": metadata or {}, "features": features}
    options = export_options_from_meta(meta)
    record = RunRecord.from_metadata(meta["metadata"]) or RunRecord(role=None)
    layers = list(layers)
    output_shape = tuple(int(s) for s in data.shape)
    if len(output_shape) < 2:
        raise InvalidInputError(f"Labels of shape {output_shape}: at least 2D (H x W) are needed.")
    source_layout: Optional[SourceLayout] = record.source_layout
    layout = source_layout.stack_layout() if source_layout is not None else None
    channels = source_layout.channels if source_layout is not None else None
    axes = SampleAxes.of(output_shape, layout)
    n_lead = axes.n_lead
    notes: list[str] = []

    plan = ExportPlan(
        name=options["name"], labels_data=data, axes=axes, classes=options["classes"],
        background=options["background"], provenance=options["provenance"],
        source={k: v for k, v in options["source"].items() if v},
        axis_names=None if n_lead <= 2 else leading_axis_names(n_lead),
        notes=notes,
    )
    plan._snapshot = _LabelsSnapshot(data, axes)

    if record.predicted and record_shapes_fit(record.predicted, output_shape):
        plan.predicted = record.predicted

    # The image.
    path = options.get("source_path")
    if path and Path(path).is_file():
        from ..image_files import read_image

        image = read_image(path)
        if _fits(image.shape, axes.shape):
            plan.image = image
    if plan.image is None:
        layer = _source_layer(options, layers)
        if layer is not None:
            source = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
            shape = tuple(int(s) for s in source.shape)
            if layout is not None and shape == layout.data_shape and bool(layer.rgb) == layout.rgb:
                plan.image = _layout_view(source, layout, channels, axes)
            elif _fits(shape, axes.shape):
                plan.image = source
            else:
                notes.append(f"the image layer '{layer.name}' no longer matches the labels")
        else:
            notes.append("the source image is not in the viewer")
        if plan.image is None:
            notes[-1] += ": the samples are mask-only (no image)"

    # Confidence maps of the same run.
    names = record.class_names or [parse_classes(t)[0].name for t in plan.classes]
    run_id, source_id = record.run_id, record.source_id
    maps: dict[str, Any] = {}
    if source_id:
        for layer in layers:
            conf = ConfidenceRecord.from_metadata(getattr(layer, "metadata", None))
            if conf is None:
                continue
            same_run = conf.run_id == run_id if run_id else conf.source_id == source_id
            if not same_run:
                continue
            for name, data in conf.maps_by_class(layer.data).items():
                if tuple(data.shape) == output_shape:
                    maps.setdefault(name, data)
    if names and all(n in maps for n in names):
        plan.probabilities = [_confidence_view(maps[n], axes, plan.predicted) for n in names]
    elif record.role == LABELS and record.settings is not None:
        notes.append("this run's confidence maps are no longer in the viewer: no confidence saved")

    # Edited pixels.
    explicit = options["edited"]
    if isinstance(explicit, bool):
        plan.edited = explicit
    elif isinstance(explicit, np.ndarray) and tuple(explicit.shape) == output_shape:
        plan.edited = SliceView(axes.shape, bool, n_lead,
                                lambda lead: np.asarray(explicit[axes.to_output(lead)], dtype=bool))
    elif plan.predicted is not None:
        snapshot, predicted = plan._snapshot, plan.predicted

        def edited(lead: Lead) -> np.ndarray:
            return edited_plane(snapshot.plane(lead), slice_key(axes.to_output(lead)), predicted)

        plan.edited = SliceView(axes.shape, bool, n_lead, edited)
    elif record.role == LABELS:
        notes.append(
            "which pixels were edited is unknown (the layer has no record of MaskCLIP's output)"
        )
    return plan


def _confidence_view(data: Any, axes: SampleAxes, record: Optional[dict[str, Any]]) -> SliceView:
    """One class's map, slice by slice; NaN ("not queried") where the run computed nothing."""

    def read(lead: Lead) -> np.ndarray:
        out = axes.to_output(lead)
        if record is not None and slice_key(out) not in record:
            return np.full(axes.shape[-2:], np.nan, dtype=np.float32)
        return np.asarray(data[out] if out else data, dtype=np.float32)

    return SliceView(axes.shape, np.float32, axes.n_lead, read)
