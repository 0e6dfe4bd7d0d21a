"""``napari-maskclip predict``: segment images with a trained MaskCLIP+ student.

    napari-maskclip predict photos/*.jpg --student student.safetensors --out results/

Writes the same three files per image as ``segment`` (``<stem>_labels.png``,
``<stem>_confidence.tif``, ``<stem>_classes.json``), so everything that reads ``segment`` outputs
(export, evaluate, the napari reader) reads these too. The classes are the student's; ``--classes``
may pick a subset of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import (add_batch_output_options, add_channel_options, add_cluster_options,
                   add_precision_option,
                   positive_int)

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..result_files import source_fingerprint
    from ..student.predict import StudentSegmenter
    from .batch import (input_images, plan_results, result_task, run_tasks, run_tasks_on_cluster,
                        skipped_line)

    images = input_images(args.images)
    out = Path(args.out)
    segmenter = StudentSegmenter(args.student, device=args.device, window=args.window,
                                 precision=args.precision)
    picked = segmenter.resolve_classes(args.classes)  # unknown class names fail before any work
    request = {
        "student": source_fingerprint(args.student), "classes": picked, "window": args.window,
        "precision": args.precision,
        "channel_axis": args.channel_axis, "channels": args.channels,
        "confidence": not args.no_confidence,
    }
    todo, skipped = plan_results(out, images, command="predict", request=request,
                                 n_classes=len(picked), confidence=not args.no_confidence,
                                 overwrite=args.overwrite, channel_axis=args.channel_axis,
                                 channels=args.channels)
    if skipped:
        print(skipped_line(skipped))
    if not todo:
        return 0
    if not args.quiet:
        print(f"model: {segmenter.describe()}", file=sys.stderr)

    def make_run(image, probabilities, *, stacked=False, plane_channel_axis=None):
        # the student always returns its maps; a stack's slice has its channels first
        axis = plane_channel_axis if stacked else args.channel_axis
        return segmenter.run_iter(image, args.classes, channel_axis=axis, channels=args.channels)

    on_cluster = args.scheduler is not None or args.workers is not None
    if on_cluster:  # workers load the checkpoint themselves, once each
        from ..segment_batch import PredictRun

        make_run = PredictRun(str(args.student), args.device, args.window, args.classes,
                              args.channel_axis, args.channels, args.precision)

    tasks = [result_task(path, out, make_run, confidence=not args.no_confidence, record=record,
                         channel_axis=args.channel_axis, channels=args.channels,
                         stack_classes=len(picked))
             for path, record in todo]
    if on_cluster:
        return run_tasks_on_cluster(tasks, command="predict", scheduler=args.scheduler,
                                    workers=args.workers, quiet=args.quiet)
    return run_tasks(tasks, command="predict", quiet=args.quiet)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images with a trained MaskCLIP+ student",
        description="Segment each IMAGE with a student checkpoint (from 'napari-maskclip train') "
        "and write <stem>_labels.png, <stem>_confidence.tif and <stem>_classes.json into --out, "
        "exactly as 'segment' does (stacks and time series too).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF...)")
    parser.add_argument("--student", required=True, metavar="CKPT", help="student checkpoint file")
    parser.add_argument("--classes", default=None,
                        help="a subset of the student's classes (default: all of them)")
    add_batch_output_options(parser)
    add_cluster_options(parser)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    add_precision_option(parser, kind="student")
    parser.add_argument("--window", type=positive_int, default=None, metavar="PX",
                        help="sliding-window size for images over 1 megapixel (default 512)")
    add_channel_options(parser)
    parser.set_defaults(func=_run)
