"""The instance layer in napari (Layers > Segment > Show instances...) and COCO from the Export
panel."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_maskclip.plugin._qt.export_panel import COCO_FILE, ExportWidget

from test_gui_export import export_and_wait
from test_instance_layer import FEATURES, two_class_plane
from test_widget import _config_dir, notifications  # noqa: F401  (fixtures)


def _execute(command: str) -> None:
    """Run an npe2 command the way napari's menu does (app-model injects the viewer)."""
    from napari._app_model import get_app_model

    get_app_model().commands.execute_command(command).result()


def test_menu_command_adds_an_instance_layer(make_napari_viewer, notifications):
    viewer = make_napari_viewer()
    stack = np.stack([two_class_plane(), np.zeros((8, 10), np.uint8), two_class_plane()])
    labels = viewer.add_labels(stack, name="seg", features=FEATURES, scale=(2, 0.5, 0.5),
                               translate=(1, 10, 20))
    viewer.dims.set_point(0, 1 + 2 * 2)  # world z of slice 2
    _execute("napari-maskclip.show_instances_slice")
    inst = viewer.layers["seg [instances]"]
    assert inst.data.shape == stack.shape and not inst.data[:2].any() and inst.data[2].max() == 4
    np.testing.assert_allclose(inst.scale, labels.scale)
    np.testing.assert_allclose(inst.translate, labels.translate)
    # Hovering an instance shows its class: the features row of the label value.
    assert list(inst.features["class"]) == ["background", "cat", "dog", "cat", "cat"]
    value = inst.get_value(inst.data_to_world((2, 1, 7)), world=True)
    assert value == 2 and "dog" in inst.get_status(inst.data_to_world((2, 1, 7)),
                                                 world=True)["coordinates"]
    # The whole stack, into the same layer (no pile of copies), then a non-Labels selection.
    viewer.layers.selection.active = labels
    _execute("napari-maskclip.show_instances")
    assert len([layer for layer in viewer.layers if layer.name.startswith("seg [inst")]) == 1
    assert inst.data[0].max() > 0 and inst.data[1].max() == 0 and inst.data.max() == 8
    viewer.add_image(np.zeros((3, 8, 10)), name="img")
    _execute("napari-maskclip.show_instances")
    assert any("Select a Labels layer" in str(n.message) for n in notifications)


@pytest.fixture
def panel_with_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8), name="photo", rgb=True)
    # What a run leaves on its layer (the classes and its image), as a script would set it.
    record = {"role": "labels", "class_names": ["cat", "dog"], "source_name": "photo"}
    viewer.add_labels(two_class_plane(), name="photo [maskclip]", features=FEATURES,
                      metadata={"napari_maskclip": record})
    panel = ExportWidget(viewer)
    viewer.window.add_dock_widget(panel)
    return viewer, panel


def test_export_panel_also_writes_coco(panel_with_labels, qtbot, tmp_path):
    from pycocotools import mask as mask_utils

    viewer, panel = panel_with_labels
    panel.folder.setText(str(tmp_path / "ds"))
    panel.write_coco.setChecked(True)
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    coco = json.loads((tmp_path / "ds" / COCO_FILE).read_text())
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert len(coco["images"]) == 1 and len(coco["annotations"]) == 4
    painted = np.zeros((8, 10), np.uint8)
    for ann in coco["annotations"]:
        painted[mask_utils.decode(ann["segmentation"]).astype(bool)] = ann["category_id"]
    np.testing.assert_array_equal(painted, two_class_plane())
    assert panel.last_coco_report.annotations == 4 and "COCO" in panel.status.text()
    # A second export (refused: the sample exists) writes no COCO file either.
    (tmp_path / "ds" / COCO_FILE).unlink()
    assert export_and_wait(qtbot, panel) == "error"
    assert not (tmp_path / "ds" / COCO_FILE).exists()
    # A file of someone else's in the way: refused before anything is written.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / COCO_FILE).write_text("{}")
    panel.folder.setText(str(tmp_path / "other"))
    assert export_and_wait(qtbot, panel) == "error" and "not written by" in panel.status.text()
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [COCO_FILE]


def test_export_without_coco_writes_none(panel_with_labels, qtbot, tmp_path):
    viewer, panel = panel_with_labels
    panel.folder.setText(str(tmp_path / "ds"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    assert not (tmp_path / "ds" / COCO_FILE).exists() and panel.last_coco_report is None


def test_export_panel_instances_button(panel_with_labels, qtbot):
    from qtpy.QtCore import Qt

    viewer, panel = panel_with_labels
    assert panel.current_layer().name == "photo [maskclip]"
    qtbot.mouseClick(panel.instances_button, Qt.MouseButton.LeftButton)
    inst = viewer.layers["photo [maskclip] [instances]"]
    assert inst.data.max() == 4 and list(inst.features["class"])[1:] == ["cat", "dog", "cat", "cat"]
    # The instance layer is no class layer: selecting it explains why it cannot be exported.
    panel.select(inst)
    assert "does not say which class" in panel.info.text()
