"""A class Labels layer -> an instance Labels layer (one label per connected component of a class).

For people who want to edit or count instances: the core's :func:`~..export.instances.instance_labels`
(the same rule as the COCO export: connectivity = all axes by default, so diagonal neighbours
connect) applied to the layer's data, either the whole array (2D image, or 3D components of a
stack) or one slice of a stack. The result is a layer-data tuple ``(data, kwargs, "labels")``
named ``<name> [instances]``, with the source's scale and translate and a ``features`` table
(``index`` = instance id, ``class_index``, ``class``, ``area``) so napari's status bar shows the
class of the instance under the cursor.

Qt-free and viewer-free (the npe2 command in :mod:`.instances_command` puts it into a viewer).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, MaskClipError
from ..export.instances import instance_labels
from .export_plan import export_options_from_meta

__all__ = ["INSTANCES_META_KEY", "instance_layer_name", "instances_layer_data"]

#: The instance layer's entry in ``layer.metadata`` (not the run record's key: it is no run).
INSTANCES_META_KEY = "napari_maskclip_instances"
_GEOMETRY_KEYS = ("scale", "translate", "axis_labels", "units")


def instance_layer_name(source_name: str) -> str:
    return f"{source_name} [instances]"


def _class_names(meta: Mapping[str, Any]) -> Optional[list[str]]:
    """Names of labels 1..n from the layer's run record or features; None when it has none."""
    try:
        return list(export_options_from_meta(dict(meta))["classes"])
    except MaskClipError:
        return None


def instances_layer_data(
    data: Any,
    meta: Mapping[str, Any],
    *,
    lead: Optional[Sequence[int]] = None,
    connectivity: Optional[int] = None,
    min_area: int = 1,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """The instance layer of the Labels data ``data`` (``meta``: the layer's ``name``,
    ``metadata``, ``features``, ``scale``, ``translate``...).

    ``lead``: the indices of the leading axes of one 2D slice (the viewer's current slice of a
    stack): only that slice is split, the rest of the (same-shaped) result stays 0. None: the
    whole array (components in 3D for a stack).
    """
    labels = np.asarray(data)
    if labels.ndim < 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(
            f"Instances need integer labels of at least 2 axes, got {labels.dtype} of shape "
            f"{labels.shape}."
        )
    instances = np.zeros(labels.shape, np.int32)
    if lead is None:
        region: tuple[Any, ...] = ()
    else:
        region = tuple(int(i) for i in lead)
        if len(region) != labels.ndim - 2 or any(
            not 0 <= i < n for i, n in zip(region, labels.shape)
        ):
            raise InvalidInputError(
                f"Slice {region} is not a 2D slice of labels of shape {labels.shape}."
            )
    found = instance_labels(labels[region], connectivity=connectivity, min_area=min_area)
    instances[region] = found.instances
    names = _class_names(meta)
    n = len(found)
    class_index = [0, *(int(c) for c in found.classes)]

    def name_of(k: int) -> str:
        if k == 0:
            return "background"
        return names[k - 1] if names and k <= len(names) else f"label {k}"

    features = {
        "index": list(range(n + 1)),
        "class_index": class_index,
        "class": [name_of(k) for k in class_index],
        "area": [0, *(int(a) for a in found.areas)],
    }
    source = str(meta.get("name") or "labels")
    kwargs: dict[str, Any] = {
        "name": instance_layer_name(source),
        "features": features,
        "metadata": {
            INSTANCES_META_KEY: {
                "labels_layer": source,
                "slice": list(region) if lead is not None else None,
                "connectivity": connectivity,
                "min_area": int(min_area),
                "instances": n,
                "dropped_small": found.dropped_small,
            }
        },
    }
    for key in _GEOMETRY_KEYS:
        value = meta.get(key)
        if value is not None:
            kwargs[key] = list(value)
    return instances, kwargs, "labels"
