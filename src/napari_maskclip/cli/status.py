"""``napari-maskclip status DS``: how far a dataset's annotation has come.

    napari-maskclip status my_dataset [--images photos/]

Prints the samples saved, how many have an image, are reviewed or have edits, the share of
edited (human-labelled) pixels, the classes and the pixels per class; the last line is one JSON
object (``tail -n 1``). With ``--images`` (the series' folder or list file) it also says how many
of those images are saved. The counting is :mod:`napari_maskclip.series.status`.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..series.status import dataset_status

    status = dataset_status(args.dataset, images=args.images, recursive=args.recursive)
    for line in status.lines():
        print(line)
    print(json.dumps(status.to_dict()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="summarise a dataset: saved, reviewed, edited-pixel share, pixels per class",
        description="Summarise an exported dataset: samples saved, reviewed, with edits, the "
        "share of edited (human-labelled) pixels, its classes and pixels per class. The last "
        "line is one JSON object.",
    )
    parser.add_argument("dataset", metavar="DS", help="dataset folder (holds dataset.json)")
    parser.add_argument("--images", default=None, metavar="SOURCE",
                        help="the series' image folder or list file: also say how many of its "
                        "images are saved")
    parser.add_argument("--recursive", action="store_true",
                        help="with --images: include its sub-folders")
    parser.set_defaults(func=_run)
