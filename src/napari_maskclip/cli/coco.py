"""``napari-maskclip export-coco DATASET --out instances.json``: a dataset as COCO instances.

One annotation per connected component of each class (RLE masks, holes kept), categories from
``classes.json`` (background is not a category, ignored pixels are never annotated), file names
relative to the dataset, and each annotation's share of human-painted pixels in
``napari_maskclip.human_fraction``. The rules are in :mod:`napari_maskclip.export.coco`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..export.coco import export_coco_iter
    from ..progress import run_to_completion

    bar = tqdm(
        total=0, desc="export-coco", unit="sample", file=sys.stderr, disable=args.quiet, leave=False
    )

    def show(progress) -> None:
        bar.total = progress.total
        bar.n = progress.done
        bar.refresh()

    with bar:
        report = run_to_completion(
            export_coco_iter(
                args.dataset,
                args.out,
                connectivity=args.connectivity,
                min_area=args.min_area,
                overwrite=args.overwrite,
            ),
            show,
        )
    if report.skipped_mask_only:
        print(
            f"note: {len(report.skipped_mask_only)} mask-only sample(s) have no image and were "
            f"skipped (e.g. {report.skipped_mask_only[0]})",
            file=sys.stderr,
        )
    dataset = Path(args.dataset).resolve()
    if Path(args.out).resolve().parent != dataset:
        print(
            f"note: its file names are relative to the dataset: import it with --images {dataset}",
            file=sys.stderr,
        )
    print(report.summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-coco",
        help="write a dataset as a COCO instance-segmentation file",
        description="Write a COCO instances JSON from a dataset folder: one annotation per "
        "connected component of each class (RLE masks, holes kept), category ids = the "
        "dataset's labels (background is not a category, ignored pixels are never annotated), "
        "file names relative to the dataset, human-painted share per annotation in "
        "napari_maskclip.human_fraction. Needs pycocotools (pip install 'napari-maskclip[coco]').",
    )
    parser.add_argument("dataset", metavar="DATASET", help="a napari-maskclip dataset folder")
    parser.add_argument("--out", required=True, metavar="JSON", help="the COCO file to write")
    parser.add_argument(
        "--connectivity",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: pixels connect through edges only; 2: diagonals too (default)",
    )
    parser.add_argument(
        "--min-area",
        type=_positive_int,
        default=1,
        metavar="PX",
        help="leave out components smaller than PX pixels (default 1: keep all)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the file if export-coco wrote it before"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
