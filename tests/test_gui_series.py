"""The Series page: a folder annotated one image at a time into a dataset, with the shipped demo
model (issue 12). Edits, Next, Previous, close, reopen and resume; the next image is labelled
before Next is pressed; Mark reviewed; unreadable images skipped; the keys bound on the viewer.
"""

from __future__ import annotations

import json
import time

import imageio.v3 as iio
import numpy as np
import pytest

from napari_maskclip.demo.scene import demo_classes, demo_scene
from napari_maskclip.plugin._qt.docks import PAGE_SERIES, PLUGIN, SEGMENT_NAME
from napari_maskclip.plugin._qt.series_panel import SHORTCUTS

from hang_guard import HANG_GUARD_MS as TIMEOUT_MS  # noqa: E402  (a hang guard, not a duration)


@pytest.fixture
def scenes(tmp_path):
    """Five synthetic scenes (192 x 256 RGB)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(5):
        iio.imwrite(folder / f"scene{k + 1}.png", demo_scene(seed=k).image)
    return folder


def series_page(make_napari_viewer, *, show=False):
    """A viewer with the dock at its Series page, the Segment page set to the demo model."""
    viewer = make_napari_viewer(show=show)
    _, main = viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT_NAME)
    classes, background = demo_classes()
    main.use_model("demo")
    main.model.device.setCurrentText("cpu")
    main.classes.text.setPlainText(classes)
    main.classes.background.setEditText(background)
    return viewer, main, main.show_page(PAGE_SERIES)


def open_series(make_napari_viewer, qtbot, folder, dataset, *, show=False):
    """A viewer with the dock at its Series page on ``folder`` (demo model), first image shown."""
    viewer, main, series = series_page(make_napari_viewer, show=show)
    series.set_folders(str(folder), str(dataset))
    with qtbot.waitSignal(series.image_shown, timeout=TIMEOUT_MS):
        assert series.open_series() is not None
    return viewer, main, series


def step(qtbot, series, action):
    """Press a button (or call an action), wait until the next image is on screen and the image
    left behind is written (Next shows first, then saves)."""
    with qtbot.waitSignal(series.image_shown, timeout=TIMEOUT_MS) as blocker:
        action()
    qtbot.waitUntil(lambda: series.pending is None, timeout=TIMEOUT_MS)
    return blocker.args[0]


def test_series_edit_next_previous_close_reopen_resume(make_napari_viewer, qtbot, scenes, tmp_path):
    dataset = tmp_path / "dataset"
    viewer, main, series = open_series(make_napari_viewer, qtbot, scenes, dataset)
    assert series.index == 0 and main.current_page() == PAGE_SERIES
    assert series.progress.text() == "0 / 5 saved, 0 with edits, model: MaskCLIP demo"
    layer = series.view.labels_layer
    assert layer.name in viewer.layers  # (the plugin holds a proxy of napari's layer)
    assert viewer.layers.selection.active.name == layer.name
    assert layer.mode == "paint" and layer.data.shape == (192, 256)
    predicted0 = np.array(layer.data)
    assert predicted0.any()  # the demo model labelled the shapes

    # Edit image 0: a block painted with a class other than what the model gave.
    block = (slice(20, 40), slice(30, 60))
    new_value = 1 if not (predicted0[block] == 1).all() else 2
    layer.data[block] = new_value
    layer.refresh()
    expected_edited = np.zeros_like(predicted0, dtype=bool)
    expected_edited[block] = predicted0[block] != new_value

    assert step(qtbot, series, series.next_button.click) == 1
    session = series.session
    assert session.is_saved(0) and not session.is_saved(1)
    np.testing.assert_array_equal(session.saved_edited(0), expected_edited)
    saved0 = session.saved_labels(0)
    assert (saved0[block] == new_value).all()
    assert series.progress.text() == "1 / 5 saved, 1 with edits, model: MaskCLIP demo"

    predicted1 = np.array(series.view.labels_layer.data)
    assert step(qtbot, series, series.next_button.click) == 2  # image 1 saved unedited
    assert session.is_saved(1) and not session.saved_edited(1).any()
    assert step(qtbot, series, series.previous_button.click) == 1  # saves image 2
    assert session.is_saved(2)
    # A saved image comes back with its saved labels, not a new prediction.
    np.testing.assert_array_equal(series.view.labels_layer.data, session.saved_labels(1))
    np.testing.assert_array_equal(series.view.labels_layer.data, predicted1)
    index_file = dataset / "dataset.json"
    before = index_file.stat().st_mtime_ns
    assert step(qtbot, series, series.next_button.click) == 2  # unchanged: not written again
    assert index_file.stat().st_mtime_ns == before
    assert step(qtbot, series, series.next_button.click) == 3
    assert series.progress.text() == "3 / 5 saved, 1 with edits, model: MaskCLIP demo"

    viewer.close()  # image 3 unedited: nothing to save, nothing lost
    assert series.prefetcher is None  # stopped with the dock

    viewer2, main2, series2 = open_series(make_napari_viewer, qtbot, scenes, dataset)
    assert series2.index == 3  # resumes at the first image not saved
    assert series2.progress.text() == "3 / 5 saved, 1 with edits, model: MaskCLIP demo"
    for _ in range(3):
        step(qtbot, series2, series2.previous_button.click)
    assert series2.index == 0
    np.testing.assert_array_equal(series2.view.labels_layer.data, saved0)  # the edit is back
    assert series2.session.is_saved(3)  # Previous saves the image it leaves, edited or not


def test_next_image_is_labelled_before_next_is_pressed(make_napari_viewer, qtbot, scenes, tmp_path):
    viewer, main, series = open_series(make_napari_viewer, qtbot, scenes, tmp_path / "ds")
    assert series.index == 0
    # Image 1 was requested as soon as image 0 was shown.
    qtbot.waitUntil(lambda: series.prefetcher.started(1), timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: series.prefetcher.ready(1), timeout=TIMEOUT_MS)
    started = time.perf_counter()
    series.next()  # no waiting: image 1 is on screen when next() returns
    seconds = time.perf_counter() - started
    assert series.index == 1 and series.waiting is None
    assert series.pending is not None  # image 0 is written right after
    with qtbot.waitSignal(series.saved, timeout=TIMEOUT_MS) as saved:
        pass
    assert saved.args == [0] and series.session.is_saved(0)
    assert series.view.current.predicted and series.view.labels_layer.data.any()
    print(f"Next to labels on screen (prefetched): {seconds:.3f} s")
    qtbot.waitUntil(lambda: series.prefetcher.started(2), timeout=TIMEOUT_MS)


def test_mark_reviewed_and_keys(make_napari_viewer, qtbot, scenes, tmp_path):
    from napari.utils.key_bindings import coerce_keybinding

    viewer, main, series = open_series(make_napari_viewer, qtbot, scenes, tmp_path / "ds")
    keys = {str(coerce_keybinding(key)) for key in SHORTCUTS}
    bound = {str(key) for key in viewer.keymap}
    assert keys <= bound, (keys, bound)

    assert step(qtbot, series, series.reviewed_button.click) == 1
    session = series.session
    assert session.is_reviewed(0) and session.saved_edited(0).all()
    sample = session.saved_sample(0)
    assert sample.provenance["reviewed"] is True
    assert "reviewed" in series.progress.text()

    # The viewer's keys: Shift+Enter marks reviewed, Shift+Left goes back (saving image 1).
    press = {str(key): func for key, func in viewer.keymap.items()}
    step(qtbot, series, lambda: press[str(coerce_keybinding("Shift-Enter"))](viewer))
    assert series.index == 2 and session.is_reviewed(1)
    step(qtbot, series, lambda: press[str(coerce_keybinding("Shift-Left"))](viewer))
    assert series.index == 1
    index = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert len(index["samples"]) == 3

    # The list: one line per image, marked; a click saves and jumps.
    texts = [series.image_list.item(k).text() for k in range(series.image_list.count())]
    assert len(texts) == 5 and texts[0].startswith("\u2605") and texts[1].startswith("\u2605")
    assert texts[2].startswith("\u2713") and series.image_list.currentRow() == 1
    item = series.image_list.item(4)
    step(qtbot, series, lambda: series.image_list.itemClicked.emit(item))
    assert series.index == 4 and series.image_list.currentRow() == 4

    series.close_series()  # keys unbound, layers removed
    assert not keys & {str(key) for key in viewer.keymap}
    assert series.view.labels_layer is None and len(viewer.layers) == 0


def test_unreadable_images_are_listed_and_skipped(make_napari_viewer, qtbot, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    iio.imwrite(folder / "a1.png", demo_scene(seed=1).image)
    (folder / "a2.png").write_bytes(b"not a png at all")
    iio.imwrite(folder / "a3.png", demo_scene(seed=2).image[..., 0])  # gray works too
    viewer, main, series = open_series(make_napari_viewer, qtbot, folder, tmp_path / "ds")
    assert series.index == 0
    assert step(qtbot, series, series.next) == 2
    assert 1 in series.session.unreadable
    assert "a2" in series.status.text() and "unreadable" in series.status.text()
    assert "1 unreadable" in series.progress.text()
    assert series.view.image_layer.data.ndim == 2 and not series.view.image_layer.rgb


def test_hardest_first_orders_the_rest_by_uncertainty(make_napari_viewer, qtbot, scenes, tmp_path):
    from napari_maskclip.series.uncertainty import margin_uncertainty

    viewer = make_napari_viewer()
    _, main = viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT_NAME)
    classes, background = demo_classes()
    main.use_model("demo")
    main.classes.text.setPlainText(classes)
    main.classes.background.setEditText(background)
    series = main.show_page(PAGE_SERIES)
    series.set_folders(str(scenes), str(tmp_path / "ds"))
    series.hardest.setChecked(True)
    states = []
    series.job_finished.connect(states.append)
    series.open_series()
    qtbot.waitUntil(lambda: states == ["done", "done"], timeout=TIMEOUT_MS)  # open, then score
    assert series.index == 0
    session = series.session
    scores = {i: margin_uncertainty(series.predictor.predict(session.read_image(i)).probabilities)
              for i in range(1, 5)}
    expected = [0] + sorted(scores, key=lambda i: -scores[i])
    assert expected != list(range(5))  # these scenes are not already in that order
    assert session.order == expected
    assert [series.image_list.item(k).data(256) for k in range(5)] == expected  # UserRole
    step(qtbot, series, series.next)
    assert series.index == expected[1]
    series.hardest.setChecked(False)  # back to folder order
    assert session.order == list(range(5))


def test_retrain_every_k_switches_to_a_better_student(make_napari_viewer, qtbot, scenes, tmp_path):
    """After K saved images a student round runs in the background; the page uses the new student
    only if it beats the model in use on held-out human pixels, and says which model labels."""
    from napari_maskclip.series.retrain import split_for_validation
    from napari_maskclip.student import TrainSettings

    viewer, main, series = open_series(make_napari_viewer, qtbot, scenes, tmp_path / "ds")
    series.retrain_settings = TrainSettings(
        iterations=30, batch_size=4, crop_size=64, backbone="tiny", backbone_weights="random",
        lr=0.05, self_train_fraction=1.0, val_fraction=0.0, val_interval=0, save_interval=0)
    series.retrain_iterations.setValue(30)
    series.retrain_every.setValue(2)
    states = []
    series.job_finished.connect(states.append)
    # The person says these scenes are all background (the demo model sees shapes): a student
    # learns that easily and beats the model in use on the held-out human pixels.
    for _ in range(2):
        assert not series.running  # fewer than 2 saved: not due yet
        series.view.labels_layer.data = np.zeros_like(series.view.labels_layer.data)
        step(qtbot, series, series.mark_reviewed)  # every pixel a person's
    assert series.running and series._job == "retrain"  # 2 saved: a round started
    qtbot.waitUntil(lambda: states == ["done"], timeout=TIMEOUT_MS * 3)
    outcome = series.last_retrain
    assert outcome.iterations == 30 and not outcome.warm_start
    assert outcome.validation and outcome.validation_pixels > 0
    _, val = split_for_validation(series.session.names[:2], [True, True], 0.2)
    assert outcome.validation == [series.session.names[i] for i in val]
    print(f"retrain: promoted={outcome.promoted} ({outcome.reason})")
    student = tmp_path / "ds-student.safetensors"
    assert outcome.promoted and outcome.miou_new > outcome.miou_current
    assert student.is_file() and series.predictor.label == "student (iteration 30)"
    assert "labelled by student (iteration 30)" in series.status.text()
    # The image on screen keeps the labels of the model that made them; the next comes from
    # the new student, and the progress line says so.
    assert series.progress.text().endswith("model: MaskCLIP demo")
    step(qtbot, series, series.next)
    assert series.view.current.model_label == "student (iteration 30)"
    assert series.progress.text().endswith("model: student (iteration 30)")


def test_a_dataset_with_other_classes_is_refused_or_remapped_as_export_does(
        make_napari_viewer, qtbot, scenes, tmp_path):
    """Item 6: the same refusal / remap choice as Export for a dataset with other classes."""
    from napari_maskclip.export import export_sample

    dataset = tmp_path / "dataset"
    export_sample(dataset, "other", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8),
                  "red circle, purple moon")
    viewer, main, series = series_page(make_napari_viewer)
    classes, _ = demo_classes()
    series.set_folders(str(scenes), str(dataset))
    with qtbot.waitSignal(series.runner.ended, timeout=TIMEOUT_MS) as ended:
        series.open_series()
    assert ended.args == ["error"] and series.session is None
    assert "remap" in series.status.text()  # Export's message says how to proceed
    assert not series.add_classes.isEnabled()
    series.set_folders(str(scenes), str(dataset), remap=True, add_classes=True)
    assert series.add_classes.isEnabled()
    with qtbot.waitSignal(series.image_shown, timeout=TIMEOUT_MS):
        series.open_series()
    step(qtbot, series, series.next_button.click)
    names = [c["name"] for c in json.loads((dataset / "classes.json").read_text())["classes"]]
    assert names[1:3] == ["red circle", "purple moon"]  # the dataset's own list first, kept
    assert set(classes.replace(";", ",").split(", ")) <= set(names)  # ours appended
    saved = series.session.saved_labels(0)
    labels = np.array(series.view.labels_layer.data)  # image 1 now; image 0 saved with remap
    assert saved.shape == (192, 256) and labels.shape == (192, 256)


# ---- issue 20: rough edges a newcomer met ---------------------------------------------------------
class _HeldPredictor:
    """The demo predictor, holding each prediction until the test lets it go (so the page can be
    looked at while it waits for an image), whatever the machine's speed."""

    def __init__(self, inner):
        import threading

        self.inner = inner
        self.go = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, image, *, cancel=None):
        self.go.wait(TIMEOUT_MS / 1000)
        return self.inner.predict(image, cancel=cancel)


def test_series_lines_while_waiting_and_after_close(make_napari_viewer, qtbot, scenes, tmp_path):
    """While the first image is being labelled the progress line is the series' (not "No series
    open."); after Close the status line says what was saved, not the last image's line."""
    from napari_maskclip.series import SeriesSession, list_images
    from napari_maskclip.series.predictor import SeriesPredictor

    viewer, main, series = series_page(make_napari_viewer)
    classes, background = demo_classes()
    session = SeriesSession.open(list_images(str(scenes)), tmp_path / "ds", classes,
                                 background=background)
    held = _HeldPredictor(SeriesPredictor.teacher("demo", classes, background=background,
                                                  device="cpu"))
    series.start(session, held)
    assert series.index is None and series.status.text() == "Labelling scene1..."
    assert series.progress.text() == "0 / 5 saved, 0 with edits, model: MaskCLIP demo"
    with qtbot.waitSignal(series.image_shown, timeout=TIMEOUT_MS):
        held.go.set()
    step(qtbot, series, series.next)
    assert series.status.text().startswith("Image 2 of 5")
    series.close_button.click()
    assert series.session is None and series.progress.text() == "No series open."
    assert series.status.text() == f"Closed: 1 of 5 images saved in {tmp_path / 'ds'}."
    assert series.image_list.count() == 0


def test_series_shows_its_image_on_its_own_and_gives_the_other_layers_back(
        make_napari_viewer, qtbot, scenes, tmp_path):
    """A viewer that already holds images: while the series is open they are hidden (their
    labels are not drawn over the series' image, nor the series' over them), the view fits the
    series' image; Close shows them again (one hidden before stays hidden), nothing changed."""
    viewer, main, series = series_page(make_napari_viewer)
    photo = viewer.add_image(np.full((400, 600), 7, np.uint8), name="photo")
    mask = viewer.add_labels(np.ones((400, 600), np.int32), name="photo labels")
    hidden = viewer.add_image(np.zeros((50, 50), np.uint8), name="hidden before", visible=False)
    series.set_folders(str(scenes), str(tmp_path / "ds"))
    with qtbot.waitSignal(series.image_shown, timeout=TIMEOUT_MS):
        series.open_series()
    ours = [series.view.image_layer.name, series.view.labels_layer.name]
    shown = [layer.name for layer in viewer.layers if layer.visible]
    assert shown == ours, shown  # the series' image under its labels, nothing else
    assert not photo.visible and not mask.visible and not hidden.visible
    names = [layer.name for layer in viewer.layers]
    assert names.index(ours[0]) < names.index(ours[1])
    step(qtbot, series, series.next)  # the next image: still on its own
    assert [layer.name for layer in viewer.layers if layer.visible] == [
        series.view.image_layer.name, series.view.labels_layer.name]
    series.close_series()
    assert photo.visible and mask.visible and not hidden.visible
    assert [layer.name for layer in viewer.layers] == ["photo", "photo labels", "hidden before"]
    assert (photo.data == 7).all() and (mask.data == 1).all()


def test_series_keys_work_after_clicking_a_page_button(make_napari_viewer, qtbot, scenes,
                                                       tmp_path):
    """Shift+Right / Shift+Left / Shift+Enter also work while the focus is on the dock (a page
    button just clicked), not only on the canvas; nothing happens with no series open."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    viewer, main, series = series_page(make_napari_viewer, show=True)
    series.set_folders(str(scenes), str(tmp_path / "ds"))
    with qtbot.waitSignal(series.image_shown, timeout=TIMEOUT_MS):
        series.open_series()
    window = series.window()
    window.activateWindow()  # Xvfb has no window manager to do it
    qtbot.waitUntil(window.isActiveWindow, timeout=10_000)
    qtbot.mouseClick(series.next_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: series.index == 1 and series.pending is None, timeout=TIMEOUT_MS)
    series.next_button.setFocus()
    # Image 4 is not labelled yet (only the next one is prepared): the buttons are disabled
    # while it is, and the focus they had stays on the page.
    step(qtbot, series, lambda: series.jump(4))
    assert series.index == 4
    assert series.isAncestorOf(QApplication.focusWidget())  # the focus is on the page

    def key(code):
        return lambda: qtbot.keyClick(QApplication.focusWidget(), code,
                                      Qt.KeyboardModifier.ShiftModifier)

    step(qtbot, series, key(Qt.Key.Key_Left))
    assert series.index == 3 and series.session.is_saved(4)
    step(qtbot, series, key(Qt.Key.Key_Right))
    assert series.index == 4 and series.session.is_saved(3)
    step(qtbot, series, key(Qt.Key.Key_Left))
    step(qtbot, series, key(Qt.Key.Key_Return))
    assert series.index == 4 and series.session.is_reviewed(3)
    series.close_series()
    qtbot.keyClick(QApplication.focusWidget(), Qt.Key.Key_Right, Qt.KeyboardModifier.ShiftModifier)
    assert series.session is None  # no series: the keys do nothing
