"""``napari-maskclip segment``: MaskCLIP on a batch of images, three files per image.

    napari-maskclip segment photos/*.jpg --classes "cat, dog; puppy" --background background \
        --model ViT-B-16 --pretrained openai --out results/

The model loads once and every image goes through the same :class:`~napari_maskclip.engine.Segmenter`
(so text embeddings are computed once for the batch). Bad input stops the run before any work
with one line on stderr; outputs that exist are never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..engine.names import default_pretrained  # also imported from here by cli.train
from ..errors import InvalidInputError
from .args import (add_batch_output_options, add_channel_options, add_cluster_options,
                   positive_int, unit_float)
from .batch import progress_bar

__all__ = ["register", "add_engine_options", "settings_from_args", "progress_bar"]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--pretrained``, ``--device``, ``--precision`` (shared with other commands)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="ViT-B-16",
                       help="open_clip model name (ViT-B-16, RN50, ...), a model-config JSON, or "
                       "'demo' (the tiny offline model). Default: ViT-B-16.")
    group.add_argument("--pretrained", default=None,
                       help="open_clip pretrained tag (downloaded once), a local checkpoint file, "
                       "or 'random'. Default: 'openai' for ViT-B-16, none for 'demo'.")
    group.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="fp16 on GPU and fp32 on CPU by default.")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The MaskCLIP settings, as options (shared by ``segment`` and ``demo``)."""
    from ..engine.modes import MODES

    group = parser.add_argument_group("MaskCLIP")
    group.add_argument("--mode", default="maskclip", choices=[m for m in MODES],
                       help="last-layer read-out: maskclip (paper), sclip, clearclip, naclip "
                       "(ViT only), naive (baseline).")
    group.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                       help="prompt denoising: drop classes absent from the image (default on).")
    group.add_argument("--denoise-threshold", type=unit_float, default=0.5, metavar="P")
    group.add_argument("--key-smoothing", action="store_true",
                       help="key smoothing (paper eq. 5); off by default as in the paper's configs.")
    group.add_argument("--ks-threshold", type=unit_float, default=1.0, metavar="P",
                       help="smooth only positions whose max probability is below P (1 = all).")
    group.add_argument("--background", default=None, metavar="NAMES",
                       help="class names that mean background (label 0), e.g. 'background; wall'.")
    group.add_argument("--background-threshold", type=unit_float, default=None, metavar="P",
                       help="pixels whose max probability is below P become background.")
    group.add_argument("--temperature", type=float, default=100.0, metavar="S",
                       help="softmax scale on cosines (100 as in CLIP; 40-50 gives softer maps).")
    group.add_argument("--templates", default="maskclip85",
                       help="maskclip85 (default, 85 prompts), single ('a photo of a {}.'), or a "
                       "text file with one template containing {} per line.")
    group.add_argument("--window", type=positive_int, default=None, metavar="PX",
                       help="sliding-window crop size; default whole image (large images switch "
                       "to windows automatically).")
    group.add_argument("--stride", type=positive_int, default=None, metavar="PX",
                       help="sliding-window step (default half the window).")
    group.add_argument("--short-side", type=positive_int, default=None, metavar="PX",
                       help="resize so the short side has PX pixels before inference (outputs "
                       "keep the original size).")
    add_channel_options(group)


def settings_from_args(args: argparse.Namespace):
    """Build :class:`SegmentSettings` from parsed options (validated)."""
    from ..engine.settings import SegmentSettings

    templates: Any = args.templates
    if templates not in ("maskclip85", "single") and "{}" not in templates:
        path = Path(templates)
        if not path.is_file():
            raise InvalidInputError(
                f"--templates {templates!r}: use maskclip85, single, or a file of templates."
            )
        templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return SegmentSettings(
        mode=args.mode,
        window=args.window,
        stride=args.stride,
        short_side=args.short_side,
        key_smoothing=args.key_smoothing,
        ks_threshold=args.ks_threshold,
        denoise=args.denoise,
        denoise_threshold=args.denoise_threshold,
        logit_scale=args.temperature,
        templates=templates,
        background_threshold=args.background_threshold,
    ).validate()




def _run(args: argparse.Namespace) -> int:
    from ..segment_batch import segment_tasks
    from .batch import run_tasks, run_tasks_on_cluster, skipped_line

    # Validate everything cheap, and every file the run will write, before loading a model.
    settings = settings_from_args(args)

    def announce(loaded) -> None:  # in this process only (workers do not print)
        if not args.quiet:
            print(f"model: {loaded.describe()}", file=sys.stderr)

    batch = segment_tasks(
        args.images, args.out, classes=args.classes, background=args.background or None,
        model=args.model, pretrained=args.pretrained, device=args.device,
        precision=args.precision, settings=settings, channel_axis=args.channel_axis,
        channels=args.channels, confidence=not args.no_confidence, overwrite=args.overwrite,
        on_load=announce)
    if batch.skipped:
        print(skipped_line(batch.skipped))
    if not batch.tasks:
        return 0
    if args.scheduler is not None or args.workers is not None:
        return run_tasks_on_cluster(batch.tasks, command="segment", scheduler=args.scheduler,
                                    workers=args.workers, quiet=args.quiet)
    return run_tasks(batch.tasks, command="segment", quiet=args.quiet)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images into typed class names with MaskCLIP",
        description="Segment each IMAGE into the given classes and write <stem>_labels.png "
        "(palette PNG; uint16 TIFF beyond 255 classes), <stem>_confidence.tif (float32 CxHxW) and "
        "<stem>_classes.json (classes, colours, settings) into --out.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF...)")
    parser.add_argument("--classes", required=True,
                        help="class names separated by commas or new lines; ';' separates "
                        "synonyms, e.g. 'cat, dog; puppy'.")
    add_batch_output_options(parser)
    add_cluster_options(parser)
    add_model_options(parser)
    add_engine_options(parser)
    parser.set_defaults(func=_run)
