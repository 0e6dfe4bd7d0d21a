"""Export from the widget: a run, brush edits through the public Labels API, then the Export panel
(and napari's Save) write samples whose ``edited`` mask is exactly the painted pixels.

The model is the tiny random ViT (``tiny_vit_files``), as in ``test_widget.py``; exports run in
napari workers, waited for through the panel's ``export_finished`` signal.
"""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

import open_clip  # noqa: F401  (Triton before any canvas: see plugin/models.py _import_engine)

from napari_maskclip.plugin._qt.export_panel import SLICE_CURRENT, ExportWidget
from napari_maskclip.export import read_dataset
from napari_maskclip.plugin.records import ConfidenceRecord

from test_widget import (  # noqa: F401  (fixtures: the config dir, the widget, notifications)
    RGB, STACK, _config_dir, make_widget, notifications, run_and_wait,
)

from hang_guard import HANG_GUARD_MS as TIMEOUT_MS  # noqa: E402  (a hang guard, not a duration)


def export_and_wait(qtbot, panel: ExportWidget) -> str:
    with qtbot.waitSignal(panel.export_finished, timeout=TIMEOUT_MS) as blocker:
        panel.export()
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    return blocker.args[0]


def paint_edits(layer) -> np.ndarray:
    """Brush strokes and a fill through napari's public API; returns the pixels that changed."""
    before = layer.data.copy()
    layer.brush_size = 5
    layer.paint((10, 10), 2)
    layer.paint((30, 40), 1)
    layer.data_setitem((np.array([0, 0, 1]), np.array([0, 1, 0])), 2)
    # A stroke that repaints pixels with the label MaskCLIP gave them changes nothing: unedited.
    y, x = 40, 20
    layer.paint((y, x), int(before[y, x]))
    changed = layer.data != before
    assert changed.any() and not changed.all()
    return changed


@pytest.fixture
def exported(make_widget, qtbot, tmp_path):
    """(viewer, widget, panel, painted mask) after a 2D run, edits and an export to tmp/ds."""
    viewer, widget = make_widget((RGB, {"name": "photo", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["photo [maskclip]"]
    painted = paint_edits(labels)
    panel = widget.open_export()
    assert panel.current_layer() is labels and panel.name.text() == "photo"
    panel.folder.setText(str(tmp_path / "ds"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    return viewer, widget, panel, painted


def test_export_records_exactly_the_painted_pixels(exported, tmp_path, tiny_vit_files):
    viewer, widget, panel, painted = exported
    labels = viewer.layers["photo [maskclip]"]
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == ["background", "cat", "dog"]
    sample = ds["photo"]
    np.testing.assert_array_equal(sample.read_mask(), labels.data)
    np.testing.assert_array_equal(sample.read_edited(), painted)
    np.testing.assert_array_equal(sample.read_image(), RGB)
    confidence = sample.read_confidence()
    conf = viewer.layers["photo [maskclip] confidence"]
    maps = ConfidenceRecord.from_metadata(conf.metadata).maps
    np.testing.assert_allclose(confidence, maps, atol=1e-3)  # every class, not just the shown one
    assert conf.data.shape == maps.shape[1:]
    assert sample.info["pixels"]["edited"] == int(painted.sum())
    # The model as chosen (loadable again as a student's teacher), not just the config's name.
    assert sample.provenance["model"] == str(tiny_vit_files[0])
    assert sample.provenance["pretrained"] == str(tiny_vit_files[1])
    assert sample.provenance["settings"]["model"] == str(tiny_vit_files[0])
    assert "1 sample(s)" in panel.status.text()


def test_second_export_without_overwrite_is_refused(exported, qtbot, tmp_path, notifications):
    viewer, widget, panel, _ = exported
    index = (tmp_path / "ds" / "dataset.json").read_text()
    files = sorted(p.name for p in (tmp_path / "ds").rglob("*"))
    viewer.layers["photo [maskclip]"].paint((5, 50), 1)
    assert export_and_wait(qtbot, panel) == "error"
    assert any("already has sample" in str(n.message) for n in notifications)
    assert (tmp_path / "ds" / "dataset.json").read_text() == index
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*")) == files
    panel.overwrite.setChecked(True)
    assert export_and_wait(qtbot, panel) == "done"
    np.testing.assert_array_equal(read_dataset(tmp_path / "ds")["photo"].read_mask(),
                                  viewer.layers["photo [maskclip]"].data)


def test_other_classes_are_refused_then_remapped(exported, qtbot, tmp_path, notifications):
    viewer, widget, panel, _ = exported
    widget.classes.text.setPlainText("dog, cat")  # edited layer: the result goes to a new layer
    assert run_and_wait(qtbot, widget) == "done"
    swapped = widget.last_report.labels_layer
    assert swapped.name == "photo [maskclip] (2)"
    panel.select(swapped)
    panel.name.setText("photo2")
    assert export_and_wait(qtbot, panel) == "error"
    assert any("remap" in str(n.message).lower() for n in notifications)
    assert read_dataset(tmp_path / "ds").names == ["photo"]

    panel.remap.setChecked(True)
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == ["background", "cat", "dog"]
    expected = np.choose(swapped.data, [0, 2, 1])  # dog (1) -> 2, cat (2) -> 1
    np.testing.assert_array_equal(ds["photo2"].read_mask(), expected)


def test_napari_save_records_the_same_edited_mask(exported, tmp_path):
    viewer, widget, panel, painted = exported
    labels = viewer.layers["photo [maskclip]"]
    viewer.layers.selection = {labels}
    assert viewer.layers.save(str(tmp_path / "saved"), selected=True, plugin="napari-maskclip")
    sample = read_dataset(tmp_path / "saved")["photo"]
    np.testing.assert_array_equal(sample.read_edited(), painted)
    np.testing.assert_array_equal(sample.read_mask(), labels.data)
    np.testing.assert_array_equal(sample.read_image(), RGB)


def test_duplicated_layer_keeps_its_edit_record(exported, qtbot, tmp_path):
    """napari's Duplicate Layer copies the state: the copy still knows what MaskCLIP wrote."""
    from napari.layers import Layer

    viewer, widget, panel, painted = exported
    labels = viewer.layers["photo [maskclip]"]
    data, state, kind = labels.as_layer_data_tuple()  # what Duplicate Layer does
    copy = viewer.add_layer(Layer.create(data.copy(), {**state, "name": "photo copy"}, kind))
    before = copy.data.copy()
    copy.brush_size = 3
    copy.paint((44, 6), 1 if before[44, 6] != 1 else 2)
    expected = painted | (copy.data != before)
    assert expected.sum() > painted.sum()
    panel.select(copy)
    panel.name.setText("copy")
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    ds = read_dataset(tmp_path / "ds")
    np.testing.assert_array_equal(ds["copy"].read_edited(), expected)
    np.testing.assert_array_equal(ds["photo"].read_edited(), painted)


def test_stack_exports_one_sample_per_slice(make_widget, qtbot, tmp_path):
    viewer, widget = make_widget((STACK, {"name": "vol", "scale": (2, 1, 1)}))
    widget.image.slices.setCurrentText("all slices")
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["vol [maskclip]"]
    before = labels.data.copy()
    labels.brush_size = 3
    labels.paint((1, 20, 20), 2)
    changed = labels.data != before
    assert changed[1].any() and not changed[0].any() and not changed[2].any()

    panel = widget.open_export()
    panel.folder.setText(str(tmp_path / "ds"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    ds = read_dataset(tmp_path / "ds")
    assert ds.names == ["vol_z0000", "vol_z0001", "vol_z0002"]
    for z in range(3):
        sample = ds[f"vol_z{z:04d}"]
        np.testing.assert_array_equal(sample.read_mask(), labels.data[z])
        np.testing.assert_array_equal(sample.read_edited(), changed[z])
        np.testing.assert_array_equal(sample.read_image(), STACK[z])
        assert sample.info["source"]["index"] == [z]

    viewer.dims.set_current_step(0, 2)
    panel.slices.setCurrentText(SLICE_CURRENT)
    panel.folder.setText(str(tmp_path / "one"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    assert read_dataset(tmp_path / "one").names == ["vol_z0002"]


def test_cancel_keeps_the_slices_already_exported(make_widget, qtbot, tmp_path):
    viewer, widget = make_widget((STACK, {"name": "vol"}))
    widget.image.slices.setCurrentText("all slices")
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    panel = widget.open_export()
    panel.folder.setText(str(tmp_path / "ds"))

    with qtbot.waitSignal(panel.export_finished, timeout=TIMEOUT_MS) as blocker:
        worker = panel.export()

        def on_step(step):  # in the worker thread: stop right after the first sample
            if step.stage == "export" and step.done >= 1:
                panel.runner.request_cancel()  # what Cancel does, safe from any thread
        worker.yielded.connect(on_step, Qt.DirectConnection)
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    assert blocker.args[0] == "cancelled"
    assert "samples written so far are complete" in panel.status.text()
    ds = read_dataset(tmp_path / "ds")
    assert ds.names == ["vol_z0000"]
    labels = viewer.layers["vol [maskclip]"]
    np.testing.assert_array_equal(ds["vol_z0000"].read_mask(), labels.data[0])


def test_channel_stack_exports_the_channels_maskclip_saw(make_widget, qtbot, tmp_path):
    """Z x C x Y x X with channels 0, 2, 3 picked: one 3-channel sample per z."""
    cells = (np.random.default_rng(1).random((2, 4, 40, 48)) * 4000).astype(np.uint16)
    viewer, widget = make_widget((cells, {"name": "cells"}))
    widget.image.channel_axis.setCurrentText("1")
    widget.image.channels.setText("0,2,3")
    widget.image.slices.setCurrentText("all slices")
    widget.classes.text.setPlainText("nucleus, membrane")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["cells [maskclip]"]
    assert labels.data.shape == (2, 1, 40, 48)
    panel = widget.open_export()
    panel.folder.setText(str(tmp_path / "ds"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    ds = read_dataset(tmp_path / "ds")
    assert ds.names == ["cells_z0000", "cells_z0001"]
    for z in range(2):
        sample = ds[f"cells_z{z:04d}"]
        np.testing.assert_array_equal(sample.read_image(), np.moveaxis(cells[z, [0, 2, 3]], 0, -1))
        np.testing.assert_array_equal(sample.read_mask(), labels.data[z, 0])
        assert not sample.read_edited().any()
        assert sample.read_confidence().shape == (2, 40, 48)


def test_bad_input_is_a_notification(make_widget, qtbot, notifications, tmp_path):
    viewer, widget = make_widget((RGB, {"name": "photo", "rgb": True}))
    panel = widget.open_export()
    assert export_and_wait(qtbot, panel) == "error"  # no Labels layer yet
    assert any("No Labels layer" in str(n.message) for n in notifications)
    widget.classes.text.setPlainText("cat")
    assert run_and_wait(qtbot, widget) == "done"
    panel.folder.setText("")
    assert export_and_wait(qtbot, panel) == "error"
    assert any("Choose a dataset folder" in str(n.message) for n in notifications)
    (tmp_path / "notes.txt").write_text("not a dataset")
    panel.folder.setText(str(tmp_path))
    assert export_and_wait(qtbot, panel) == "error"
    assert any("not a dataset" in str(n.message) for n in notifications)
    assert not (tmp_path / "dataset.json").exists()


def test_export_summary_follows_a_rerun_in_place(make_widget, qtbot, tmp_path):
    """Issue 20: after a re-run into the same Labels layer the Export page says what the export
    writes now (the new classes, their confidence maps), not what the first run had."""
    viewer, widget = make_widget((RGB, {"name": "photo", "rgb": True}))
    first = ", ".join(f"thing {k}" for k in range(12))
    widget.classes.text.setPlainText(first)
    widget.settings.confidence_maps.setChecked(False)
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    panel = widget.open_export()
    labels = panel.current_layer()
    assert "thing 11" in panel.info.text() and "no confidence saved" in panel.info.text()
    panel.name.setText("my_sample")  # what the user typed stays
    widget.show_page("Segment")
    widget.classes.text.setPlainText("cat, dog, sky")
    widget.settings.confidence_maps.setChecked(True)
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    assert viewer.layers["photo [maskclip]"] is labels  # re-run in place: the same layer
    widget.pages.setCurrentWidget(panel)  # the Export tab
    qtbot.waitUntil(lambda: "classes: cat, dog, sky" in panel.info.text(), timeout=10_000)
    assert "thing" not in panel.info.text() and "no confidence" not in panel.info.text()
    assert panel.name.text() == "my_sample"
    panel.folder.setText(str(tmp_path / "ds"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == ["background", "cat", "dog", "sky"]
    assert ds["my_sample"].read_confidence().shape[0] == 3
