"""The widgets of the Export, Train and Series menu entries: they open that page of the plugin's one dock
(see :mod:`.docks`) and remove the empty dock napari made for them."""

from __future__ import annotations

from typing import Any, Optional

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QDockWidget, QLabel, QVBoxLayout, QWidget

from .docks import PAGE_EXPORT, PAGE_SEGMENT, PAGE_SERIES, PAGE_TRAIN, main_panel
from .segment_panel import MaskClipWidget

__all__ = ["ExportPageOpener", "PageOpener", "SeriesPageOpener", "TrainPageOpener"]


class PageOpener(QWidget):
    """The widget of a menu entry that stands for a page of the MaskCLIP dock: opens that page
    and removes its own (empty) dock. :attr:`main` is the MaskCLIP widget, :attr:`panel` the page.
    """

    page = PAGE_SEGMENT

    def __init__(self, napari_viewer: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        QVBoxLayout(self).addWidget(QLabel(f"Opening the MaskCLIP {self.page} page..."))
        self.main = main_panel(napari_viewer, MaskClipWidget)
        self.panel = self.main.show_page(self.page)
        QTimer.singleShot(0, self._close_own_dock)

    def _close_own_dock(self) -> None:
        dock = self.parentWidget()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
        if dock is not None:
            self.viewer.window.remove_dock_widget(dock)
        self.main.show_page(self.page)  # napari may have raised the opener's dock meanwhile


class ExportPageOpener(PageOpener):
    """Plugins > MaskCLIP > Export labels to a dataset: the Export page of the MaskCLIP dock."""

    page = PAGE_EXPORT


class TrainPageOpener(PageOpener):
    """Plugins > MaskCLIP > Train MaskCLIP+ student: the Train page of the MaskCLIP dock."""

    page = PAGE_TRAIN


class SeriesPageOpener(PageOpener):
    """Plugins > MaskCLIP > Annotate a folder: the Series page of the MaskCLIP dock."""

    page = PAGE_SERIES
