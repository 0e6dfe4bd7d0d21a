"""npe2 commands (Layers > Segment): show the selected Labels layer's instances as a new layer.

Kept apart from :mod:`.instance_layer` (pure) because napari injects the viewer by the type
annotation, which must be a real class here (no postponed annotations in this module).
"""

import napari
import numpy as np

from ..errors import InvalidInputError, MaskClipError
from .instance_layer import instances_layer_data
from .notify import show_exception

__all__ = ["show_instances", "show_instances_current_slice", "add_instances_layer"]


def add_instances_layer(viewer: napari.viewer.Viewer, layer, *, current_slice: bool = False):
    """Add (or refresh, same name) the instance layer of the Labels ``layer``; returns it."""
    from napari.layers import Labels

    if not isinstance(layer, Labels):
        raise InvalidInputError("Select a Labels layer first: its instances are shown as a new layer.")
    data = layer.data[0] if layer.multiscale else layer.data
    lead = None
    if current_slice and np.ndim(data) > 2:
        point = layer.world_to_data(viewer.dims.point)
        lead = [int(np.clip(round(float(p)), 0, n - 1)) for p, n in zip(point, data.shape)][:-2]
    meta = {
        "name": layer.name, "metadata": layer.metadata, "features": layer.features,
        "scale": layer.scale, "translate": layer.translate,
        "axis_labels": getattr(layer, "axis_labels", None), "units": getattr(layer, "units", None),
    }
    out, kwargs, _ = instances_layer_data(data, meta, lead=lead)
    name = kwargs["name"]
    if name in viewer.layers:  # a second call refreshes the layer instead of piling up copies
        target = viewer.layers[name]
        target.data = out
        target.features = kwargs["features"]
        target.metadata = kwargs["metadata"]
        return target
    return viewer.add_labels(out, **kwargs)


def _run(viewer: napari.viewer.Viewer, current_slice: bool) -> None:
    try:
        add_instances_layer(viewer, viewer.layers.selection.active, current_slice=current_slice)
    except MaskClipError as exc:
        show_exception(exc)


def show_instances(viewer: napari.viewer.Viewer) -> None:
    """The whole selected Labels layer (3D components for a stack)."""
    _run(viewer, current_slice=False)


def show_instances_current_slice(viewer: napari.viewer.Viewer) -> None:
    """Only the slice the viewer shows (2D components)."""
    _run(viewer, current_slice=True)
