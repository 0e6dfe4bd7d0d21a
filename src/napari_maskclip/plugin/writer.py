"""napari's *Save* for Labels layers: write the layer as samples of a training dataset.

An npe2 single-layer writer (``write_labels_dataset(path, data, meta)``); ``path`` is the dataset
folder (created, or appended to). What the layer says about itself (classes, image, confidence
maps, edited pixels) is read by :func:`.export_plan.plan_layer_export`, the same code the widget's
Export panel uses, and the work is :func:`napari_maskclip.export.export_sample_iter`:

* class names: the plugin's metadata, else the layer's ``features`` table (``index``, ``name``);
* the image: a writer call receives only the Labels layer, so the image comes from
  ``metadata["napari_maskclip"]["source_path"]`` when given, else from the viewer the Save was
  made in (the source Image layer, read slice by slice); otherwise the samples are mask-only
  (``"image": null`` in ``dataset.json``);
* confidence maps: the confidence layers of the same MaskCLIP run, when all are still there;
* edited pixels: the labels now compared with what MaskCLIP wrote (recorded by the widget), or
  an explicit ``metadata["napari_maskclip"]["edited"]`` mask; unknown otherwise;
* stacks: one sample per slice; for a layer the widget made, the slices MaskCLIP wrote or someone
  painted (untouched, never-segmented slices are skipped).

An existing sample is never replaced from here (Save cannot ask): rename the layer, or use the
widget's Export panel with overwrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..progress import run_to_completion
from .export_plan import SLICES_LABELLED, export_options_from_meta, plan_layer_export

__all__ = ["write_labels_dataset", "export_options_from_meta"]

_FILE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy", ".zarr", ".json"}


def _viewer_layers() -> list[Any]:
    """The layers of the viewer the Save was made in (a writer is not told which viewer)."""
    try:
        import napari
    except ImportError:  # pragma: no cover - napari is there whenever napari calls us
        return []
    viewer = napari.current_viewer()
    return list(viewer.layers) if viewer is not None else []


def write_labels_dataset(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer into the dataset folder ``path``; return the files written."""
    target = Path(path)
    if target.suffix.lower() in _FILE_SUFFIXES:
        raise InvalidInputError(
            f"{target.name}: a MaskCLIP training dataset is a folder; give a folder name without "
            f"the {target.suffix} extension."
        )
    labels = data[0] if meta.get("multiscale") else data
    if not isinstance(labels, np.ndarray):
        labels = np.asarray(labels)
    plan = plan_layer_export(
        layer_name=str(meta.get("name") or "labels"), metadata=meta.get("metadata"),
        features=meta.get("features"), data=labels, layers=_viewer_layers(),
    )
    report = run_to_completion(plan.export_iter(target, selection=SLICES_LABELLED))
    return [str(p) for p in report.files]
