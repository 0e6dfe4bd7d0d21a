#!/usr/bin/env python
"""Render the README screenshot: napari with the MaskCLIP widget docked and a result shown.

Runs offscreen under a virtual X server (no display needed)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python tools/screenshot.py

Model choice (``--model auto``, the default): the shipped demo model on a synthetic scene of
coloured shapes when its files exist in ``src/napari_maskclip/demo/``; otherwise the tiny random
ViT of the tests (``tests/data/tiny_vit.json`` with a random checkpoint saved to a temporary
folder) on the coffee sample, which shows the interface but not a meaningful segmentation. The
script prints which one it used, for the README caption. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _demo_available() -> bool:
    demo = ROOT / "src" / "napari_maskclip" / "demo"
    return (demo / "toy_clip.json").is_file() and (demo / "toy_clip.safetensors").is_file()


def _tiny_random_checkpoint(folder: Path) -> tuple[str, str]:
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    config = ROOT / "tests" / "data" / "tiny_vit.json"
    torch.manual_seed(0)
    model = open_clip.CLIP(**json.loads(config.read_text()))
    path = folder / "tiny_vit_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(config), str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "napari-widget.png"))
    parser.add_argument("--model", choices=["auto", "demo", "tiny"], default="auto")
    parser.add_argument("--size", default="1600x1200", help="window size, WIDTHxHEIGHT")
    parser.add_argument("--series", action="store_true",
                        help="show the Series page on a folder of synthetic scenes (demo model) "
                        "after one edited image was saved")
    parser.add_argument("--settings", action="store_true",
                        help="scroll the Segment page to its Settings section")
    parser.add_argument("--preset", default=None,
                        help="after the run, choose this paper preset (shows the fields it sets)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="after the run (and preset), set the temperature field")
    parser.add_argument("--regions-layer", action="store_true",
                        help="after the run, add a Labels layer of the image's size and choose it "
                        "as regions")
    args = parser.parse_args(argv)
    if args.series:
        return _series(args)
    use_demo = args.model == "demo" or (args.model == "auto" and _demo_available())

    scratch = Path(tempfile.mkdtemp(prefix="maskclip-screenshot-"))
    os.environ.setdefault("NAPARI_MASKCLIP_CONFIG_DIR", str(scratch / "config"))
    os.environ.setdefault("NAPARI_MASKCLIP_CACHE_DIR", str(scratch / "cache"))
    os.environ["NAPARI_CONFIG"] = str(scratch / "napari-settings.yaml")  # never the user's
    import open_clip  # noqa: F401  (load torch's stack before the canvas; see plugin/models.py)
    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend")

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget

    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "error"  # no toasts over the picture
    viewer = napari.Viewer(title="napari-maskclip")
    width, height = (int(v) for v in args.size.lower().split("x"))
    viewer.window.resize(width, height)
    background = None
    if use_demo:
        from napari_maskclip.demo.scene import demo_classes

        viewer.open_sample("napari-maskclip", "shapes")  # what `napari-maskclip demo` shows
        classes, background = demo_classes()
        model, pretrained, caption = "demo", "", "the shipped demo model on a synthetic scene"
    else:
        viewer.open_sample("napari-maskclip", "coffee")
        classes = "coffee cup; mug, saucer; plate, spoon"
        model, pretrained = _tiny_random_checkpoint(scratch)
        caption = "a tiny random-weight test model (interface only, not a real segmentation)"

    widget = MaskClipWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MaskCLIP segmentation", area="right")
    widget.model.model.setCurrentText(model)
    widget.model.pretrained.setCurrentText(pretrained)
    widget.model.device.setCurrentText("cpu")
    widget.classes.text.setPlainText(classes)
    if background is not None:
        widget.classes.background.setEditText(background)

    finished: list[str] = []
    widget.run_finished.connect(finished.append)
    widget.run()
    deadline = time.monotonic() + 600
    while (not finished or widget.running) and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    if finished != ["done"]:
        print(f"run did not finish: {finished} {widget.status.text()}", file=sys.stderr)
        return 1
    labels = widget.last_report.labels_layer
    if args.regions_layer:
        viewer.add_labels(np.zeros(labels.data.shape, dtype=np.int32), name="cellpose masks")
        widget.settings.regions.setCurrentText("layer: cellpose masks")
    if args.preset:
        widget.settings.choose_preset(args.preset)
    if args.temperature is not None:  # a field changed after the preset
        widget.settings.temperature.setValue(args.temperature)
    viewer.layers.selection.active = labels
    for _ in range(20):  # let the canvas and the docks paint
        QApplication.processEvents()
        time.sleep(0.02)
    if args.settings:  # once the page's layout has settled (wrapped notes change its height)
        from qtpy.QtWidgets import QScrollArea

        scroll = widget.pages.currentWidget().findChildren(QScrollArea)[0]
        scroll.verticalScrollBar().setValue(widget.settings.y())
        for _ in range(10):
            QApplication.processEvents()
            time.sleep(0.02)
    _save_screenshot(viewer, args.out, f"model: {caption}")
    viewer.close()
    return 0


def _save_screenshot(viewer, path: str, note: str) -> None:
    """The whole window as a PNG at ``path`` (written atomically), and one line saying so."""
    import imageio.v3 as iio
    import numpy as np

    from napari_maskclip.atomic import atomic_write

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = viewer.screenshot(canvas_only=False, flash=False)
    with atomic_write(out) as tmp:
        iio.imwrite(tmp, np.asarray(image), extension=".png")
    print(f"wrote {out} ({image.shape[1]}x{image.shape[0]}); {note}")


def _series(args: argparse.Namespace) -> int:
    """The Series page on eight synthetic scenes: the first edited and saved with Next, the
    second on screen, labelled by the demo model (prefetched)."""
    scratch = Path(tempfile.mkdtemp(prefix="maskclip-screenshot-"))
    os.environ.setdefault("NAPARI_MASKCLIP_CONFIG_DIR", str(scratch / "config"))
    os.environ.setdefault("NAPARI_MASKCLIP_CACHE_DIR", str(scratch / "cache"))
    os.environ["NAPARI_CONFIG"] = str(scratch / "napari-settings.yaml")  # never the user's
    import open_clip  # noqa: F401  (load torch's stack before the canvas; see plugin/models.py)
    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend")
    import imageio.v3 as iio
    import napari
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    from napari_maskclip.demo.scene import demo_classes, demo_scene
    from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget

    folder = scratch / "scenes"
    folder.mkdir()
    for k in range(8):
        iio.imwrite(folder / f"scene{k + 1:02d}.png", demo_scene(seed=10 + k).image)
    get_settings().application.gui_notification_level = "error"
    viewer = napari.Viewer(title="napari-maskclip")
    width, height = (int(v) for v in args.size.lower().split("x"))
    viewer.window.resize(width, height)
    widget = MaskClipWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MaskCLIP segmentation", area="right")
    classes, background = demo_classes()
    widget.use_model("demo")
    widget.model.device.setCurrentText("cpu")
    widget.classes.text.setPlainText(classes)
    widget.classes.background.setEditText(background)
    series = widget.show_page("Series")
    series.set_folders(str(folder), str(scratch / "dataset"))

    def wait(condition, seconds: float = 300) -> bool:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)
        return condition()

    series.open_series()
    if not wait(lambda: series.index == 0):
        print(f"series did not open: {series.status.text()}", file=sys.stderr)
        return 1
    layer = series.view.labels_layer
    layer.data[40:90, 40:110] = 1  # a person's fix
    layer.refresh()
    wait(lambda: series.prefetcher.ready(1))
    series.next()
    if not wait(lambda: series.index == 1 and series.pending is None):
        print(f"Next did not finish: {series.status.text()}", file=sys.stderr)
        return 1
    viewer.reset_view()
    for _ in range(30):  # let the canvas and the docks paint
        QApplication.processEvents()
        time.sleep(0.02)
    _save_screenshot(viewer, args.out, series.progress.text())
    series.close_series()
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
