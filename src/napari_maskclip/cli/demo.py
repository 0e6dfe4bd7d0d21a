"""``napari-maskclip demo``: the whole workflow offline, with the tiny demo model.

With a display, napari opens with a synthetic shapes scene, the MaskCLIP widget docked and preset
to the demo model and its class names: press Run, fix the labels with the brush, export them,
train a student. Without a display (or with ``--headless``), the same scene is segmented through
the CLI path and the outputs are written to ``--out``: the usual three result files, the input
image, an overlay PNG (labels over the image), the exact mask of the synthetic scene and the
scores (IoU, mIoU) of the segmentation against it.

No network is needed: the demo model ships inside the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..demo.scene import DEMO_SEED, demo_classes, demo_scene
from ..engine.names import DEMO_MODEL

__all__ = ["register", "demo_scene", "overlay", "has_display"]


def has_display() -> bool:
    """Whether a GUI can open here (Linux needs X11 or Wayland; macOS and Windows have one)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def overlay(image, labels, colors, alpha: float = 0.55):
    """Labels coloured over an RGB uint8 image (background pixels keep the image)."""
    import numpy as np

    rgb = image[..., :3].astype(np.float32)
    palette = np.zeros((len(colors) + 1, 3), dtype=np.float32)
    for index, color in enumerate(colors, start=1):
        palette[index] = np.asarray(color[:3], dtype=np.float32) * 255.0
    painted = palette[labels]
    mask = (labels > 0)[..., None]
    out = np.where(mask, (1 - alpha) * rgb + alpha * painted, rgb)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _headless(args: argparse.Namespace) -> int:
    import imageio.v3 as iio
    import numpy as np

    from ..atomic import atomic_write, atomic_write_text
    from ..engine import Segmenter
    from ..evaluate import confusion_matrix, scores_from_confusion
    from ..image_files import write_label_image
    from ..progress import run_to_completion
    from ..result_files import write_result
    from .batch import progress_bar

    out = Path(args.out)
    scene = demo_scene(args.seed)
    classes, background = demo_classes()
    from ..demo import recommended_settings

    segmenter = Segmenter("demo", None, device=args.device, **recommended_settings())
    bar, update = progress_bar("demo scene", disable=args.quiet)
    try:
        result = run_to_completion(segmenter.run_iter(scene.image, classes, background=background),
                                   update)
    finally:
        bar.close()
    files = write_result(result, out, "demo_scene", extra={"source_image": "demo_scene_image.png"})
    with atomic_write(out / "demo_scene_image.png") as tmp:
        iio.imwrite(tmp, scene.image, extension=".png")
    with atomic_write(out / "demo_scene_overlay.png") as tmp:
        iio.imwrite(tmp, overlay(scene.image, result.labels, result.colors), extension=".png")
    # The exact mask in a folder of its own, named by the scene's stem, so that
    # `napari-maskclip evaluate OUT OUT/truth` pairs it with demo_scene_labels.png as it is.
    truth = out / "truth" / "demo_scene.png"
    write_label_image(truth, scene.mask, result.colors)
    names = ["background", *result.class_names]
    cm = confusion_matrix(result.labels, scene.mask, len(names))
    scores = scores_from_confusion(cm, names, n_images=1)
    scores_path = atomic_write_text(out / "demo_scene_scores.json",
                                    json.dumps(scores.to_dict(), indent=2))
    print(f"model: {segmenter.loaded.describe()}")
    written = [files.labels_path, files.confidence_path, files.classes_path,
               out / "demo_scene_image.png", out / "demo_scene_overlay.png", truth, scores_path]
    print("wrote " + ", ".join(str(p) for p in written if p is not None))
    print(f"mIoU against the scene's exact mask: {100 * scores.miou:.1f} "
          f"(pixel accuracy {100 * scores.pixel_accuracy:.1f}); the same with "
          f"'napari-maskclip evaluate {out} {out / 'truth'}'")
    print("Next: open napari with a display (napari-maskclip demo), or try "
          "'napari-maskclip segment IMAGE --model demo --templates single --window 64 --stride 16 "
          "--classes \"red circle, blue square\" --background background --out DIR'.")
    return 0


def _gui(args: argparse.Namespace) -> int:
    # The engine (torch, open_clip, and Triton with them) must load before napari creates an
    # OpenGL canvas: Triton loaded after Mesa's LLVM crashes the process.
    import napari_maskclip.plugin.models  # noqa: F401  (hides Triton inside napari)
    import napari_maskclip.engine.loading  # noqa: F401
    import napari

    from ..plugin.sample_data import shapes

    viewer = napari.Viewer(title="napari-maskclip demo")
    for data, kwargs in shapes():
        viewer.add_image(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-maskclip", "MaskCLIP segmentation")
    _preset(widget)
    napari.run()
    return 0


def _preset(widget: Any) -> None:
    """Point the widget at the demo model, with its preset, and its classes (the sample's
    suggestions), whatever the widget remembered from an earlier launch."""
    classes, background = demo_classes()
    widget.use_model(DEMO_MODEL)
    widget.classes.text.setPlainText(classes)
    widget.classes.background.setEditText(background)


def _run(args: argparse.Namespace) -> int:
    if args.headless or not has_display():
        if not args.headless:
            print("No display found: running the demo headless (use --headless to skip this "
                  "check).", file=sys.stderr)
        return _headless(args)
    try:
        import napari  # noqa: F401
        from qtpy import QtCore  # noqa: F401
    except Exception as exc:  # napari or a Qt binding missing: the CLI demo still works
        print(f"napari cannot start ({exc}); running the demo headless. Install the GUI with "
              "pip install 'napari-maskclip[all]'.", file=sys.stderr)
        return _headless(args)
    return _gui(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the offline demo: napari with the widget on a synthetic scene (headless: CLI outputs)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--headless", action="store_true",
                        help="do not open napari; segment the demo scene and write the outputs.")
    parser.add_argument("--out", default="demo-output", metavar="DIR",
                        help="output folder for the headless demo (default: demo-output).")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="which synthetic scene.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps.")
    parser.add_argument("--quiet", action="store_true", help="no progress bar.")
    parser.set_defaults(func=_run)
