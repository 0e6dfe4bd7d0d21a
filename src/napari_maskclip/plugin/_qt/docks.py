"""The plugin's one dock, its pages, and how napari's menu entries open a page.

napari makes one dock per widget contribution (``napari.yaml``), named after its
``display_name``. The plugin has one dock, the MaskCLIP widget (:mod:`.segment_panel`), whose
pages (tabs) are Segment, Export, Train and Series. The Export, Train and Series menu entries are widget
contributions too (so they sit in the Plugins menu), but their widget is a page opener
(:mod:`.openers`): it opens the MaskCLIP dock through napari (``add_plugin_dock_widget``: the one already open, else
a new one), selects its page, and removes the empty dock napari made for the opener at the next
turn of the event loop. Without an npe2 registration (run from a source tree), a plain dock is
made and remembered in ``opened``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = [
    "EXPORT_NAME", "PAGES", "PAGE_EXPORT", "PAGE_SEGMENT", "PAGE_SERIES", "PAGE_TRAIN", "PLUGIN",
    "SEGMENT_NAME", "SERIES_NAME",
    "TRAIN_NAME", "main_panel", "show_panel",
]

PLUGIN = "napari-maskclip"
SEGMENT_NAME = "MaskCLIP segmentation"
EXPORT_NAME = "Export labels to a dataset"
TRAIN_NAME = "Train MaskCLIP+ student"
SERIES_NAME = "Annotate a folder"
PAGE_SEGMENT, PAGE_EXPORT, PAGE_TRAIN, PAGE_SERIES = PAGES = ("Segment", "Export", "Train", "Series")


def main_panel(
    viewer: Any, factory: Optional[Callable[[Any], Any]] = None,
    opened: Optional[dict[str, Any]] = None,
) -> Any:
    """The MaskCLIP widget of ``viewer``: the one docked, else a new dock.

    Raises what napari raises when the plugin is not registered and no ``factory`` is given.
    """
    try:
        _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT_NAME)
    except Exception:  # noqa: BLE001 - plugin not registered with npe2 (e.g. run from source)
        if factory is None:
            raise
        opened = {} if opened is None else opened
        panel = opened.get(SEGMENT_NAME)
        if panel is None:
            panel = opened[SEGMENT_NAME] = factory(viewer)
            viewer.window.add_dock_widget(panel, name=SEGMENT_NAME, area="right")
    return panel


def show_panel(
    viewer: Any,
    page: str = PAGE_SEGMENT,
    factory: Optional[Callable[[Any], Any]] = None,
    opened: Optional[dict[str, Any]] = None,
) -> Any:
    """The plugin's dock in ``viewer`` (opened if needed), shown and raised at page ``page``
    (one of :data:`PAGES`, or a widget's display name); returns that page's panel."""
    page = {SEGMENT_NAME: PAGE_SEGMENT, EXPORT_NAME: PAGE_EXPORT, TRAIN_NAME: PAGE_TRAIN,
            SERIES_NAME: PAGE_SERIES}.get(page, page)
    return main_panel(viewer, factory, opened).show_page(page)
