"""The dock's class row: the run's one confidence layer shows the class picked (in the dock or in
the Labels layer), and a colour set there sticks across runs, layers and exports.

The model is the tiny random ViT (``tiny_vit_files``), as in ``test_widget.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

import open_clip  # noqa: F401  (Triton before any canvas: see plugin/models.py _import_engine)

from napari_maskclip.colors import remembered_colors
from napari_maskclip.export import read_dataset
from napari_maskclip.plugin.records import ConfidenceRecord

from test_gui_export import export_and_wait
from test_widget import (  # noqa: F401  (fixtures: the config dir, the widget, notifications)
    RGB, _config_dir, make_widget, notifications, run_and_wait,
)

RED = (1.0, 0.0, 0.0)


def _class_color(ds_path, name):
    classes = read_dataset(ds_path).classes
    return tuple(classes.colors[1 + classes.names.index(name)][:3])


def test_one_confidence_layer_follows_the_class_picked(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog, sofa")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    assert [layer.name for layer in viewer.layers] == [
        "img", "img [maskclip] confidence", "img [maskclip]"]
    labels, conf = viewer.layers["img [maskclip]"], viewer.layers["img [maskclip] confidence"]
    maps = ConfidenceRecord.from_metadata(conf.metadata).maps
    view = widget.class_view
    assert view.labels_layer is labels and view.class_names() == ["cat", "dog", "sofa"]
    assert view.isVisibleTo(widget) and view.color_button.isEnabled()
    # Picking in the dock shows that map and picks that label for painting.
    view.combo.setCurrentIndex(2)
    view.combo.activated.emit(2)
    np.testing.assert_array_equal(conf.data, maps[2])
    assert labels.selected_label == 3
    # Picking a label in the Labels layer updates the map and the dock.
    labels.selected_label = 2
    np.testing.assert_array_equal(conf.data, maps[1])
    assert view.combo.currentText() == "dog"
    # Deleting the Labels layer takes the confidence layer with it, and empties the row.
    viewer.layers.remove(labels)
    assert [layer.name for layer in viewer.layers] == ["img"]
    assert view.labels_layer is None and not view.color_button.isEnabled()


def test_a_colour_set_in_the_dock_sticks(make_widget, qtbot, tmp_path):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    first = viewer.layers["img [maskclip]"]
    # A dataset exported before the change keeps the colour it stored.
    panel = widget.open_export()
    panel.folder.setText(str(tmp_path / "old"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    old_dog = _class_color(tmp_path / "old", "dog")
    assert old_dog != pytest.approx(RED)
    widget.show_page("Segment")

    first.paint((5, 5), 1)  # an edit: the next run goes to a new layer
    view = widget.class_view
    view.combo.setCurrentIndex(1)
    view.combo.activated.emit(1)
    assert view.set_color("dog", RED)
    # Now: the layer, the shown confidence map and the dock's swatch.
    np.testing.assert_allclose(first.colormap.color_dict[2][:3], RED)
    conf = viewer.layers["img [maskclip] confidence"]
    np.testing.assert_allclose(conf.colormap.colors[-1][:3], RED)
    swatch = view.combo.itemIcon(1).pixmap(12, 12).toImage().pixelColor(6, 6)
    assert (swatch.red(), swatch.green(), swatch.blue()) == (255, 0, 0)
    # Remembered (for other processes too) ...
    assert remembered_colors()["dog"] == ((1.0, 0.0, 0.0, 1.0), True)
    # ... so a later run with another list still draws dog red, in its new layer.
    widget.classes.text.setPlainText("dog, sofa")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    second = widget.last_report.labels_layer
    assert second is not first
    np.testing.assert_allclose(second.colormap.color_dict[1][:3], RED)
    # A new dataset stores red; the old dataset's own colour still wins inside it.
    panel = widget.open_export()
    panel.select(second)
    assert panel.current_layer() is second
    panel.folder.setText(str(tmp_path / "new"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    assert _class_color(tmp_path / "new", "dog") == pytest.approx(RED)
    panel.select(first)  # now drawn with red dog, same classes as the old dataset
    panel.folder.setText(str(tmp_path / "old"))
    panel.name.setText("img_again")
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    assert _class_color(tmp_path / "old", "dog") == pytest.approx(old_dog)
