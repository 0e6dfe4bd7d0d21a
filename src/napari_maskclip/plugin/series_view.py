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

While a series is open its layers are shown **on their own**: the layers the viewer held before
are hidden (not removed, not changed) when the first image goes on screen, and shown again when
the series closes (those the person removed meanwhile are gone; one shown again meanwhile stays
shown). The view is fitted to the image when the first one opens and whenever the next one has
another size (an image of the same size keeps the person's zoom).

Public napari API only.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np

from ..stacks import slice_key
from .edits import edited_plane, record_planes
from .layers import result_layer_data
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
        self._class_names: list[str] = []
        self._top: Optional[np.ndarray] = None  # the confidence map, set on the layer when shown
        #: The other layers this view hid (by ``unique_id``), shown again by :meth:`clear`.
        self._hidden: list[Any] = []
        self._fitted_shape: Optional[tuple[int, ...]] = None  # the image size the view fits

    def _present(self, layer: Any) -> bool:
        """Whether ``layer`` is still in the viewer (by ``unique_id``: napari may hand plugins
        proxies of its objects, which are not the same Python objects)."""
        if layer is None:
            return False
        uid = layer.unique_id
        return any(item.unique_id == uid for item in self.viewer.layers)

    def _remove(self, layer: Any) -> None:
        uid = layer.unique_id
        for item in list(self.viewer.layers):
            if item.unique_id == uid:
                self.viewer.layers.remove(item)

    # ---- showing ---------------------------------------------------------------------------
    def show(
        self,
        shown: ShownImage,
        *,
        class_names: Sequence[str],
        colors: Sequence[Sequence[float]],
        source_path: Optional[str] = None,
        labels: Optional[np.ndarray] = None,
    ) -> Any:
        """Put ``shown`` into the viewer (layers reused); returns the Labels layer. ``labels``:
        what the layer holds if not ``shown.shown`` (a person's labels that failed to save);
        edits are still counted against ``shown.shown``."""
        image = np.asarray(shown.image)
        reference = np.asarray(shown.shown)
        labels = np.array(reference if labels is None else labels, copy=True)  # the layer's own
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
        if self.current is None:
            self._hide_others()
        self._show_image(image, rgb, shown.name)
        self._show_confidence(shown.probabilities, shown.name)
        record = RunRecord(
            class_names=list(class_names), source_name=shown.name, source_path=source_path,
            labelled_by="series", run_id=None,
            fingerprints={}, predicted=record_planes(reference, [()]),
            extra={"series_index": shown.index, "series_predicted": shown.predicted},
        )
        result = SimpleNamespace(
            labels=labels, probabilities=[], class_names=list(class_names), colors=list(colors),
            class_pixel_counts=lambda: [0] * len(class_names),
        )
        (_, kwargs, _), = result_layer_data(result, source_name=shown.name, record=record)
        layer = self.labels_layer
        if not self._present(layer):
            layer = self.viewer.add_labels(labels, **kwargs)
            self.labels_layer = layer
        else:
            if list(class_names) != self._class_names:  # colours and names change only then
                layer.colormap = kwargs["colormap"]
                layer.features = kwargs["features"]
            layer.metadata = kwargs["metadata"]
            layer.name = kwargs["name"]
            layer.data = labels  # a new array: napari's undo history starts afresh
        self._class_names = list(class_names)
        if self.viewer.layers.selection.active is None or (
            self.viewer.layers.selection.active.unique_id != layer.unique_id
        ):
            self.viewer.layers.selection.active = layer
        if layer.mode == "pan_zoom":
            layer.mode = "paint"
        self.current = shown
        self._fit(image.shape[:2])
        return layer

    def _hide_others(self) -> None:
        """Hide every visible layer that is not the series' (remembered for :meth:`clear`)."""
        ours = {layer.unique_id for layer in (self.image_layer, self.confidence_layer,
                                              self.labels_layer) if layer is not None}
        for layer in list(self.viewer.layers):
            if layer.unique_id not in ours and layer.visible:
                layer.visible = False
                self._hidden.append(layer.unique_id)

    def _show_others(self) -> None:
        hidden, self._hidden = set(self._hidden), []
        for layer in list(self.viewer.layers):
            if layer.unique_id in hidden and not layer.visible:
                layer.visible = True

    def _fit(self, shape: tuple[int, ...]) -> None:
        """Fit the view to the image when it is the first or of another size."""
        if shape != self._fitted_shape and self._present(self.image_layer):
            self._fitted_shape = tuple(shape)
            self.viewer.reset_view(layers=[self._item(self.image_layer)])

    def _item(self, layer: Any) -> Any:
        """The viewer's own object for ``layer`` (see :meth:`_present`)."""
        uid = layer.unique_id
        return next(item for item in self.viewer.layers if item.unique_id == uid)

    def _show_image(self, image: np.ndarray, rgb: bool, name: str) -> None:
        layer = self.image_layer
        reuse = (
            self._present(layer) and bool(layer.rgb) == rgb
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
            if self._present(layer):
                self._remove(layer)
            kwargs: dict[str, Any] = {"name": name, "rgb": rgb,
                                      "metadata": {META_KEY: {"role": SERIES_ROLE}}}
            if limits is not None:
                kwargs["contrast_limits"] = limits
            self.image_layer = self.viewer.add_image(image, **kwargs)
            self._put_below_series_layers()

    def _put_below_series_layers(self) -> None:
        """A re-made image layer goes just below the series' confidence and labels layers (an
        image added first is there already)."""
        layers = self.viewer.layers
        ids = [item.unique_id for item in layers]
        others = [ids.index(layer.unique_id) for layer in (self.confidence_layer, self.labels_layer)
                  if self._present(layer)]
        if others:
            layers.move(ids.index(self.image_layer.unique_id), min(others))

    def _show_confidence(self, probabilities: Optional[np.ndarray], name: str) -> None:
        layer = self.confidence_layer
        if probabilities is None or len(probabilities) == 0:  # saved labels: no map
            self._top = np.zeros((1, 1), dtype=np.float32) if self._present(layer) else None
            if self._present(layer) and layer.visible:
                layer.visible = False
            return
        top = np.asarray(probabilities, dtype=np.float32).max(axis=0)
        if not self._present(layer):
            self.confidence_layer = layer = self.viewer.add_image(
                top, name=_CONFIDENCE_NAME, colormap="inferno", contrast_limits=(0.0, 1.0),
                opacity=0.5, blending="translucent", visible=False,
                metadata={META_KEY: {"role": SERIES_ROLE}},
            )
            layer.events.visible.connect(self._fill_confidence)
            self._top = None
        elif layer.visible:
            layer.data = top
            layer.contrast_limits = (0.0, 1.0)
            self._top = None
        else:
            self._top = top  # a hidden layer gets its data when shown (Next stays fast)

    def _fill_confidence(self, event: Any = None) -> None:
        layer = self.confidence_layer
        if self._top is not None and layer is not None and layer.visible:
            top, self._top = self._top, None
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
        """Remove the series' layers from the viewer (those the person has not removed) and show
        the layers the series hid again."""
        for layer in (self.labels_layer, self.confidence_layer, self.image_layer):
            if self._present(layer):
                self._remove(layer)
        self.image_layer = self.confidence_layer = self.labels_layer = None
        self.current = None
        self._class_names, self._top = [], None
        self._fitted_shape = None
        self._show_others()


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
