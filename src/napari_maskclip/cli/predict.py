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

from ..errors import InvalidInputError

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..image_files import read_image
    from ..progress import run_to_completion
    from ..result_files import result_paths, write_result
    from ..student.predict import StudentSegmenter
    from .segment import progress_bar

    images = [Path(p) for p in args.images]
    for path in images:
        if not path.is_file():
            raise InvalidInputError(f"Image file not found: {path}")
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise InvalidInputError("Two input images share a file name stem; outputs would collide.")
    out = Path(args.out)
    if not args.overwrite:
        existing = [str(result_paths(out, s).classes_path) for s in stems
                    if result_paths(out, s).classes_path.exists()]
        if existing:
            raise InvalidInputError(
                f"Outputs exist already (e.g. {existing[0]}); pass --overwrite to replace them."
            )
    segmenter = StudentSegmenter(args.student, device=args.device, window=args.window,
                                 precision=args.precision)
    segmenter.resolve_classes(args.classes)  # unknown class names fail before any work
    print(f"model: {segmenter.describe()}", file=sys.stderr)
    for path in images:
        image = read_image(path)
        bar, update = progress_bar(path.name, disable=args.quiet)
        try:
            result = run_to_completion(
                segmenter.run_iter(image, args.classes, channel_axis=args.channel_axis,
                                   channels=args.channels),
                update,
            )
        finally:
            bar.close()
        files = write_result(result, out, path.stem, confidence=not args.no_confidence,
                             extra={"source_image": str(path)})
        print(f"{path.name}: {files.labels_path.name}, {files.classes_path.name}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from .segment import _channels, _positive_int

    parser = subparsers.add_parser(
        "predict",
        help="segment images with a trained MaskCLIP+ student",
        description="Segment each IMAGE with a student checkpoint (from 'napari-maskclip train') "
        "and write <stem>_labels.png, <stem>_confidence.tif and <stem>_classes.json into --out, "
        "exactly as 'segment' does.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF...)")
    parser.add_argument("--student", required=True, metavar="CKPT", help="student checkpoint file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--classes", default=None,
                        help="a subset of the student's classes (default: all of them)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-confidence", action="store_true", help="skip the confidence TIFF")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto (default): bf16 on a CPU with native bf16 (AVX512-BF16/AMX) "
                        "or a bf16 GPU, else fp32")
    parser.add_argument("--window", type=_positive_int, default=None, metavar="PX",
                        help="sliding-window size for images over 1 megapixel (default 512)")
    parser.add_argument("--channel-axis", type=int, default=None, metavar="AXIS",
                        help="axis holding channels of a multichannel image")
    parser.add_argument("--channels", type=_channels, default=None, metavar="I[,J,K]",
                        help="1 or 3 channels to use from a multichannel image")
    parser.set_defaults(func=_run)
