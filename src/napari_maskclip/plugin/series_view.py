"""One image of a series in the viewer: the image, its Labels layer ready to edit, and what the
person changed (Qt-free; the Series page, :mod:`._qt.series_panel`, drives it).

The view keeps **three layers** and reuses them from image to image (adding and removing napari
layers costs far more than setting their data): the image, a translucent map of the model's
confidence (the top class's probability; hidden at first, for finding doubtful regions), and the
Labels layer, selected and in paint mode. The Labels layer carries a
:class:`~.records.RunRecord` like the Segment page's (class names, a stable colour per class, the
compressed copy of what the model wrote, see :mod:`.edits`), so the edited pixels are worked out
the same way as for Export: **edited = current labels != what the model wrote**. An image shown
from the dataset (already saved) has no prediction: its saved edited mask is kept, and pixels
changed since it was shown are added to it.

Public napari API only.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np

from ..stacks import slice_key
from .edits import edited_plane, record_planes
from .layers import labels_layer_name, result_layer_data
from .records import META_KEY, RunRecord, plugin_metadata

__all__ = ["SERIES_ROLE", "SeriesView", "ShownImage"]

#: ``role`` in the plugin metadata of the series' image and confidence layers (the Segment
#: page's image list leaves layers with a role out).
SERIES_ROLE = "series"
_KEY = slice_key(())  # the one 2D plane of a series image
_CONFIDENCE_NAME = "model confidence"


@dataclass
class ShownImage:
    """What the view shows now, as the page needs it to save the image."""

    index: int
    name: str
    image: np.ndarray
    #: The labels as they were put on screen (the model's, or the dataset's saved ones).
    shown: np.ndarray
    #: True when the labels are the model's prediction (not yet saved).
    predicted: bool
    probabilities: Optional[np.ndarray] = None
    #: The dataset's edited mask of a saved image (None: not saved, or unknown).
    saved_edited: Optional[np.ndarray] = None
    model_label: str = ""
    provenance: Optional[dict[str, Any]] = None


class SeriesView:
    """The series' layers in ``viewer`` (see the module doc)."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.image_layer: Any = None
        self.confidence_layer: Any = None
        self.labels_layer: Any = None
        self.current: Optional[ShownImage] = None

    # ---- showing ---------------------------------------------------------------------------
    def show(
        self,
        shown: ShownImage,
        *,
        class_names: Sequence[str],
        colors: Sequence[Sequence[float]],
        source_path: Optional[str] = None,
    ) -> Any:
        """Put ``shown`` into the viewer (layers reused); returns the Labels layer."""
        image = np.asarray(shown.image)
        labels = np.array(shown.shown, copy=True)  # the layer's own, writable copy
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
        self._show_image(image, rgb, shown.name)
        self._show_confidence(shown.probabilities, shown.name)
        record = RunRecord(
            class_names=list(class_names), source_name=shown.name, source_path=source_path,
            labelled_by="series", run_id=None,
            fingerprints={}, predicted=record_planes(labels, [()]),
            extra={"series_index": shown.index, "series_predicted": shown.predicted},
        )
        result = SimpleNamespace(
            labels=labels, probabilities=[], class_names=list(class_names), colors=list(colors),
            class_pixel_counts=lambda: [0] * len(class_names),
        )
        (_, kwargs, _), = result_layer_data(result, source_name=shown.name, record=record)
        layer = self.labels_layer
        if layer is None or layer not in self.viewer.layers:
            layer = self.viewer.add_labels(labels, **kwargs)
            self.labels_layer = layer
        else:
            layer.data = labels
            layer.colormap = kwargs["colormap"]
            layer.features = kwargs["features"]
            layer.name = kwargs["name"]
            layer.metadata = kwargs["metadata"]
            layer.refresh()
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        self.current = shown
        return layer

    def _show_image(self, image: np.ndarray, rgb: bool, name: str) -> None:
        layer = self.image_layer
        reuse = (
            layer is not None and layer in self.viewer.layers and bool(layer.rgb) == rgb
            and layer.data.ndim == image.ndim
        )
        limits = _contrast_limits(image)
        if reuse:
            layer.data = image
            if limits is not None:
                layer.contrast_limits_range = limits
                layer.contrast_limits = limits
            layer.name = name
        else:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
            kwargs: dict[str, Any] = {"name": name, "rgb": rgb,
                                      "metadata": {META_KEY: {"role": SERIES_ROLE}}}
            if limits is not None:
                kwargs["contrast_limits"] = limits
            self.image_layer = self.viewer.add_image(image, **kwargs)
            self.viewer.layers.move(self.viewer.layers.index(self.image_layer), 0)

    def _show_confidence(self, probabilities: Optional[np.ndarray], name: str) -> None:
        layer = self.confidence_layer
        if probabilities is None or len(probabilities) == 0:
            if layer is not None and layer in self.viewer.layers:
                layer.data = np.zeros((1, 1), dtype=np.float32)
                layer.visible = False
            return
        top = np.asarray(probabilities, dtype=np.float32).max(axis=0)
        if layer is None or layer not in self.viewer.layers:
            self.confidence_layer = self.viewer.add_image(
                top, name=_CONFIDENCE_NAME, colormap="inferno", contrast_limits=(0.0, 1.0),
                opacity=0.5, blending="translucent", visible=False,
                metadata={META_KEY: {"role": SERIES_ROLE, "series_of": name}},
            )
        else:
            layer.data = top
            layer.contrast_limits = (0.0, 1.0)

    # ---- reading what the person did ---------------------------------------------------------
    def labels(self) -> np.ndarray:
        """A copy of the labels on screen now (the layer may be painted while saving)."""
        if self.labels_layer is None:
            raise RuntimeError("no series image is shown")
        return np.array(self.labels_layer.data, copy=True)

    def changed(self, labels: Optional[np.ndarray] = None) -> bool:
        """True when the labels differ from what was put on screen."""
        if self.current is None:
            return False
        labels = self.labels() if labels is None else labels
        return labels.shape != self.current.shown.shape or bool(
            np.any(labels != self.current.shown)
        )

    def edited(self, labels: Optional[np.ndarray] = None) -> np.ndarray:
        """The pixels a person set: those differing from the model's prediction (the record on the
        layer, :func:`.edits.edited_plane`), plus, for an image shown from the dataset, the
        pixels it already had as edited."""
        labels = self.labels() if labels is None else labels
        record = RunRecord.from_metadata(self.labels_layer.metadata)
        predicted = record.predicted if record is not None else {}
        mask = edited_plane(labels, _KEY, predicted)
        current = self.current
        if current is not None and not current.predicted and current.saved_edited is not None:
            before = np.asarray(current.saved_edited, dtype=bool)
            if before.shape == mask.shape:
                mask = mask | before
        return mask

    # ---- leaving ------------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove the series' layers from the viewer (those the person has not removed)."""
        for layer in (self.labels_layer, self.confidence_layer, self.image_layer):
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.image_layer = self.confidence_layer = self.labels_layer = None
        self.current = None


def is_series_layer(layer: Any) -> bool:
    """True for the series' image or confidence layer."""
    return plugin_metadata(getattr(layer, "metadata", None)).get("role") == SERIES_ROLE


def _contrast_limits(image: np.ndarray) -> Optional[tuple[float, float]]:
    """Display range for a gray or 16-bit image (its own min..max; RGB uint8 needs none)."""
    if image.dtype == np.uint8 and image.ndim == 3:
        return None
    if image.size == 0:
        return None
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    if not np.isfinite(lo) or not np.isfinite(hi):
        return None
    return (lo, hi if hi > lo else lo + 1.0)
