"""A trained MaskCLIP+ student as the widget's model: same layers as MaskCLIP, its own classes.

The student is a tiny one (``tiny`` backbone, a few iterations on synthetic shapes, random class
embeddings), trained once per module. Each run's labels are compared with the student called
directly on the same slice, so the widget path is checked, not just the shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import open_clip  # noqa: F401  (Triton before any canvas: see plugin/models.py _import_engine)

from napari_maskclip.classes import class_color
from napari_maskclip.student import StudentSegmenter, TrainSettings, train

from test_student_train import COLOURS, random_embeddings, shapes_data
from test_widget import (  # noqa: F401  (fixtures: the config dir, the widget, notifications)
    GRAY16, MULTI, RGB, STACK, _config_dir, make_widget, notifications, run_and_wait,
)

NAMES = list(COLOURS)  # red, green, blue


@pytest.fixture(scope="module")
def student_path(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("student") / "shapes.safetensors"
    settings = TrainSettings(iterations=4, batch_size=2, crop_size=32, backbone="tiny",
                             backbone_weights="random", val_fraction=0.0, val_interval=0,
                             save_interval=0)
    train(shapes_data(4, size=40), path, settings=settings, class_embeddings=random_embeddings(4),
          device="cpu")
    torch.set_num_threads(before)
    return path


def direct(student_path, plane, **kwargs):
    return StudentSegmenter(student_path, device="cpu")(plane, **kwargs)


def test_choosing_a_student_shows_its_classes_and_disables_maskclip_settings(make_widget,
                                                                             student_path):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    assert widget.use_student(str(student_path))
    assert widget.model.model.currentText() == "student: shapes.safetensors"
    assert widget.classes.classes_text() == "red, green, blue"
    assert not widget.classes.background.isEnabled()
    assert not widget.settings.mode.isEnabled() and not widget.settings.templates.isEnabled()
    assert widget.settings.confidence_maps.isEnabled()
    assert not widget.model.pretrained.isEnabled()
    assert "MaskCLIP+ student: tiny, 3 classes, 4 iterations" in widget.model.hint.text()
    choice = widget.model.choice()
    assert choice.is_student and choice.model == str(student_path.resolve())
    # Back to a CLIP model: the typed classes and the settings come back.
    widget.model.model.setCurrentText("ViT-B-16")
    assert widget.classes.classes_text() == "cat, dog"
    assert widget.settings.mode.isEnabled() and widget.classes.background.isEnabled()
    assert not widget.model.choice().is_student
    # Listed as "student: <name>" once used.
    items = [widget.model.model.itemText(i) for i in range(widget.model.model.count())]
    assert "student: shapes.safetensors" in items


@pytest.mark.parametrize(
    "data, kwargs, choices, shape",
    [
        (RGB, {"rgb": True, "scale": (2, 0.5), "translate": (3, 4)}, {}, (48, 56)),
        (GRAY16, {}, {}, (48, 56)),
        (MULTI, {"scale": (1, 0.5, 0.5)}, {"axis": "0", "channels": "0,2,4"}, (48, 56)),
        (STACK, {"scale": (3, 0.5, 0.5)}, {"slices": "all slices"}, (3, 48, 56)),
        (STACK, {}, {"slices": "current slice"}, (3, 48, 56)),
    ],
    ids=["rgb", "gray16", "multichannel", "stack-all", "stack-current"],
)
def test_student_gives_maskclip_shaped_layers(make_widget, qtbot, student_path, data, kwargs,
                                              choices, shape):
    viewer, widget = make_widget((data, {"name": "img", **kwargs}))
    if "axis" in choices:
        widget.image.channel_axis.setCurrentText(choices["axis"])
        widget.image.channels.setText(choices["channels"])
    if "slices" in choices:
        widget.image.slices.setCurrentText(choices["slices"])
        viewer.dims.set_current_step(0, 1)
    assert widget.use_student(str(student_path))
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    assert "predicted by the student" in widget.status.text()

    source = viewer.layers["img"]
    labels = viewer.layers["img [maskclip]"]
    assert labels.data.shape == shape and labels.data.dtype == np.uint8
    spatial = slice(-len(shape), None)
    np.testing.assert_allclose(labels.scale, source.scale[spatial])
    np.testing.assert_allclose(labels.translate, source.translate[spatial])
    assert labels.features["name"].tolist() == ["background", *NAMES]
    blue = labels.colormap.map(np.array([3]))[0, :3]
    assert blue == pytest.approx(class_color("blue")[:3], abs=0.01)
    from napari_maskclip.plugin.records import ConfidenceRecord

    conf = viewer.layers["img [maskclip] confidence"]
    assert conf.data.shape == shape and conf.data.dtype == np.float32
    np.testing.assert_allclose(conf.scale, source.scale[spatial])
    maps = ConfidenceRecord.from_metadata(conf.metadata).maps
    assert maps.shape == (len(NAMES), *shape)

    slices = {"all slices": [0, 1, 2], "current slice": [1]}.get(choices.get("slices"))
    for z in slices or [None]:
        plane = data if z is None else data[z]
        pick = {"channel_axis": 0, "channels": (0, 2, 4)} if "axis" in choices else {}
        expected = direct(student_path, plane, **pick)
        got = labels.data if z is None else labels.data[z]
        np.testing.assert_array_equal(got, expected.labels)
        got_p = maps[2] if z is None else maps[2][z]
        np.testing.assert_allclose(got_p, expected.probabilities[2], atol=1e-6)
    if slices == [1]:
        assert not labels.data[0].any() and not labels.data[2].any()


def test_dask_stack_with_a_student(make_widget, qtbot, student_path):
    da = pytest.importorskip("dask.array")
    lazy = da.from_array(STACK, chunks=(1, 48, 56))
    viewer, widget = make_widget((lazy, {"name": "lazy"}))
    widget.image.slices.setCurrentText("all slices")
    assert widget.use_student(str(student_path))
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["lazy [maskclip]"]
    assert labels.data.shape == (3, 48, 56)
    np.testing.assert_array_equal(labels.data[2], direct(student_path, STACK[2]).labels)


def test_a_subset_of_the_students_classes(make_widget, qtbot, student_path, notifications):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    assert widget.use_student(str(student_path))
    widget.classes.text.setPlainText("blue, red")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["img [maskclip]"]
    assert labels.features["name"].tolist() == ["background", "blue", "red"]
    assert "img [maskclip] green" not in viewer.layers
    expected = direct(student_path, RGB, classes="blue, red")
    np.testing.assert_array_equal(labels.data, expected.labels)
    widget.classes.text.setPlainText("purple")
    assert run_and_wait(qtbot, widget) == "error"
    assert any("not trained on 'purple'" in str(n.message) for n in notifications)


def test_unreadable_checkpoints_are_notifications(make_widget, qtbot, tiny_vit_files, tmp_path,
                                                  notifications):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    before = widget.model.model.currentText()
    assert not widget.use_student(str(tiny_vit_files[1]))  # a CLIP checkpoint, not a student
    assert any("not a napari-maskclip student checkpoint" in str(n.message) for n in notifications)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert not widget.use_student(str(junk))
    assert not widget.use_student(str(tmp_path / "missing.safetensors"))
    assert any("not found" in str(n.message) for n in notifications)
    assert widget.model.model.currentText() == before and not widget.model.choice().is_student


def test_student_labels_export_with_the_student_in_the_provenance(make_widget, qtbot, student_path,
                                                                 tmp_path):
    from napari_maskclip.export import read_dataset

    from test_gui_export import export_and_wait

    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    assert widget.use_student(str(student_path))
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["img [maskclip]"]
    labels.paint((5, 5), 1)
    panel = widget.open_export()
    panel.folder.setText(str(tmp_path / "ds"))
    assert export_and_wait(qtbot, panel) == "done", panel.status.text()
    ds = read_dataset(tmp_path / "ds")
    sample = ds["img"]
    assert ds.class_names == ["background", *NAMES]
    assert sample.provenance["labelled_by"] == "student"
    assert sample.provenance["student_checkpoint"] == str(student_path.resolve())
    assert sample.provenance["settings"]["backbone"] == "tiny"
    np.testing.assert_array_equal(sample.read_mask(), labels.data)
    assert sample.read_edited().any() and sample.read_confidence().shape == (3, 48, 56)


def test_the_model_box_shows_a_student_from_its_start(make_napari_viewer, qtbot, student_path):
    """Issue 20: a student's label ("student: <file>") is longer than the model box; the box
    shows its start (it showed the end, with "student" cut off), and typing is left alone."""
    from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1280, 800)
    widget = MaskClipWidget(viewer)
    viewer.window.add_dock_widget(widget)
    long_name = student_path.parent / ("a_student_with_a_long_name_" + "x" * 30 + ".safetensors")
    long_name.write_bytes(student_path.read_bytes())
    assert widget.use_student(str(long_name))
    qtbot.waitUntil(widget.model.model.isVisible, timeout=10_000)
    line = widget.model.model.lineEdit()
    assert line.text().startswith("student: ")
    assert line.fontMetrics().horizontalAdvance(line.text()) > line.width()  # too long to fit
    assert line.cursorPosition() == 0
    from qtpy.QtCore import Qt

    cursor = line.inputMethodQuery(Qt.InputMethodQuery.ImCursorRectangle)  # where it is drawn
    assert cursor.left() < line.fontMetrics().horizontalAdvance("student")  # the start in view
