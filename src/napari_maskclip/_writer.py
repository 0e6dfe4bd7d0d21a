"""napari's *Save* for Labels layers: write the layer as samples of a training dataset.

An npe2 single-layer writer (``write_labels_dataset(path, data, meta)``); ``path`` is the dataset
folder (created, or appended to). All the work is :func:`napari_maskclip.export.export_sample`;
this module only reads what the layer says about itself:

* class names: the plugin's metadata (``metadata["napari_maskclip"]``: ``class_texts`` with
  synonyms, or ``class_names``; ``background``; ``settings``/``model``/``pretrained``), else the
  layer's ``features`` table (columns ``index`` and ``name``; row 0 names the background);
* the image: a writer call receives only the Labels layer, so the image comes from
  ``metadata["napari_maskclip"]["source_path"]`` (an image file) when given, else from the
  viewer the Save was made in (the layer whose ``unique_id`` is the metadata's ``source_id``, or
  whose name is ``source_name``), when its size matches; otherwise the samples are mask-only
  (``"image": null`` in ``dataset.json``);
* confidence maps: the plugin's confidence layers of the same source in that viewer, if all
  classes have one; edited pixels: ``metadata["napari_maskclip"]["edited"]`` (a boolean array
  shaped like the labels) when the widget stored it, else unknown.

An existing sample is never replaced from here (Save cannot ask): rename the layer, or use the
widget's Export with overwrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import DatasetError, InvalidInputError

__all__ = ["write_labels_dataset", "export_options_from_meta"]

META_KEY = "napari_maskclip"
_LAYER_SUFFIX = " [maskclip]"
_FILE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy", ".zarr", ".json"}


def _plugin_meta(meta: dict[str, Any]) -> dict[str, Any]:
    value = (meta.get("metadata") or {}).get(META_KEY)
    return value if isinstance(value, dict) else {}


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
    """What the Labels layer's state says about its classes, provenance and origin (pure)."""
    plugin = _plugin_meta(meta)
    classes = plugin.get("class_texts") or plugin.get("class_names")
    background = plugin.get("background")
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
    settings = plugin.get("settings") or {}
    provenance = {
        "model": plugin.get("model", settings.get("model")),
        "pretrained": plugin.get("pretrained", settings.get("pretrained")),
        "settings": settings,
    }
    layer_name = str(meta.get("name") or "labels")
    source_name = plugin.get("source_name")
    name = source_name or (layer_name[: -len(_LAYER_SUFFIX)] if layer_name.endswith(_LAYER_SUFFIX) else layer_name)
    edited = plugin.get("edited")
    return {
        "name": name,
        "classes": list(classes),
        "background": background or "background",
        "provenance": provenance,
        "edited": edited if isinstance(edited, (bool, np.ndarray)) else None,
        "source": {"labels_layer": layer_name, "image_layer": source_name,
                   "image_path": plugin.get("source_path")},
        "source_id": plugin.get("source_id"),
        "source_path": plugin.get("source_path"),
    }


def _shape_fits(image_shape: tuple[int, ...], labels_shape: tuple[int, ...]) -> bool:
    return image_shape == labels_shape or image_shape[:-1] == labels_shape


def _viewer_layers() -> list[Any]:
    try:
        import napari
    except ImportError:  # pragma: no cover - napari is there whenever napari calls us
        return []
    viewer = napari.current_viewer()
    return list(viewer.layers) if viewer is not None else []


def _is_image_layer(layer: Any) -> bool:
    try:
        from napari.layers import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(layer, Image)


def _find_image(options: dict[str, Any], labels_shape: tuple[int, ...], layers: list[Any]) -> Any:
    path = options.get("source_path")
    if path and Path(path).is_file():
        from .image_files import read_image

        image = read_image(path)
        if _shape_fits(tuple(image.shape), labels_shape):
            return image
    for layer in layers:
        if not _is_image_layer(layer):
            continue
        same = (options.get("source_id") and str(getattr(layer, "unique_id", "")) == options["source_id"])
        if not same and layer.name != options["source"]["image_layer"]:
            continue
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        if _shape_fits(tuple(data.shape), labels_shape):
            return data
    return None


def _find_confidence(options: dict[str, Any], labels_shape: tuple[int, ...], layers: list[Any]) -> Any:
    source_id = options.get("source_id")
    if not source_id:
        return None
    maps: dict[str, Any] = {}
    for layer in layers:
        meta = getattr(layer, "metadata", {}).get(META_KEY)
        if isinstance(meta, dict) and meta.get("role") == "confidence" and meta.get("source_id") == source_id:
            maps[meta.get("class_name")] = layer.data
    names = [text.split(";")[0].strip() for text in options["classes"]]
    if not names or any(n not in maps or tuple(maps[n].shape) != labels_shape for n in names):
        return None
    return [maps[n] for n in names]


def write_labels_dataset(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer into the dataset folder ``path``; return the files written."""
    from .export import export_sample, safe_sample_name

    target = Path(path)
    if target.suffix.lower() in _FILE_SUFFIXES:
        raise InvalidInputError(
            f"{target.name}: a MaskCLIP training dataset is a folder; give a folder name without "
            f"the {target.suffix} extension."
        )
    options = export_options_from_meta(meta)
    labels = np.asarray(data[0] if meta.get("multiscale") else data)
    layers = _viewer_layers()
    image = _find_image(options, labels.shape, layers)
    probabilities = _find_confidence(options, labels.shape, layers)
    report = export_sample(
        target,
        safe_sample_name(options["name"]),
        image,
        labels,
        options["classes"],
        background=options["background"],
        probabilities=probabilities,
        edited=options["edited"],
        provenance=options["provenance"],
        source={k: v for k, v in options["source"].items() if v},
    )
    return [str(p) for p in report.files]
