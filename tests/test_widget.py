"""The dock widget in a real (offscreen) napari viewer, driven like a user would.

The model is the tiny random ViT saved as a checkpoint file (``tiny_vit_files``), chosen in the
widget's model fields exactly as a user picks a config JSON and a checkpoint. Runs happen in
napari workers; ``run_and_wait`` waits for the widget's ``run_finished`` signal.
"""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

# Load torch's compiler stack (and Triton, on Linux) now, at collection, before any napari canvas
# exists: Triton loaded after Mesa's LLVM crashes the process (see plugin/models.py _import_engine).
# The fixtures of tests/conftest.py import open_clip lazily, i.e. possibly after a viewer.
import open_clip  # noqa: F401,E402

from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget
from napari_maskclip.plugin.layers import META_KEY
from napari_maskclip.plugin.preferences import CONFIG_ENV, WidgetPreferences
from napari_maskclip.classes import class_color

from hang_guard import HANG_GUARD_MS as TIMEOUT_MS  # noqa: E402  (a hang guard, not a duration)


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))


@pytest.fixture
def notifications():
    """Messages napari shows as notifications during the test."""
    from napari.utils.notifications import notification_manager

    seen: list = []

    def record(event):
        seen.append(event)

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def make_widget(make_napari_viewer, tiny_vit_files, qtbot):
    """(viewer, widget) with the tiny model selected and deterministic settings."""

    def make(*layers):
        viewer = make_napari_viewer()
        for data, kwargs in layers:
            viewer.add_image(data, **kwargs)
        widget = MaskClipWidget(viewer)
        viewer.window.add_dock_widget(widget)
        config, ckpt = tiny_vit_files
        widget.model.model.setCurrentText(str(config))
        widget.model.pretrained.setCurrentText(str(ckpt))
        widget.model.device.setCurrentText("cpu")
        widget.settings.templates.setCurrentText("single")
        widget.settings.denoise.setChecked(False)
        return viewer, widget

    return make


def run_and_wait(qtbot, widget: MaskClipWidget, setup=None) -> str:
    with qtbot.waitSignal(widget.run_finished, timeout=TIMEOUT_MS) as blocker:
        worker = widget.run()
        if setup is not None and worker is not None:
            setup(worker)
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    return blocker.args[0]


def plugin_layers(viewer):
    return [layer for layer in viewer.layers if META_KEY in layer.metadata
            and "role" in layer.metadata[META_KEY]]


# ---- discovery ---------------------------------------------------------------------------------
def test_widget_is_discovered_through_npe2(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-maskclip", "MaskCLIP segmentation")
    assert isinstance(widget, MaskClipWidget)
    assert widget.model.model.currentText() == "ViT-B-16"
    assert widget.model.pretrained.currentText() == "openai"


def test_demo_model_is_marked_and_uses_its_template(make_napari_viewer):
    widget = MaskClipWidget(make_napari_viewer())
    assert not widget.model.hint.isVisibleTo(widget)
    index = widget.model.model.findText("demo")  # listed beside the real models, marked
    assert index >= 0 and "Demo model" in widget.model.model.itemData(index, Qt.ToolTipRole)
    widget.model.model.setCurrentText("demo")
    assert widget.model.hint.isVisibleTo(widget) and "Demo model" in widget.model.hint.text()
    assert not widget.model.pretrained.isEnabled()
    assert widget.settings.templates.currentText() == "single"
    assert widget.settings.inference.currentText() == "sliding window"
    assert (widget.settings.window.value(), widget.settings.stride.value()) == (64, 16)
    assert widget.model.choice().pretrained is None


def test_sample_data_suggests_class_names(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = MaskClipWidget(viewer)
    viewer.open_sample("napari-maskclip", "coffee")
    assert widget.image.current_layer().name == "coffee"
    assert widget.classes.classes_text().startswith("coffee cup")
    assert widget.classes.background_text() == "wooden table; table"


def test_shapes_sample_presets_the_demo_model_and_its_classes(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = MaskClipWidget(viewer)
    viewer.open_sample("napari-maskclip", "shapes")
    assert widget.model.model.currentText() == "demo"
    assert widget.classes.classes_text().startswith("red circle, red square")
    assert widget.classes.background_text() == "background"
    assert widget.settings.templates.currentText() == "single"


def remember_demo() -> None:
    """A second launch: widget.json already remembers a run of the demo model."""
    from napari_maskclip.demo.scene import demo_classes

    prefs = WidgetPreferences()
    prefs.remember_run(*demo_classes(), "demo", "")
    assert prefs.save()


def assert_demo_preset(widget) -> None:
    assert widget.model.model.currentText() == "demo"
    assert widget.settings.templates.currentText() == "single"
    assert widget.settings.inference.currentText() == "sliding window"
    assert (widget.settings.window.value(), widget.settings.stride.value()) == (64, 16)


def test_shapes_sample_presets_the_demo_even_when_it_is_remembered(make_napari_viewer):
    remember_demo()
    viewer = make_napari_viewer()
    widget = MaskClipWidget(viewer)
    assert widget.model.model.currentText() == "demo"  # restored, so the text never changes
    assert widget.settings.inference.currentText() == "auto"
    viewer.open_sample("napari-maskclip", "shapes")
    assert_demo_preset(widget)
    # A preset is applied whenever asked, also over settings the user changed since.
    widget.classes.text.setPlainText("")
    widget.settings.window.setValue(200)
    viewer.layers.clear()
    viewer.open_sample("napari-maskclip", "shapes")
    assert_demo_preset(widget)


def test_a_suggested_model_never_replaces_the_users_choice(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = MaskClipWidget(viewer)
    viewer.open_sample("napari-maskclip", "coffee")  # the user starts with classes of their own
    widget.model.model.setCurrentText("ViT-B-32")
    viewer.open_sample("napari-maskclip", "shapes")
    assert widget.model.model.currentText() == "ViT-B-32"


def test_opening_a_sample_makes_it_the_image_with_its_names(make_napari_viewer):
    """Issue 20: File > Open Sample in a viewer that holds an image presets the widget as the
    README says: the sample is the image to segment, its names fill the class box (replacing a
    sample's, never names the user typed), the Shapes scene brings the demo model."""
    viewer = make_napari_viewer()
    viewer.add_image(RGB, name="cells", rgb=True)
    widget = MaskClipWidget(viewer)
    assert widget.image.current_layer().name == "cells" and widget.classes.classes_text() == ""
    assert widget.model.model.currentText() == "ViT-B-16"  # the default (or remembered) model
    viewer.open_sample("napari-maskclip", "shapes")
    assert widget.image.current_layer().name == "shapes (demo)"
    assert widget.classes.classes_text().startswith("red circle, red square")
    assert_demo_preset(widget)
    viewer.open_sample("napari-maskclip", "coffee")  # the names a sample filled in: replaced
    assert widget.image.current_layer().name == "coffee"
    assert widget.classes.classes_text().startswith("coffee cup")
    assert widget.classes.background_text() == "wooden table; table"
    widget.classes.text.setPlainText("cat, dog")  # typed: kept, with the background
    viewer.open_sample("napari-maskclip", "astronaut")
    assert widget.image.current_layer().name == "astronaut"
    assert widget.classes.classes_text() == "cat, dog"
    assert widget.classes.background_text() == "wooden table; table"


# ---- image kinds ---------------------------------------------------------------------------------
RNG = np.random.default_rng(0)
GRAY16 = (RNG.random((48, 56)) * 60000).astype(np.uint16)
RGB = (RNG.random((48, 56, 3)) * 255).astype(np.uint8)
RGBA = (RNG.random((48, 56, 4)) * 255).astype(np.uint8)
MULTI = (RNG.random((5, 48, 56)) * 4000).astype(np.uint16)
STACK = (RNG.random((3, 48, 56)) * 255).astype(np.uint8)


@pytest.mark.parametrize(
    "data, kwargs, choices, shape, filled",
    [
        (GRAY16, {"scale": (0.5, 0.25), "translate": (4, 8)}, {}, (48, 56), None),
        (RGB, {"rgb": True, "scale": (2, 2)}, {}, (48, 56), None),
        (RGBA, {"rgb": True}, {}, (48, 56), None),
        (MULTI, {"scale": (1, 0.5, 0.5)}, {"axis": "0", "channels": "0,2,4"}, (48, 56), None),
        (MULTI, {}, {"axis": "0", "channels": "3"}, (48, 56), None),
        (STACK, {"scale": (3, 0.5, 0.5), "translate": (1, 2, 3)}, {"slices": "current slice"},
         (3, 48, 56), [2]),
        (STACK, {"scale": (3, 0.5, 0.5)}, {"slices": "all slices"}, (3, 48, 56), [0, 1, 2]),
    ],
    ids=["gray16", "rgb", "rgba", "multichannel-3", "multichannel-1", "stack-current",
         "stack-all"],
)
def test_runs_on_each_image_kind(make_widget, qtbot, data, kwargs, choices, shape, filled):
    viewer, widget = make_widget((data, {"name": "img", **kwargs}))
    if "axis" in choices:
        widget.image.channel_axis.setCurrentText(choices["axis"])
        widget.image.channels.setText(choices["channels"])
    if "slices" in choices:
        widget.image.slices.setCurrentText(choices["slices"])
        viewer.dims.set_current_step(0, 2)
    widget.classes.text.setPlainText("cat, dog; puppy, sofa")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()

    source = viewer.layers["img"]
    labels = viewer.layers["img [maskclip]"]
    assert labels.data.shape == shape and labels.data.dtype == np.uint8
    spatial = slice(-len(shape), None)
    np.testing.assert_allclose(labels.scale, source.scale[spatial])
    np.testing.assert_allclose(labels.translate, source.translate[spatial])
    assert labels.features["name"].tolist() == ["background", "cat", "dog", "sofa"]
    assert labels.colormap.map(np.array([2]))[0, :3] == pytest.approx(class_color("dog")[:3], abs=0.01)
    from napari_maskclip.plugin.records import ConfidenceRecord

    conf = viewer.layers["img [maskclip] confidence"]
    assert conf.data.shape == shape and conf.data.dtype == np.float32
    assert conf.blending == "translucent"
    np.testing.assert_allclose(conf.scale, source.scale[spatial])
    stacked = ConfidenceRecord.from_metadata(conf.metadata).maps
    assert stacked.shape == (3, *shape) and stacked.dtype == np.float32
    assert stacked.min() >= 0.0 and stacked.max() <= 1.0
    argmax = stacked.argmax(axis=0) + 1
    if filled is None:
        np.testing.assert_array_equal(labels.data, argmax)  # labels agree with the maps
    else:
        for z in range(shape[0]):
            assert labels.data[z].any() == (z in filled)
            assert stacked[:, z].any() == (z in filled)
            if z in filled:
                np.testing.assert_array_equal(labels.data[z], argmax[z])


def test_dask_stack_is_segmented_slice_by_slice(make_widget, qtbot):
    da = pytest.importorskip("dask.array")
    lazy = da.from_array(STACK, chunks=(1, 48, 56))
    viewer, widget = make_widget((lazy, {"name": "lazy", "scale": (2, 1, 1)}))
    widget.image.slices.setCurrentText("all slices")
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["lazy [maskclip]"]
    assert isinstance(labels.data, np.ndarray) and labels.data.shape == (3, 48, 56)
    np.testing.assert_allclose(labels.scale, (2, 1, 1))
    assert all(labels.data[z].any() for z in range(3))
    assert "image encoder ran on 3 of 3 slices" in widget.status.text()


# ---- instant re-query ----------------------------------------------------------------------------
def test_requery_with_new_names_runs_no_image_encoder(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done"
    segmenter = widget.pool.cached(widget.model.choice())
    encoder_calls = segmenter.image_encoder_calls
    assert encoder_calls >= 1
    widget.classes.text.setPlainText("sofa, floor, wall")
    assert run_and_wait(qtbot, widget) == "done"
    assert segmenter.image_encoder_calls == encoder_calls
    assert "no image-encoder pass" in widget.status.text()
    labels = viewer.layers["img [maskclip]"]
    assert labels.features["name"].tolist() == ["background", "sofa", "floor", "wall"]
    from napari_maskclip.plugin.records import ConfidenceRecord

    conf = ConfidenceRecord.from_metadata(viewer.layers["img [maskclip] confidence"].metadata)
    assert conf.class_names == ("sofa", "floor", "wall")  # the maps follow the names
    # Asking again for names seen before also reuses the text embeddings.
    text_calls = segmenter.text.forward_calls
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done"
    assert segmenter.text.forward_calls == text_calls
    assert "cached class embeddings" in widget.status.text()
    assert len(widget.pool) == 1


# ---- cancel --------------------------------------------------------------------------------------
def test_cancel_leaves_no_layer_and_keeps_previous_results(make_widget, qtbot):
    big = (RNG.random((160, 160, 3)) * 255).astype(np.uint8)
    viewer, widget = make_widget((big, {"name": "img", "rgb": True}))
    widget.settings.inference.setCurrentText("sliding window")
    widget.settings.window.setValue(32)
    widget.settings.stride.setValue(16)
    widget.classes.text.setPlainText("cat, dog")
    n_layers = len(viewer.layers)

    def cancel_on_first_window(worker):
        def on_step(step):  # in the worker thread (direct connection): no race with its windows
            # The worker starts before this is connected, so its first reports may be missed.
            words = step.message.split()
            if step.info.get("inner_stage") == "encode" and words[-2:-1] == ["window"] \
                    and int(words[-1].split("/")[0]) >= 2:
                widget.runner.request_cancel()  # what Cancel does, safe from the worker thread
        worker.yielded.connect(on_step, Qt.DirectConnection)

    assert run_and_wait(qtbot, widget, cancel_on_first_window) == "cancelled"
    assert len(viewer.layers) == n_layers
    assert "Cancelled" in widget.status.text()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    segmenter = widget.pool.cached(widget.model.choice())
    assert 2 <= segmenter.image_encoder_calls < 81  # stopped early: 9x9 windows in all

    # A cancelled re-run does not touch the layers of the previous run either.
    widget.settings.inference.setCurrentText("auto")
    assert run_and_wait(qtbot, widget) == "done"
    before = viewer.layers["img [maskclip]"].data.copy()
    widget.classes.text.setPlainText("bird, tree")
    widget.settings.inference.setCurrentText("sliding window")
    assert run_and_wait(qtbot, widget, cancel_on_first_window) == "cancelled"
    np.testing.assert_array_equal(viewer.layers["img [maskclip]"].data, before)
    assert viewer.layers["img [maskclip]"].features["name"].tolist() == ["background", "cat", "dog"]


# ---- edits are kept ------------------------------------------------------------------------------
def test_rerun_keeps_edited_labels(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done"
    labels = viewer.layers["img [maskclip]"]
    labels.selected_label = 2
    labels.brush_size = 5
    labels.paint((10, 10), 2)
    labels.fill((40, 50), 1)
    edited = labels.data.copy()
    widget.classes.text.setPlainText("sofa, floor")
    assert run_and_wait(qtbot, widget) == "done"
    np.testing.assert_array_equal(labels.data, edited)
    assert labels.features["name"].tolist() == ["background", "cat", "dog"]
    new = widget.last_report.labels_layer
    assert new is not labels and new.name == "img [maskclip] (2)"
    assert new.features["name"].tolist() == ["background", "sofa", "floor"]
    assert "untouched" in widget.status.text()


def test_confidence_maps_stay_with_their_labels_layer(make_widget, qtbot):
    """A re-run whose labels go to a new '(2)' layer (the first was edited) adds its own
    confidence layer; the edited layer keeps its maps, still paired by run for export, and
    deleting a Labels layer deletes its confidence layer (nothing left behind)."""
    from napari_maskclip.plugin.records import META_KEY, ConfidenceRecord

    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done"
    labels = viewer.layers["img [maskclip]"]
    conf = viewer.layers["img [maskclip] confidence"]
    maps = np.array(ConfidenceRecord.from_metadata(conf.metadata).maps, copy=True)
    labels.paint((10, 10), 2)
    widget.classes.text.setPlainText("sofa, floor")
    assert run_and_wait(qtbot, widget) == "done"
    assert viewer.layers["img [maskclip] confidence"] is conf  # kept, still the first run's
    np.testing.assert_array_equal(ConfidenceRecord.from_metadata(conf.metadata).maps, maps)
    run_id = labels.metadata[META_KEY]["run_id"]
    assert conf.metadata[META_KEY]["run_id"] == run_id
    new = widget.last_report.labels_layer
    new_conf = viewer.layers["img [maskclip] (2) confidence"]
    assert new_conf.metadata[META_KEY]["run_id"] == new.metadata[META_KEY]["run_id"] != run_id
    assert ConfidenceRecord.from_metadata(new_conf.metadata).class_names == ("sofa", "floor")
    # The next run with the same names updates the new pair only.
    assert run_and_wait(qtbot, widget) == "done"
    assert widget.last_report.labels_layer is new
    assert viewer.layers["img [maskclip] (2) confidence"] is new_conf
    assert viewer.layers["img [maskclip] confidence"] is conf
    # Deleting the edited Labels layer takes its confidence layer with it.
    viewer.layers.remove(labels)
    assert "img [maskclip] confidence" not in viewer.layers
    assert "img [maskclip] (2) confidence" in viewer.layers


def test_stack_slices_accumulate_without_losing_edits(make_widget, qtbot):
    viewer, widget = make_widget((STACK, {"name": "img"}))
    widget.classes.text.setPlainText("cat, dog")
    viewer.dims.set_current_step(0, 0)
    assert run_and_wait(qtbot, widget) == "done"
    labels = viewer.layers["img [maskclip]"]
    labels.paint((0, 5, 5), 2)  # the user fixes slice 0
    slice0 = labels.data[0].copy()
    viewer.dims.set_current_step(0, 1)  # ... and moves on to the next slice
    assert run_and_wait(qtbot, widget) == "done"
    assert widget.last_report.labels_layer is labels
    np.testing.assert_array_equal(labels.data[0], slice0)
    assert labels.data[1].any() and not labels.data[2].any()
    assert "in place" in widget.status.text()


# ---- errors reach the user as notifications ------------------------------------------------------
def test_empty_class_list_is_a_notification(make_widget, qtbot, notifications):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText(" , ")
    assert run_and_wait(qtbot, widget) == "error"
    assert any("No class names" in str(n.message) for n in notifications)
    assert plugin_layers(viewer) == []
    assert widget.worker is None  # refused before any thread started


def test_impossible_settings_are_refused_before_any_worker_starts(make_widget, qtbot,
                                                                  notifications):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat")
    widget.settings.inference.setCurrentText("sliding window")
    widget.settings.window.setValue(32)
    widget.settings.stride.setValue(48)
    assert run_and_wait(qtbot, widget) == "error"
    assert widget.worker is None and len(widget.pool) == 0  # no thread, no model loaded
    assert any("stride (48) is larger than the window (32)" in str(n.message)
               for n in notifications)
    assert plugin_layers(viewer) == []


def test_fresh_settings_are_the_engines_defaults(qtbot):
    from napari_maskclip.engine.settings import SegmentSettings
    from napari_maskclip.plugin._qt.sections import SettingsSection

    section = SettingsSection()
    qtbot.addWidget(section)
    assert section.segment_settings() == SegmentSettings()


def test_missing_checkpoint_is_a_notification(make_widget, qtbot, notifications, tmp_path):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.model.pretrained.setCurrentText(str(tmp_path / "missing.safetensors"))
    widget.classes.text.setPlainText("cat")
    assert run_and_wait(qtbot, widget) == "error"
    assert any("Checkpoint file not found" in str(n.message) for n in notifications)
    assert plugin_layers(viewer) == []
    assert widget.run_button.isEnabled()


def test_weights_unavailable_offline_is_a_notification(make_widget, qtbot, notifications,
                                                       monkeypatch):
    from napari_maskclip.engine import segmenter as segmenter_module
    from napari_maskclip.errors import WeightsUnavailableError

    def offline(*args, **kwargs):
        raise WeightsUnavailableError("Could not get the 'openai' weights of ViT-B-16 (offline).")

    monkeypatch.setattr(segmenter_module, "load_clip", offline)  # never touch the network
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.model.model.setCurrentText("ViT-B-16")
    widget.model.pretrained.setCurrentText("openai")
    widget.classes.text.setPlainText("cat")
    assert run_and_wait(qtbot, widget) == "error"
    messages = [str(n.message) for n in notifications]
    assert any("openai' weights of ViT-B-16" in m for m in messages)
    assert "Error:" in widget.status.text() and plugin_layers(viewer) == []


def test_weights_offline_names_the_widgets_controls(make_widget, qtbot, notifications,
                                                   monkeypatch):
    """Issue 20: the offline-weights message in the dock says what to do with the dock's boxes
    and buttons, not with the CLI's flags."""
    from napari_maskclip.engine import pretrained

    monkeypatch.setenv("NAPARI_MASKCLIP_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "cached_pretrained_file", lambda *args, **kwargs: None)
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.model.model.setCurrentText("ViT-B-16")
    widget.model.pretrained.setCurrentText("openai")
    widget.classes.text.setPlainText("cat")
    assert run_and_wait(qtbot, widget) == "error"
    message = widget.status.text()
    assert "'openai' weights of ViT-B-16" in message and "NAPARI_MASKCLIP_OFFLINE=1" in message
    assert "'demo' in the model box" in message and "beside the weights box" in message
    assert "--" not in message, message
    assert any("'demo' in the model box" in str(n.message) for n in notifications)


def test_unsupported_image_is_a_notification(make_widget, qtbot, notifications):
    viewer, widget = make_widget((MULTI, {"name": "img"}))
    widget.image.channel_axis.setCurrentText("0")  # 5 channels, none picked
    widget.classes.text.setPlainText("cat")
    assert run_and_wait(qtbot, widget) == "error"
    assert any("choose 1 or 3" in str(n.message) for n in notifications)
    assert plugin_layers(viewer) == []


# ---- preferences -------------------------------------------------------------------------------
def test_recent_class_lists_are_remembered(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog; puppy")
    assert run_and_wait(qtbot, widget) == "done"
    assert WidgetPreferences.load().recent_classes == ["cat, dog; puppy"]
    other = MaskClipWidget(viewer)  # a new session reads the file
    items = [other.classes.recent.itemText(i) for i in range(other.classes.recent.count())]
    assert "cat, dog; puppy" in items
    other.classes.recent.activated.emit(items.index("cat, dog; puppy"))
    assert other.classes.classes_text() == "cat, dog; puppy"
    assert other.model.pretrained.currentText() == widget.model.pretrained.currentText()


# ---- the export seam -----------------------------------------------------------------------------
def test_result_saves_as_a_training_sample(make_widget, qtbot, tmp_path):
    """What the layers carry is enough for napari's Save to write a dataset sample."""
    from napari_maskclip.export import read_dataset
    from napari_maskclip.plugin.records import ConfidenceRecord

    viewer, widget = make_widget((RGB, {"name": "photo", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog; puppy")
    widget.classes.background.setEditText("sky, wall")
    assert run_and_wait(qtbot, widget) == "done", widget.status.text()
    labels = viewer.layers["photo [maskclip]"]
    viewer.layers.selection = {labels}
    assert viewer.layers.save(str(tmp_path / "ds"), selected=True, plugin="napari-maskclip")
    dataset = read_dataset(tmp_path / "ds")
    assert dataset.class_names[1:] == ["cat", "dog"]
    sample = dataset["photo"]
    np.testing.assert_array_equal(sample.read_mask(), labels.data)
    np.testing.assert_array_equal(sample.read_image(), RGB)
    confidence = sample.read_confidence()
    assert confidence is not None and confidence.shape == (2, *RGB.shape[:2])
    maps = ConfidenceRecord.from_metadata(viewer.layers["photo [maskclip] confidence"].metadata).maps
    np.testing.assert_allclose(confidence, maps, atol=1e-3)  # every class, not just the shown one


@pytest.mark.parametrize("launch", ["first", pytest.param("second", marks=pytest.mark.slow)])
def test_demo_command_opens_napari_on_the_scene_with_the_widget_preset(monkeypatch, qtbot, launch):
    """``napari-maskclip demo`` with a display: the shapes scene and the widget, preset; also on
    a second launch, when widget.json already remembers the demo model."""
    if launch == "second":
        remember_demo()
    import napari

    from napari_maskclip.cli import demo as demo_cli
    from napari_maskclip.cli import main

    monkeypatch.setattr(demo_cli, "has_display", lambda: True)
    monkeypatch.setattr(napari, "run", lambda *args, **kwargs: None)  # do not block
    seen = {}
    preset = demo_cli._preset
    monkeypatch.setattr(demo_cli, "_preset", lambda widget: (seen.update(widget=widget), preset(widget)))
    assert main(["demo"]) == 0
    viewer = napari.current_viewer()
    try:
        assert [layer.name for layer in viewer.layers] == ["shapes (demo)"]
        widget = seen["widget"]
        assert isinstance(widget, MaskClipWidget)
        assert widget.classes.classes_text().startswith("red circle")
        assert_demo_preset(widget)
        if launch == "second":  # Run labels the scene, not ~all of it as one class
            from napari_maskclip.demo.scene import demo_scene

            widget.model.device.setCurrentText("cpu")
            assert run_and_wait(qtbot, widget) == "done", widget.status.text()
            labels = viewer.layers["shapes (demo) [maskclip]"].data
            truth = demo_scene().mask
            accuracy = float((labels == truth).mean())
            print(f"second launch: pixel accuracy {accuracy:.2f}")
            # Without the preset, 85 templates read whole give ~1 % (one class everywhere).
            assert accuracy > 0.5 and len(np.unique(labels)) >= 4
    finally:
        viewer.close()


def test_refinements_and_precision_reach_the_engine_and_the_record(make_widget, qtbot):
    """PAMR, region voting and the precision chosen in Settings are what the run used (and
    recorded, so an export's provenance carries them); switching PAMR on is a re-query."""
    from napari_maskclip.plugin.records import META_KEY

    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    settings = widget.settings
    settings.precision.setCurrentText("fp32")
    assert run_and_wait(qtbot, widget) == "done"
    segmenter = widget.pool.cached(widget.model.choice())
    encoder_calls = segmenter.image_encoder_calls
    settings.pamr.setChecked(True)
    settings.regions.setCurrentText("felzenszwalb")
    assert run_and_wait(qtbot, widget) == "done"
    assert segmenter.image_encoder_calls == encoder_calls  # query-time refinements
    recorded = viewer.layers[-1].metadata
    labels = [layer for layer in viewer.layers if META_KEY in layer.metadata
              and "settings" in layer.metadata[META_KEY]]
    assert labels, recorded
    record = labels[-1].metadata[META_KEY]["settings"]
    assert record["pamr"] is True and record["regions"] == "felzenszwalb"
    assert record["precision"] == "fp32"
