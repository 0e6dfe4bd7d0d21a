"""``napari-maskclip annotate IMAGE_FOLDER --dataset DS``: napari on the Series page, folder loaded.

Opens napari with the plugin's dock at its Series page, the image folder (or list file) and the
dataset filled in and opened: the first image not saved yet is shown, labelled by MaskCLIP with
``--classes`` (``--model``: ViT-B-16 by default, ``demo`` for the shipped tiny model) or by a
trained ``--student``. Next / Previous save into the dataset;
reopening the same folder and dataset resumes. Without a display it prints one line and exits
non-zero (the annotator is a window; ``segment`` and ``predict`` label folders without one).

The plugin (napari, Qt) is imported only when the command runs, never when the CLI loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .demo import has_display

__all__ = ["register"]


def _check(args: argparse.Namespace) -> None:
    """Refuse now, in one line, what the page would refuse later (no window opened for it)."""
    from ..series import list_images

    if not args.student and not (args.classes or "").strip():
        raise InvalidInputError("Give the class names (--classes \"cat, dog\") or a trained "
                                "student (--student CHECKPOINT).")
    if args.student and not Path(args.student).expanduser().is_file():
        raise InvalidInputError(f"Student checkpoint not found: {args.student}")
    images = list_images(args.images, recursive=args.recursive)
    if len(images) == 0:
        raise InvalidInputError(f"No images (png, jpg, tif, bmp) in {args.images}.")
    if args.add_classes and not args.remap:
        raise InvalidInputError("--add-classes needs --remap (it appends to the dataset's list "
                                "the classes a remap cannot find there).")
    if not args.student:  # the dataset's class rules, as the page will apply them on Open
        from ..series import SeriesSession

        SeriesSession.open(images, args.dataset, args.classes, background=args.background,
                           remap=args.remap, add_classes=args.add_classes)


def _gui(args: argparse.Namespace) -> int:
    # The engine (torch, open_clip, and Triton with them) must load before napari creates an
    # OpenGL canvas (see `demo`).
    import napari_maskclip.plugin.models  # noqa: F401  (hides Triton inside napari)
    import napari_maskclip.engine.loading  # noqa: F401
    import napari

    from ..plugin._qt.docks import PAGE_SERIES, SEGMENT_NAME, main_panel
    from ..plugin._qt.segment_panel import MaskClipWidget

    viewer = napari.Viewer(title="napari-maskclip annotate")
    main = main_panel(viewer, factory=MaskClipWidget)
    _preset(main, args)
    series = main.show_page(PAGE_SERIES)
    series.set_folders(args.images, args.dataset, recursive=args.recursive, remap=args.remap,
                       add_classes=args.add_classes)
    series.open_series()
    napari.run()
    return 0


def _preset(main: Any, args: argparse.Namespace) -> None:
    """The Segment page as the command line says (the Series page takes its choices from it)."""
    if args.student:
        if not main.use_student(str(Path(args.student).expanduser())):
            raise InvalidInputError(f"{args.student} is not a readable student checkpoint.")
        main.classes.text.setPlainText(args.classes or "")
        return
    main.use_model(args.model)
    if args.pretrained is not None:
        main.model.pretrained.setCurrentText(args.pretrained)
    main.model.device.setCurrentText(args.device)
    main.classes.text.setPlainText(args.classes)
    if args.background is not None:
        main.classes.background.setEditText(args.background)


def _run(args: argparse.Namespace) -> int:
    if not has_display():
        raise InvalidInputError(
            "annotate opens napari and needs a display (none found); run it on a desktop, or "
            "label the folder without one with 'napari-maskclip segment'."
        )
    _check(args)
    try:
        import napari  # noqa: F401
        from qtpy import QtCore  # noqa: F401
    except Exception as exc:  # napari or a Qt binding missing
        raise InvalidInputError(f"napari cannot start ({exc}); install the GUI with "
                                "pip install 'napari-maskclip[all]'.") from exc
    return _gui(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "annotate",
        help="annotate a folder in napari, one image at a time, into a dataset (Series page)",
        description="Open napari on the Series page with IMAGE_FOLDER and the dataset loaded: "
        "the first image not saved yet is shown, labelled by MaskCLIP (--classes) or a trained "
        "student (--student). Next/Previous (Shift+Right/Left) save into the dataset; reopening "
        "resumes.",
    )
    parser.add_argument("images", metavar="IMAGE_FOLDER",
                        help="folder of images (png, jpg, tif, bmp) or a text file listing them")
    parser.add_argument("--dataset", required=True, metavar="DS",
                        help="dataset folder the labels are saved into (created on the first save)")
    parser.add_argument("--recursive", action="store_true", help="include sub-folders.")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--classes", help='class names, e.g. "cat; kitten, dog" (MaskCLIP).')
    who.add_argument("--student", metavar="S", help="a trained MaskCLIP+ student checkpoint.")
    parser.add_argument("--background", default=None, help="background names (MaskCLIP).")
    parser.add_argument("--model", default="ViT-B-16",
                        help="open_clip model for MaskCLIP, or 'demo' (default: ViT-B-16).")
    parser.add_argument("--pretrained", default=None,
                        help="weights tag or file (default: the model's usual weights).")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps.")
    parser.add_argument("--remap", action="store_true",
                        help="a dataset with another class list: map the classes onto it by name")
    parser.add_argument("--add-classes", action="store_true",
                        help="with --remap: append classes the dataset lacks to its list")
    parser.set_defaults(func=_run)
