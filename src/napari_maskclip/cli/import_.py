"""``napari-maskclip import SRC --out DATASET``: an existing labelled dataset as a napari-maskclip
dataset (human labels: every pixel marked as edited).

    napari-maskclip import instances_val2017.json --images val2017/ --out coco_val/
    napari-maskclip import VOCdevkit/VOC2012 --split val --out voc_val/
    napari-maskclip import photos/ --masks labels/ --classes "cat, dog" --out mine/

SRC is a COCO instance file (``.json``), a VOC-style folder (``JPEGImages/`` +
``SegmentationClass/``) or a folder of images (with ``--masks``). Images that cannot be imported
are skipped and counted on stderr (``--strict`` stops instead). The rules are in
:mod:`napari_maskclip.export.import_coco` and :mod:`napari_maskclip.export.import_folders`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidInputError

__all__ = ["register"]


def _detect(args: argparse.Namespace) -> str:
    from ..export.import_folders import is_voc_folder

    src = Path(args.src)
    if args.format != "auto":
        return args.format
    if src.is_file() and src.suffix.lower() == ".json":
        return "coco"
    if src.is_dir() and is_voc_folder(src):
        return "voc"
    if src.is_dir() and args.masks:
        return "masks"
    if not src.exists():
        raise InvalidInputError(f"{src} does not exist.")
    raise InvalidInputError(
        f"Cannot tell what {src} is: give a COCO .json file, a VOC folder (JPEGImages/ + "
        "SegmentationClass/), or a folder of images with --masks DIR and --classes."
    )


def _plan(args: argparse.Namespace):
    from ..export.importing import class_list

    fmt = _detect(args)
    background = args.background or "background"
    classes = None
    if args.classes is not None or args.classes_file is not None:
        if fmt == "coco":
            raise InvalidInputError(
                "--classes/--classes-file do not apply to COCO files: their "
                "categories name the classes."
            )
        classes = class_list(args.classes, args.classes_file, background)
    misplaced = [
        flag
        for flag, value, formats in (
            ("--images", args.images, ("coco",)),
            ("--crowd", args.crowd, ("coco",)),
            ("--split", args.split, ("voc",)),
            ("--masks", args.masks, ("masks",)),
            ("--ignore-index", args.ignore_index, ("masks",)),
        )
        if value is not None and fmt not in formats
    ]
    if misplaced:
        raise InvalidInputError(f"{', '.join(misplaced)} cannot be used when importing {fmt}.")
    if fmt == "coco":
        from ..export.import_coco import plan_coco

        return plan_coco(
            args.src,
            images_dir=args.images,
            background=background,
            crowd=args.crowd or "ignore",
            max_pixels=args.max_pixels,
        )
    if fmt == "voc":
        from ..export.import_folders import plan_voc

        return plan_voc(
            args.src,
            split=args.split,
            classes=classes,
            background=background,
            max_pixels=args.max_pixels,
        )
    from ..export.import_folders import plan_mask_folder

    if not args.masks:
        raise InvalidInputError("Importing a folder of images needs --masks DIR (the label masks).")
    if classes is None:
        raise InvalidInputError(
            "Name the mask values' classes: --classes 'cat, dog' (label 1, 2, "
            "...) or --classes-file FILE."
        )
    return plan_mask_folder(
        args.src, args.masks, classes, ignore_index=args.ignore_index, max_pixels=args.max_pixels
    )


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..export.importing import import_plan_iter
    from ..progress import run_to_completion

    plan = _plan(args)
    bar = tqdm(
        total=len(plan.items),
        desc="import",
        unit="image",
        file=sys.stderr,
        disable=args.quiet,
        leave=False,
    )

    def show(progress) -> None:
        bar.n = progress.done
        bar.refresh()

    with bar:
        report = run_to_completion(
            import_plan_iter(
                plan,
                args.out,
                overwrite=args.overwrite,
                remap=args.remap,
                add_classes=args.add_classes,
                strict=args.strict,
            ),
            show,
        )
    for note in report.notes():
        print(f"note: {note}", file=sys.stderr)
    print(report.summary())
    return 0


def _pixels(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number of pixels, got {text}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..export.importing import MAX_IMAGE_PIXELS

    parser = subparsers.add_parser(
        "import",
        help="make a dataset from COCO instances, a VOC folder, or images + masks",
        description="Make (or append to) a napari-maskclip dataset from existing labels, which "
        "become human labels (every pixel edited). SRC: a COCO instance file (.json), a "
        "VOC-style folder (JPEGImages/ + SegmentationClass/), or a folder of images with "
        "--masks. Images that cannot be imported are skipped and counted (--strict: stop).",
    )
    parser.add_argument("src", metavar="SRC", help="COCO .json, VOC folder, or images folder")
    parser.add_argument(
        "--out", required=True, metavar="DATASET", help="dataset folder (created or appended to)"
    )
    parser.add_argument(
        "--format",
        choices=("auto", "coco", "voc", "masks"),
        default="auto",
        help="what SRC is (default: detected)",
    )
    coco = parser.add_argument_group("COCO")
    coco.add_argument(
        "--images",
        metavar="DIR",
        default=None,
        help="folder the file names are relative to (default: the JSON's folder)",
    )
    coco.add_argument(
        "--crowd",
        choices=("ignore", "class"),
        default=None,
        help="crowd regions become ignore (255, default) or their class",
    )
    voc = parser.add_argument_group("VOC")
    voc.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="only the images of ImageSets/Segmentation/NAME.txt (or a .txt list)",
    )
    masks = parser.add_argument_group("images + masks")
    masks.add_argument(
        "--masks",
        metavar="DIR",
        default=None,
        help="folder of label masks, paired by stem (<stem>.png, <stem>_labels.png, ...)",
    )
    masks.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        metavar="N",
        help="mask value meaning 'not labelled' (default 255; 65535 beyond 254 classes)",
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="class names for labels 1, 2, ... ('cat, dog; puppy'); VOC: replaces "
        "the 20 VOC classes",
    )
    parser.add_argument(
        "--classes-file",
        default=None,
        metavar="FILE",
        help="the class list as a file: one class per line, or a classes.json",
    )
    parser.add_argument(
        "--background", default=None, metavar="NAME", help="name of label 0 (default 'background')"
    )
    parser.add_argument(
        "--max-pixels",
        type=_pixels,
        default=MAX_IMAGE_PIXELS,
        metavar="N",
        help=f"skip images larger than N pixels (default {MAX_IMAGE_PIXELS})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace samples that exist")
    parser.add_argument(
        "--remap", action="store_true", help="map a different class list onto the dataset's by name"
    )
    parser.add_argument(
        "--add-classes", action="store_true", help="with --remap: append classes the dataset lacks"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first image that cannot be imported instead of skipping it",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
