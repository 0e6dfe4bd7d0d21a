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
from typing import Any, Optional

from ..errors import InvalidInputError

__all__ = ["register", "add_engine_options", "settings_from_args", "progress_bar"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in 0..1, got {text}")
    return value


def _channels(text: str) -> list[int]:
    try:
        picks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"channels are integers separated by commas, got {text!r}") from exc
    if len(picks) not in (1, 3):
        raise argparse.ArgumentTypeError("give 1 or 3 channels, e.g. 0 or 2,1,0")
    return picks


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
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto (default): fp16 on a GPU; on the CPU bf16 where it has native "
                       "bf16 (AVX512-BF16/AMX), else fp32.")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The MaskCLIP settings, as options (shared by ``segment`` and ``demo``)."""
    from ..engine.modes import MODES

    group = parser.add_argument_group("MaskCLIP")
    group.add_argument("--mode", default="maskclip", choices=[m for m in MODES],
                       help="last-layer read-out: maskclip (paper), sclip, clearclip, naclip "
                       "(ViT only), naive (baseline).")
    group.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                       help="prompt denoising: drop classes absent from the image (default on).")
    group.add_argument("--denoise-threshold", type=_unit_float, default=0.5, metavar="P")
    group.add_argument("--key-smoothing", action="store_true",
                       help="key smoothing (paper eq. 5); off by default as in the paper's configs.")
    group.add_argument("--ks-threshold", type=_unit_float, default=1.0, metavar="P",
                       help="smooth only positions whose max probability is below P (1 = all).")
    group.add_argument("--background", default=None, metavar="NAMES",
                       help="class names that mean background (label 0), e.g. 'background; wall'.")
    group.add_argument("--background-threshold", type=_unit_float, default=None, metavar="P",
                       help="pixels whose max probability is below P become background.")
    group.add_argument("--temperature", type=float, default=100.0, metavar="S",
                       help="softmax scale on cosines (100 as in CLIP; 40-50 gives softer maps).")
    group.add_argument("--templates", default="maskclip85",
                       help="maskclip85 (default, 85 prompts), single ('a photo of a {}.'), or a "
                       "text file with one template containing {} per line.")
    group.add_argument("--window", type=_positive_int, default=None, metavar="PX",
                       help="sliding-window crop size; default whole image (large images switch "
                       "to windows automatically).")
    group.add_argument("--stride", type=_positive_int, default=None, metavar="PX",
                       help="sliding-window step (default half the window).")
    group.add_argument("--short-side", type=_positive_int, default=None, metavar="PX",
                       help="resize so the short side has PX pixels before inference (outputs "
                       "keep the original size).")
    group.add_argument("--channel-axis", type=int, default=None, metavar="AXIS",
                       help="axis holding channels of a multichannel image.")
    group.add_argument("--channels", type=_channels, default=None, metavar="I[,J,K]",
                       help="1 or 3 channels to use from a multichannel image.")


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


def default_pretrained(model: str, pretrained: Optional[str]) -> Optional[str]:
    """``openai`` for the default CLIP, nothing for the demo or config files unless given."""
    if pretrained is not None:
        return pretrained
    if model == "demo" or model.lower().endswith(".json"):
        return None
    return "openai"


def progress_bar(desc: str, disable: bool = False):
    """A tqdm bar on stderr, fed by :class:`~napari_maskclip.progress.Progress` reports."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="win", file=sys.stderr, disable=disable, leave=False)
    shown = {"stage": None}

    def update(step) -> None:
        if disable:
            return
        if shown["stage"] != step.stage:
            shown["stage"] = step.stage
            bar.set_description(f"{desc} {step.stage}")
            bar.reset(total=step.total)
        bar.n = step.done
        bar.refresh()

    return bar, update


def _run(args: argparse.Namespace) -> int:
    from ..classes import parse_classes
    from ..engine import Segmenter, load_clip
    from ..image_files import read_image
    from ..progress import run_to_completion
    from ..result_files import result_paths, write_result

    # Validate everything cheap before loading a model.
    classes = parse_classes(args.classes)
    background = parse_classes(args.background, allow_empty=True) if args.background else []
    parse_classes(classes + background)
    settings = settings_from_args(args)
    images = [Path(p) for p in args.images]
    for path in images:
        if not path.is_file():
            raise InvalidInputError(f"Image file not found: {path}")
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise InvalidInputError("Two input images share a file name stem; outputs would collide.")
    out = Path(args.out)
    if not args.overwrite:
        existing = [
            str(f) for stem in stems for f in (result_paths(out, stem).classes_path,)
            if f.exists()
        ]
        if existing:
            raise InvalidInputError(
                f"Outputs exist already (e.g. {existing[0]}); pass --overwrite to replace them."
            )

    loaded = load_clip(args.model, default_pretrained(args.model, args.pretrained),
                       device=args.device, precision=args.precision)
    segmenter = Segmenter(loaded, settings=settings)
    print(f"model: {loaded.describe()}", file=sys.stderr)
    for path in images:
        image = read_image(path)
        bar, update = progress_bar(path.name, disable=args.quiet)
        try:
            result = run_to_completion(
                segmenter.run_iter(image, classes, background=background or None,
                                   channel_axis=args.channel_axis, channels=args.channels),
                update,
            )
        finally:
            bar.close()
        files = write_result(result, out, path.stem, confidence=not args.no_confidence,
                             extra={"source_image": str(path)})
        removed = f", removed by denoising: {', '.join(result.removed_classes)}" if result.removed_classes else ""
        print(f"{path.name}: {files.labels_path.name}, {files.classes_path.name}{removed}")
    return 0


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
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created).")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs.")
    parser.add_argument("--no-confidence", action="store_true",
                        help="skip the confidence TIFF (saves space).")
    parser.add_argument("--quiet", action="store_true", help="no progress bar.")
    add_model_options(parser)
    add_engine_options(parser)
    parser.set_defaults(func=_run)
