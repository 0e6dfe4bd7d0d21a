"""The plugin's dock widgets as napari knows them, and how one panel opens another.

The names are the ``display_name`` of the widgets in ``napari.yaml``. A panel opens another
through napari (``add_plugin_dock_widget``: the one already open, else a new one); when the
plugin is not registered with npe2 (run from a source tree without an install), it falls back to
a plain dock made from ``factory`` and remembered in ``opened``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["EXPORT_NAME", "PLUGIN", "SEGMENT_NAME", "TRAIN_NAME", "show_panel"]

PLUGIN = "napari-maskclip"
SEGMENT_NAME = "MaskCLIP segmentation"
EXPORT_NAME = "Export labels to a dataset"
TRAIN_NAME = "Train MaskCLIP+ student"


def show_panel(
    viewer: Any,
    name: str,
    factory: Optional[Callable[[Any], Any]] = None,
    opened: Optional[dict[str, Any]] = None,
) -> Any:
    """The plugin's panel ``name`` in ``viewer``, docked, shown and raised.

    Raises what napari raises when the plugin is not registered and no ``factory`` is given.
    """
    try:
        dock, panel = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    except Exception:  # noqa: BLE001 - plugin not registered with npe2 (e.g. run from source)
        if factory is None:
            raise
        opened = {} if opened is None else opened
        panel = opened.get(name)
        if panel is None:
            panel = opened[name] = factory(viewer)
            dock = viewer.window.add_dock_widget(panel, name=name, area="right")
        else:
            dock = panel.parent()
    if dock is not None:
        dock.show()
        dock.raise_()
    return panel
