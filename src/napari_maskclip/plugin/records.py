"""What the plugin stores on napari layers, as typed records: one place for the metadata keys.

Everything lives in ``layer.metadata["napari_maskclip"]`` (:data:`META_KEY`), so napari's Save,
"Duplicate layer" and scripts keep it without the plugin. Three records, each with
``to_metadata()`` (the entry to merge into ``layer.metadata``) and ``from_metadata(metadata)``
(None when the layer holds none):

* :class:`RunRecord` on a Labels layer a run wrote (role ``labels``): the classes, the run's
  settings and provenance, where the image came from (:class:`SourceLayout`), which slices the
  plugin wrote (fingerprints and the compressed ``predicted`` copy, see :mod:`.edits`), and the
  ``run_id`` its confidence layers share;
* :class:`ConfidenceRecord` on a run's confidence image (role ``confidence``): its run, the
  class shown, and the maps of every class;
* :class:`SampleSuggestion` on a sample image: the class names (and model) worth trying.

Reading is lenient: a layer made by a script or an older version may lack fields or hold
values of the wrong type; those read as "not recorded" (None), and unknown keys are kept.
Qt-free and torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import InvalidInputError
from ..stacks import StackLayout

__all__ = [
    "CONFIDENCE",
    "LABELS",
    "META_KEY",
    "ConfidenceRecord",
    "RunRecord",
    "SampleSuggestion",
    "SourceLayout",
    "plugin_metadata",
    "role_of",
]

#: The key of the plugin's entry in ``layer.metadata``.
META_KEY = "napari_maskclip"
#: Roles of the layers a run makes.
LABELS = "labels"
CONFIDENCE = "confidence"


def plugin_metadata(metadata: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The plugin's entry of a layer's ``metadata`` (an empty dict when there is none)."""
    value = (metadata or {}).get(META_KEY)
    return value if isinstance(value, dict) else {}


def role_of(layer: Any) -> Optional[str]:
    """``"labels"`` or ``"confidence"`` for a layer a run made, else None."""
    role = plugin_metadata(getattr(layer, "metadata", None)).get("role")
    return role if isinstance(role, str) else None


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _texts(value: Any) -> Optional[list[str]]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _mapping(value: Any) -> Optional[dict[str, Any]]:
    return dict(value) if isinstance(value, Mapping) else None


@dataclass(frozen=True)
class SourceLayout:
    """How the segmented image's data was laid out, and which channels MaskCLIP saw."""

    data_shape: tuple[int, ...]
    rgb: bool = False
    channel_axis: Optional[int] = None
    channels: Optional[tuple[int, ...]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"data_shape": list(self.data_shape), "rgb": self.rgb,
                "channel_axis": self.channel_axis,
                "channels": list(self.channels) if self.channels else None}

    @classmethod
    def from_dict(cls, raw: Any) -> Optional["SourceLayout"]:
        """The layout ``raw`` describes, or None if it is not a usable description."""
        if not isinstance(raw, Mapping):
            return None
        try:
            channels = raw.get("channels")
            axis = raw.get("channel_axis")
            out = cls(
                data_shape=tuple(int(s) for s in raw["data_shape"]),
                rgb=bool(raw.get("rgb")),
                channel_axis=None if axis is None else int(axis),
                channels=tuple(int(c) for c in channels) if channels else None,
            )
            out.stack_layout()
        except (KeyError, TypeError, ValueError, InvalidInputError):
            return None
        return out

    def stack_layout(self) -> StackLayout:
        return StackLayout(self.data_shape, rgb=self.rgb, channel_axis=self.channel_axis)


#: The fields a run sets (see :meth:`RunRecord.with_run`); the rest is bookkeeping.
RUN_FIELDS = ("class_texts", "background", "settings", "source_layout", "model", "pretrained",
              "labelled_by", "student_checkpoint")


@dataclass(frozen=True)
class RunRecord:
    """What a run stores on its Labels layer (see the module doc). None: not recorded."""

    #: The label names, label k = ``class_names[k - 1]``.
    class_names: list[str] = field(default_factory=list)
    #: The classes as typed, with synonyms (``"dog; puppy"``), in label order.
    class_texts: Optional[list[str]] = None
    #: The background names as typed.
    background: Optional[str] = None
    #: The engine's record of the settings used (model and weights included).
    settings: Optional[dict[str, Any]] = None
    #: The model as chosen (a config JSON's path, not just its name) and its weights, so a
    #: student trained on an export gets the same teacher.
    model: Optional[str] = None
    pretrained: Optional[str] = None
    #: ``"student"`` when a trained student made the labels, and its checkpoint.
    labelled_by: Optional[str] = None
    student_checkpoint: Optional[str] = None
    #: The source image: its layer (``unique_id`` and name), a file, and its data layout.
    source_id: Optional[str] = None
    source_name: Optional[str] = None
    source_path: Optional[str] = None
    source_layout: Optional[SourceLayout] = None
    #: Shared with the run's confidence layers.
    run_id: Optional[str] = None
    #: False once the user's edits made the plugin leave this layer alone.
    managed: bool = True
    #: Slice key -> content hash of what the plugin wrote there.
    fingerprints: dict[str, str] = field(default_factory=dict)
    #: Slice key -> compressed copy of what the plugin wrote there (:mod:`.edits`).
    predicted: dict[str, Any] = field(default_factory=dict)
    #: An explicit mask (or True/False) of edited pixels, set by scripts.
    edited: Any = None
    role: Optional[str] = LABELS
    #: Keys this version does not know, kept as they are.
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "RunRecord":
        return dataclasses.replace(self, **changes)

    def with_run(self, run: "RunRecord") -> "RunRecord":
        """This record with what ``run`` says about a run (:data:`RUN_FIELDS`), None included."""
        return self.replace(**{name: getattr(run, name) for name in RUN_FIELDS})

    @property
    def texts(self) -> list[str]:
        """The classes with their synonyms when recorded, else the names."""
        return list(self.class_texts or self.class_names)

    def to_metadata(self) -> dict[str, Any]:
        entry: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "source_layout":
                value = None if value is None else value.to_dict()
            entry[f.name] = value
        return {META_KEY: entry}

    @classmethod
    def from_metadata(cls, metadata: Optional[Mapping[str, Any]]) -> Optional["RunRecord"]:
        """The record in a layer's ``metadata``, or None if it holds no plugin entry."""
        raw = (metadata or {}).get(META_KEY)
        if not isinstance(raw, Mapping):
            return None
        settings = _mapping(raw.get("settings"))
        edited = raw.get("edited")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            class_names=_texts(raw.get("class_names")) or [],
            class_texts=_texts(raw.get("class_texts")),
            background=_text(raw.get("background")),
            settings=settings,
            # Older records (and scripts) name the model only inside the settings.
            model=_text(raw["model"] if "model" in raw else (settings or {}).get("model")),
            pretrained=_text(raw["pretrained"] if "pretrained" in raw
                             else (settings or {}).get("pretrained")),
            labelled_by=_text(raw.get("labelled_by")),
            student_checkpoint=_text(raw.get("student_checkpoint")),
            source_id=_text(raw.get("source_id")),
            source_name=_text(raw.get("source_name")),
            source_path=_text(raw.get("source_path")),
            source_layout=SourceLayout.from_dict(raw.get("source_layout")),
            run_id=_text(raw.get("run_id")),
            managed=raw.get("managed", True) is not False,
            fingerprints={str(k): str(v) for k, v in (_mapping(raw.get("fingerprints")) or {}).items()},
            predicted=_mapping(raw.get("predicted")) or {},
            edited=edited if isinstance(edited, (bool, np.ndarray)) else None,
            role=_text(raw.get("role")),
            extra={k: v for k, v in raw.items() if k not in known},
        )


@dataclass(frozen=True)
class ConfidenceRecord:
    """What a run stores on its confidence image: the class shown, the run, and every map.

    A run makes *one* confidence layer: ``maps`` holds one map per class of ``class_names``
    (``(n_classes, *labels_shape)`` float32), the layer's data is the view ``maps[k]`` of the
    class shown (``class_name``). Layers from older versions or scripts hold one class each
    (no ``maps``): :meth:`maps_by_class` reads both.
    """

    class_name: str
    source_id: Optional[str] = None
    source_name: Optional[str] = None
    run_id: Optional[str] = None
    class_names: tuple[str, ...] = ()
    maps: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @classmethod
    def of_run(cls, class_name: str, run: RunRecord, maps: Optional[np.ndarray] = None
               ) -> "ConfidenceRecord":
        names = tuple(run.class_names or ()) if maps is not None else ()
        return cls(class_name, run.source_id, run.source_name, run.run_id, names, maps)

    def replace(self, **changes: Any) -> "ConfidenceRecord":
        return dataclasses.replace(self, **changes)

    def to_metadata(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"role": CONFIDENCE, "class_name": self.class_name,
                                 "source_id": self.source_id, "source_name": self.source_name,
                                 "run_id": self.run_id}
        if self.maps is not None:
            entry.update(class_names=list(self.class_names), maps=self.maps)
        return {META_KEY: entry}

    @classmethod
    def from_metadata(cls, metadata: Optional[Mapping[str, Any]]) -> Optional["ConfidenceRecord"]:
        raw = plugin_metadata(metadata)
        if raw.get("role") != CONFIDENCE:
            return None
        names = _texts(raw.get("class_names")) or []
        maps = raw.get("maps")
        if not (hasattr(maps, "ndim") and hasattr(maps, "shape") and maps.ndim >= 1
                and len(maps) == len(names)
                and names):
            names, maps = [], None
        return cls(class_name=str(raw.get("class_name")), source_id=_text(raw.get("source_id")),
                   source_name=_text(raw.get("source_name")), run_id=_text(raw.get("run_id")),
                   class_names=tuple(names), maps=maps)

    def maps_by_class(self, layer_data: Any = None) -> dict[str, Any]:
        """``{class name: map}``: every map of the run, or (an older one-class layer) its data."""
        if self.maps is not None:
            return dict(zip(self.class_names, self.maps))
        return {self.class_name: layer_data} if layer_data is not None else {}


@dataclass(frozen=True)
class SampleSuggestion:
    """What a sample image suggests: class names (with background names) and a model."""

    classes: str
    background: Optional[str] = None
    model: Optional[str] = None
    description: Optional[str] = None

    def to_metadata(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"suggested_classes": self.classes,
                                 "suggested_background": self.background}
        if self.model is not None:
            entry["suggested_model"] = self.model
        if self.description is not None:
            entry["description"] = self.description
        return {META_KEY: entry}

    @classmethod
    def from_metadata(cls, metadata: Optional[Mapping[str, Any]]) -> Optional["SampleSuggestion"]:
        raw = plugin_metadata(metadata)
        classes = raw.get("suggested_classes")
        if not classes:
            return None
        background, model = raw.get("suggested_background"), raw.get("suggested_model")
        return cls(classes=str(classes), background=str(background) if background else None,
                   model=str(model) if model else None, description=_text(raw.get("description")))
