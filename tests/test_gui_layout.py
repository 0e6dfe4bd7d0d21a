"""The plugin's one dock fits the screen: at 1280x800 and 1600x1200, with a fresh config and with
one full of long remembered lists and paths, no page scrolls sideways and every button of every
page (Segment, Export, Train) is inside the dock and in sight. The menu entries open pages of that
one dock, and the camera shows the whole image once the dock is in.

pytest-xvfb's screen is 1600x1200 (pyproject.toml), so both window sizes are real.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from qtpy.QtCore import QPoint, QRect
from qtpy.QtWidgets import QApplication, QPushButton, QScrollArea, QSpinBox

from napari_maskclip.plugin._qt.docks import (
    EXPORT_NAME,
    PAGES,
    PLUGIN,
    SEGMENT_NAME,
    SERIES_NAME,
    TRAIN_NAME,
)
from napari_maskclip.plugin.preferences import preferences_path

from hang_guard import HANG_GUARD_MS

SIZES = [(1280, 800), (1600, 1200)]
LONG_FOLDER = "/".join(["a_rather_long_folder_name_that_goes_on_and_on"] * 5)


def _write_long_config(tmp_path) -> None:
    """A preferences file as a long-time user has it: a 1000+ px class list, long paths, and a
    student checkpoint with a long file name."""
    long_list = ", ".join(f"class number {i} with a descriptive name" for i in range(30))
    student = tmp_path / ("student_trained_on_everything_" + "x" * 60 + ".safetensors")
    student.write_bytes(b"")  # listed only (reading it happens when chosen)
    prefs = {
        "recent_classes": [long_list, "cat, dog"],
        "recent_background": [long_list],
        "model": LONG_FOLDER + "/open_clip_model_config.json",
        "pretrained": LONG_FOLDER + "/clip_weights.safetensors",
        "recent_students": [str(student)],
        "last_dataset": LONG_FOLDER + "/dataset",
    }
    path = preferences_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prefs))


def _settle(qtbot, ms: int = 50) -> None:
    for _ in range(5):
        QApplication.processEvents()
        qtbot.wait(ms // 5)


def _open(make_napari_viewer, qtbot, size):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(*size)
    name = "an image layer with a very long name " * 4
    viewer.add_image(np.zeros((300, 400), dtype=np.uint8), name=name.strip())
    _, main = viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT_NAME)
    _settle(qtbot, 200)
    return viewer, main


def _dock_of(widget):
    from qtpy.QtWidgets import QDockWidget

    while widget is not None and not isinstance(widget, QDockWidget):
        widget = widget.parentWidget()
    return widget


def _inside(outer: QRect, inner: QRect) -> bool:
    return outer.contains(inner.topLeft()) and outer.contains(inner.bottomRight())


def _check_page(main, page_name: str, window_size) -> list[str]:
    """Everything wrong with the page now shown (empty = it fits)."""
    problems = []
    dock = _dock_of(main)
    window = dock.window()
    width, height = window_size
    if window.width() != width or window.height() != height:
        problems.append(f"window is {window.width()}x{window.height()}, not {width}x{height} "
                        "(run under xvfb-run -s '-screen 0 1600x1200x24')")
    if dock.width() > 0.4 * window.width():
        problems.append(f"dock {dock.width()} px wide in a {window.width()} px window")
    dock_rect = QRect(dock.mapTo(window, QPoint(0, 0)), dock.size())
    if not _inside(window.rect(), dock_rect):
        problems.append(f"dock {dock_rect} outside the window {window.rect()}")
    page = main.pages.currentWidget()
    for scroll in page.findChildren(QScrollArea):
        if scroll.horizontalScrollBar().isVisible():
            problems.append(f"{page_name}: horizontal scrollbar")
    for button in page.findChildren(QPushButton):
        if not button.isVisibleTo(main):
            continue  # hidden on purpose (e.g. "Use this student" before training)
        label = f"{page_name}: button {button.text()!r}"
        rect = QRect(button.mapTo(dock, QPoint(0, 0)), button.size())
        if not _inside(dock.rect(), rect):
            problems.append(f"{label} at {rect} outside the dock {dock.rect()}")
        scroll = next((s for s in page.findChildren(QScrollArea) if s.isAncestorOf(button)), None)
        if scroll is not None:
            view = scroll.viewport()
            in_view = QRect(button.mapTo(view, QPoint(0, 0)), button.size())
            if not _inside(view.rect(), in_view):
                problems.append(f"{label} scrolled out of sight ({in_view} in {view.rect()})")
        if button.visibleRegion().boundingRect() != button.rect():
            problems.append(f"{label} partly hidden ({button.visibleRegion().boundingRect()})")
    for spin in page.findChildren(QSpinBox):
        if spin.isVisibleTo(main) and spin.width() < spin.sizeHint().width():
            problems.append(f"{page_name}: spin box {spin.suffix()!r} clipped "
                            f"({spin.width()} < {spin.sizeHint().width()} px)")
    return problems


@pytest.mark.parametrize("config", ["fresh", "long"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_page_fits(make_napari_viewer, qtbot, tmp_path, size, config):
    if config == "long":
        _write_long_config(tmp_path)
    viewer, main = _open(make_napari_viewer, qtbot, size)
    if config == "long":
        assert main.classes.recent.count() == 3  # the long list is there, elided
        assert main.classes.recent.itemData(1, 3) == main.classes.recent.itemText(1)  # tooltip
    problems = []
    for page in PAGES:
        main.show_page(page)
        _settle(qtbot)
        assert main.current_page() == page
        problems += _check_page(main, page, size)
    main.status.setText("Exported to " + LONG_FOLDER + " (a status line with a long path).")
    main.show_page(PAGES[0])
    _settle(qtbot)
    problems += _check_page(main, "Segment with a long status", size)
    assert not problems, "\n".join(problems)


def test_menu_entries_open_pages_of_one_dock(make_napari_viewer, qtbot):
    """Each widget contribution (what napari's Plugins menu opens) gives the same one dock, at its
    page; the opener's own placeholder dock goes away."""
    viewer = make_napari_viewer(show=True)
    for name, page in ((EXPORT_NAME, "Export"), (TRAIN_NAME, "Train"), (SERIES_NAME, "Series"),
                       (SEGMENT_NAME, "Segment")):
        _, opened = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        _settle(qtbot)
        main = opened if name == SEGMENT_NAME else opened.main
        if name == SEGMENT_NAME:  # napari returns the dock already open, as it is
            main.show_page(page)
        assert main.current_page() == page
        docks = [key for key in viewer.window.dock_widgets if "MaskCLIP" in key or
                 "Export" in key or "Train" in key or "Annotate" in key]
        assert len(docks) == 1 and docks[0].startswith(SEGMENT_NAME), docks
        assert _dock_of(main).isVisible()
    # Buttons of the Segment page switch pages of the same dock.
    assert main.open_export() is main.export_page and main.current_page() == "Export"
    assert main.open_train() is main.train_page and main.current_page() == "Train"


def test_camera_fits_image_after_dock(make_napari_viewer, qtbot):
    """Adding the dock narrows the canvas; the camera is reset so the whole image is in view."""
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1280, 800)
    _settle(qtbot, 100)
    viewer.add_image(np.zeros((192, 256), dtype=np.uint8))  # wide, like the demo scene
    _settle(qtbot, 100)
    viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT_NAME)
    _settle(qtbot, 300)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9
    zoom = camera.zoom
    viewer.reset_view()  # what fits the canvas as it is now, with the dock
    print(f"zoom after the dock: {zoom:.4f}, fitted: {camera.zoom:.4f}")
    assert zoom == pytest.approx(camera.zoom, rel=1e-3)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_series_page_fits_with_a_series_open(make_napari_viewer, qtbot, tmp_path, size):
    """The Series page with a folder open (long paths, a long status line): no sideways scroll,
    Open/Cancel/Close and Previous/Next/Mark reviewed all in sight."""
    import imageio.v3 as iio

    from napari_maskclip.demo.scene import demo_classes, demo_scene

    folder = tmp_path / ("images_" + "x" * 80)
    folder.mkdir()
    for k in range(2):
        iio.imwrite(folder / f"a_scene_with_a_rather_long_file_name_{k}.png",
                    demo_scene(seed=k).image)
    viewer, main = _open(make_napari_viewer, qtbot, size)
    classes, background = demo_classes()
    main.use_model("demo")
    main.classes.text.setPlainText(classes)
    series = main.show_page("Series")
    series.set_folders(str(folder), str(tmp_path / ("dataset_" + "y" * 80)))
    with qtbot.waitSignal(series.image_shown, timeout=HANG_GUARD_MS):
        series.open_series()
    _settle(qtbot)
    buttons = [series.open_button, series.cancel_button, series.close_button,
               series.previous_button, series.next_button, series.reviewed_button]
    assert all(button.isVisibleTo(main) for button in buttons)
    assert series.next_button.isEnabled() and series.reviewed_button.isEnabled()
    problems = _check_page(main, "Series (open)", size)
    series.status.setText("Skipped (unreadable): " + LONG_FOLDER)
    _settle(qtbot)
    problems += _check_page(main, "Series with a long status", size)
    series.close_series()
    assert not problems, "\n".join(problems)


# ---- the view fits the image (issue 20) -----------------------------------------------------------
def _outside_canvas(viewer, layer) -> list[str]:
    """How ``layer``'s image lies outside the canvas (empty: all of it is in view): its corners
    in canvas pixels, from the camera (center, zoom) and the canvas size, public napari API."""
    height, width = viewer.canvas.size
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    cy, cx = camera.center[-2:]
    rows, cols = layer.data.shape[-3:-1] if layer.rgb else layer.data.shape[-2:]
    problems = []
    for y, x in ((-0.5, -0.5), (rows - 0.5, cols - 0.5)):
        wy, wx = layer.data_to_world((y, x))[-2:]
        px, py = (wx - cx) * camera.zoom + width / 2, (wy - cy) * camera.zoom + height / 2
        if not (-1 <= px <= width + 1 and -1 <= py <= height + 1):
            problems.append(f"corner ({y}, {x}) of '{layer.name}' at canvas ({px:.0f}, "
                            f"{py:.0f}), outside the {width}x{height} canvas")
    return problems


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_view_fits_the_image_after_run(make_napari_viewer, qtbot, size):
    """The Shapes scene sample, Run with the demo model: the whole image stays in the canvas (a
    long confidence colormap name widened napari's layer controls and cut its right part), also
    after a second run with long class names."""
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(*size)
    _, main = viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT_NAME)
    _settle(qtbot, 100)
    (scene,) = viewer.open_sample(PLUGIN, "shapes")
    main.model.device.setCurrentText("cpu")
    _settle(qtbot, 200)
    assert main.image.current_layer() is scene and main.model.model.currentText() == "demo"
    assert _outside_canvas(viewer, scene) == []
    problems = []
    for classes in (None, "a red triangle in the upper left corner, "
                          "a green circle that is somewhat bigger than the others"):
        if classes is not None:
            main.classes.text.setPlainText(classes)
        with qtbot.waitSignal(main.run_finished, timeout=120_000) as blocker:
            main.run()
        qtbot.waitUntil(lambda: not main.running, timeout=120_000)
        assert blocker.args == ["done"], main.status.text()
        _settle(qtbot, 300)  # the layer controls and the canvas have their new sizes
        problems += _outside_canvas(viewer, scene)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_view_fits_a_series_image(make_napari_viewer, qtbot, tmp_path, size):
    """A Series image opens in a viewer that already holds another image (of another size): the
    view fits the series image, also when the next one has another size."""
    import imageio.v3 as iio

    from napari_maskclip.demo.scene import demo_classes, demo_scene

    folder = tmp_path / "images"
    folder.mkdir()
    wide = np.kron(demo_scene(seed=1).image, np.ones((3, 3, 1), np.uint8))  # 576 x 768
    iio.imwrite(folder / "a1.png", wide)
    iio.imwrite(folder / "a2.png", demo_scene(seed=2).image[:96])  # 96 x 256
    viewer, main = _open(make_napari_viewer, qtbot, size)  # holds a 300 x 400 image
    classes, background = demo_classes()
    main.use_model("demo")
    main.model.device.setCurrentText("cpu")
    main.classes.text.setPlainText(classes)
    series = main.show_page("Series")
    series.set_folders(str(folder), str(tmp_path / "dataset"))
    with qtbot.waitSignal(series.image_shown, timeout=120_000):
        series.open_series()
    _settle(qtbot, 300)
    problems = _outside_canvas(viewer, series.view.image_layer)
    with qtbot.waitSignal(series.image_shown, timeout=120_000):
        series.next()
    qtbot.waitUntil(lambda: series.pending is None, timeout=120_000)
    _settle(qtbot, 300)
    layer = series.view.image_layer
    problems += _outside_canvas(viewer, layer)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    zoom = camera.zoom
    viewer.reset_view(layers=[layer])
    assert zoom == pytest.approx(camera.zoom, rel=1e-3)  # fitted, not just inside
    series.close_series()
    assert not problems, "\n".join(problems)
