"""The "class" row under Run: which class's confidence the run's layer shows, and its colour.

A run makes one confidence layer (see :mod:`..layers`); this row picks the class it shows (the
same as picking that label in the Labels layer, and it follows when the user picks a label there)
and lets the user give a class another colour. A colour set here is remembered
(:func:`napari_maskclip.colors.set_class_color`): every Labels layer in the viewer that has the
class is recoloured now, and later runs, layers and new datasets use it (a dataset's own
``classes.json`` colours still win inside that dataset).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QColorDialog, QComboBox, QHBoxLayout, QLabel, QPushButton, QWidget

from ...colors import set_class_color
from ...errors import MaskClipError
from ..layers import confidence_layer_of, recolor_class, show_confidence
from ..notify import show_exception
from ..records import LABELS, RunRecord
from .controls import fit_combo

__all__ = ["ClassView"]


def _swatch(color: Sequence[float]) -> QIcon:
    pixmap = QPixmap(12, 12)
    pixmap.fill(QColor.fromRgbF(*(float(c) for c in color[:3])))
    return QIcon(pixmap)


class ClassView(QWidget):
    """Class picker (shown confidence map + painting label) and a colour button, for the run's
    Labels layer the user works on (the last run's, or the Labels layer selected)."""

    def __init__(self, viewer: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.labels_layer: Any = None
        self.combo = QComboBox()
        self.combo.setToolTip(
            "The class whose confidence map is shown (0 = unsure, opaque = sure); it is also the "
            "label you paint with. Picking a label in the Labels layer picks it here too."
        )
        fit_combo(self.combo)
        self.color_button = QPushButton("Colour...")
        self.color_button.setToolTip(
            "Give this class another colour: kept for later runs, layers and new datasets."
        )
        caption = QLabel("class")
        caption.setToolTip(self.combo.toolTip())
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(caption)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.color_button)
        self.combo.activated.connect(self._on_picked)
        self.color_button.clicked.connect(self._ask_color)
        self.viewer.layers.selection.events.active.connect(self._on_active)
        self.viewer.layers.events.removed.connect(self._on_removed)
        self.attach(None)

    # ---- which Labels layer -----------------------------------------------------------------
    def attach(self, labels_layer: Any) -> None:
        """Follow ``labels_layer`` (a run's Labels layer), or nothing with None."""
        if self.labels_layer is not None:
            self.labels_layer.events.selected_label.disconnect(self._sync)
        record = RunRecord.from_metadata(getattr(labels_layer, "metadata", None))
        if record is None or record.role != LABELS or not record.class_names:
            labels_layer = None
        self.labels_layer = labels_layer
        if labels_layer is not None:
            labels_layer.events.selected_label.connect(self._sync)
        self._fill()

    def _on_active(self, event: Any = None) -> None:
        layer = self.viewer.layers.selection.active
        record = RunRecord.from_metadata(getattr(layer, "metadata", None))
        if record is not None and record.role == LABELS and layer is not self.labels_layer:
            self.attach(layer)

    def _on_removed(self, event: Any) -> None:
        if event.value is self.labels_layer:
            self.attach(None)

    def class_names(self) -> list[str]:
        record = RunRecord.from_metadata(getattr(self.labels_layer, "metadata", None))
        return list(record.class_names or []) if record is not None else []

    def _fill(self) -> None:
        self.combo.blockSignals(True)
        self.combo.clear()
        layer = self.labels_layer
        for k, name in enumerate(self.class_names(), start=1):
            color = layer.colormap.color_dict.get(k)
            self.combo.addItem(_swatch(color) if color is not None else QIcon(), name)
        self.combo.blockSignals(False)
        enabled = self.combo.count() > 0
        self.combo.setEnabled(enabled)
        self.color_button.setEnabled(enabled)
        if not enabled:
            self.combo.addItem("(run first)")
        self._sync()

    def _sync(self, event: Any = None) -> None:
        """Show the label picked in the Labels layer."""
        if self.labels_layer is None:
            return
        value = int(self.labels_layer.selected_label)
        if 1 <= value <= self.combo.count():
            self.combo.blockSignals(True)
            self.combo.setCurrentIndex(value - 1)
            self.combo.blockSignals(False)

    # ---- actions ----------------------------------------------------------------------------
    def current_class(self) -> Optional[str]:
        names = self.class_names()
        k = self.combo.currentIndex()
        return names[k] if 0 <= k < len(names) else None

    def show_class(self, name: str) -> None:
        """Show ``name``'s confidence (and pick its label for painting)."""
        if self.labels_layer is None or name not in self.class_names():
            return
        if confidence_layer_of(self.viewer.layers, self.labels_layer) is not None:
            show_confidence(self.viewer.layers, self.labels_layer, name)
        else:  # confidence maps were off: still pick the label
            self.labels_layer.selected_label = self.class_names().index(name) + 1
        self._sync()

    def _on_picked(self, index: int) -> None:
        name = self.current_class()
        if name is not None:
            self.show_class(name)

    def _ask_color(self) -> None:
        name = self.current_class()
        if name is None:
            return
        current = self.labels_layer.colormap.color_dict.get(self.combo.currentIndex() + 1)
        start = QColor.fromRgbF(*(float(c) for c in current[:3])) if current is not None else QColor()
        picked = QColorDialog.getColor(start, self, f"Colour of '{name}'")
        if picked.isValid():
            self.set_color(name, (picked.redF(), picked.greenF(), picked.blueF()))

    def set_color(self, name: str, color: Sequence[float]) -> bool:
        """Remember ``color`` for class ``name`` and recolour the layers that show it."""
        try:
            rgba = set_class_color(name, color)
        except MaskClipError as exc:
            show_exception(exc)
            return False
        recolor_class(self.viewer.layers, name, rgba)
        self._fill()
        return True

    def detach(self) -> None:
        """Stop following the viewer (the dock is closing)."""
        self.attach(None)
        self.viewer.layers.selection.events.active.disconnect(self._on_active)
        self.viewer.layers.events.removed.disconnect(self._on_removed)
