"""``napari-maskclip evaluate PRED_DIR GT_DIR``: per-class IoU, mIoU and pixel accuracy.

    napari-maskclip evaluate results/ dataset/ --classes dataset/classes.json

Prints a table, then one JSON object as the last line (``miou``, ``pixel_accuracy``,
``mean_accuracy``, ``per_class_iou``, ``n_images``, ...), so scripts can read
``tail -n 1``. Notes (skipped files, class remapping) go to stderr. The scoring is
:mod:`napari_maskclip.evaluate`, shared with the benchmarks and the student's validation.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_folders

    result = evaluate_folders(args.pred_dir, args.gt_dir, classes=args.classes,
                              ignore_index=args.ignore_index)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.scores.table())
    print(json.dumps(result.to_dict()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted label masks against ground truth (IoU, mIoU, pixel accuracy)",
        description="Pair masks by file stem and print per-class IoU, mIoU and pixel accuracy; "
        "the last line is one JSON object. PRED_DIR: a segment/predict output folder, a dataset "
        "or a folder of masks. GT_DIR: a dataset, its masks/ folder, or a folder of masks. "
        "Classes absent from both ground truth and prediction are left out of the mIoU.",
    )
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="predictions")
    parser.add_argument("gt_dir", metavar="GT_DIR", help="ground truth")
    parser.add_argument("--classes", default=None, metavar="CLASSES_JSON",
                        help="class table (a dataset's classes.json); default: the ground "
                        "truth's own, else label values as they are")
    parser.add_argument("--ignore-index", type=int, default=None, metavar="N",
                        help="ground-truth value that is not scored (default 255 for 8-bit masks, "
                        "65535 for 16-bit)")
    parser.set_defaults(func=_run)
