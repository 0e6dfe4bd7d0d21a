"""``napari-maskclip segment``: MaskCLIP on a batch of images, three files per image.

    napari-maskclip segment photos/*.jpg --classes "cat, dog; puppy" --background background \
        --model ViT-B-16 --pretrained openai --out results/

The model loads once (with the first image that needs it) and every image goes through the same
:class:`~napari_maskclip.engine.Segmenter` (so text embeddings are computed once for the batch).
Bad options and every output file are checked before any work, with one line on stderr; files
napari-maskclip did not write are never replaced, results of other settings only with
``--overwrite``, and finished images are skipped on a rerun (see :mod:`.batch`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from ..engine.names import default_pretrained  # also imported from here by cli.train
from ..errors import InvalidInputError
from .args import (add_batch_output_options, add_channel_options, add_cluster_options,
                   add_precision_option, nonneg_int, positive_int, unit_float)
from .batch import progress_bar

__all__ = ["register", "add_engine_options", "settings_from_args", "progress_bar"]


def _dilations(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"dilations are integers separated by commas, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give whole numbers >= 1, e.g. 8,16")
    return values


def region_source(args: argparse.Namespace) -> Optional[str]:
    """The ``regions`` setting of ``--regions``: a method name, ``labels`` for a file, or None."""
    from ..engine.settings import REGION_SOURCES

    value = getattr(args, "regions", None)
    if value is None:
        return None
    if value in REGION_SOURCES[:-1]:
        return value
    return "labels"


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
    add_precision_option(group)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The MaskCLIP settings, as options (shared by ``segment`` and ``demo``)."""
    from ..engine.modes import MODES

    group = parser.add_argument_group("MaskCLIP")
    group.add_argument("--mode", default="maskclip", choices=[m for m in MODES],
                       help="last-layer read-out: maskclip (paper), sclip, clearclip, naclip, "
                       "scclip, rfclip, resclip (ViT only), naive (baseline).")
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
                       help="maskclip85 (default, 85 prompts), openai80 (CLIP's 80, as the "
                       "successors), single ('a photo of a {}.'), or a text file with one "
                       "template containing {} per line.")
    group.add_argument("--window", type=positive_int, default=None, metavar="PX",
                       help="sliding-window crop size; default whole image (large images switch "
                       "to windows automatically).")
    group.add_argument("--stride", type=positive_int, default=None, metavar="PX",
                       help="sliding-window step (default half the window).")
    group.add_argument("--short-side", type=positive_int, default=None, metavar="PX",
                       help="resize so the short side has PX pixels before inference (outputs "
                       "keep the original size).")
    refine = parser.add_argument_group("refinements (query time, every mode)")
    refine.add_argument("--pamr", action="store_true",
                        help="PAMR: refine scores by local colour affinity (as SCLIP/NACLIP).")
    refine.add_argument("--pamr-iterations", type=nonneg_int, default=10, metavar="N")
    refine.add_argument("--pamr-dilations", type=_dilations, default=(8, 16), metavar="D[,D]",
                        help="neighbour distances in pixels (default 8,16 as SCLIP/NACLIP).")
    refine.add_argument("--tlp", action="store_true",
                        help="TLP (PEARL): text-aware Laplacian propagation of the scores, a few "
                        "conjugate-gradient steps on a grid of about 80 cells a side (after PAMR).")
    refine.add_argument("--tlp-iterations", type=nonneg_int, default=25, metavar="N")
    refine.add_argument("--tlp-grid", type=positive_int, default=80, metavar="CELLS")
    refine.add_argument("--region-vote", default="mean", choices=["mean", "majority"],
                        help="region voting's rule: mean probability (default) or the most "
                        "frequent label (CorrCLIP's).")
    refine.add_argument("--regions", default=None, metavar="slic|felzenszwalb|FILE",
                        help="region voting: each region gets its mean class probabilities. "
                        "Regions from superpixels (slic, felzenszwalb) or a label image FILE of "
                        "the image's size (0 = no region); '{stem}' in FILE is each image's stem.")
    refine.add_argument("--attention-regions", default=None, choices=["slic", "felzenszwalb"],
                        help="CorrCLIP's restriction: in the last block each patch attends only "
                        "to patches of its superpixel (modes sclip, clearclip, naclip; "
                        "encode-time, uses the superpixel options below).")
    refine.add_argument("--slic-segments", type=positive_int, default=400, metavar="N")
    refine.add_argument("--slic-compactness", type=float, default=10.0, metavar="C")
    refine.add_argument("--felzenszwalb-scale", type=float, default=100.0, metavar="S")
    refine.add_argument("--felzenszwalb-sigma", type=float, default=0.8, metavar="S")
    refine.add_argument("--felzenszwalb-min-size", type=positive_int, default=50, metavar="PX")
    conventions = parser.add_argument_group(
        "reference-code conventions (the successors' presets set them; see the README)")
    conventions.add_argument("--pos-embed-resize", default=None, choices=["grid", "scale_factor"],
                             help="positional embedding resized to the exact patch grid (default) "
                             "or by the reference code's scale factor (grid + 0.1) / native.")
    conventions.add_argument("--partial-patches", default=None, choices=["pad", "drop"],
                             help="a window not a multiple of the patch: padded (default) or its "
                             "partial patch dropped and the scores stretched (reference code).")
    conventions.add_argument("--resize-antialias", action=argparse.BooleanOptionalAction,
                             default=None, help="antialias when downscaling to --short-side "
                             "(default); --no-resize-antialias: plain bilinear as mmseg.")
    conventions.add_argument("--refine-guide", default=None, choices=["original", "resized"],
                             help="PAMR's and TLP's guide: the image (default) or the image resized "
                             "to --short-side and back (reference code).")
    readouts = parser.add_argument_group("RF-CLIP and ResCLIP (their presets set them)")
    readouts.add_argument("--rfclip-global", default=None, choices=["window", "image"],
                          help="rfclip: each window's own global embedding (default) or the whole "
                          "image's (reference code; one more encoder pass).")
    readouts.add_argument("--resclip-base", default=None, choices=["naclip", "clearclip", "sclip"],
                          help="resclip: the last block's base attention (default naclip, as its "
                          "configs).")
    from ..engine.presets import PRESETS

    group.add_argument("--preset", default=None, choices=list(PRESETS),
                       help="a paper's evaluation settings (mode, templates, temperature, window, "
                       "stride, short side, PAMR, denoising; see the README); options you give "
                       "explicitly win. Recorded in the result's settings.")
    add_channel_options(group)
    parser.set_defaults(engine_option_defaults={a.dest: a.default for a in parser._actions})


def settings_from_args(args: argparse.Namespace):
    """Build :class:`SegmentSettings` from parsed options (validated)."""
    from ..engine.settings import SegmentSettings

    templates: Any = args.templates
    if templates not in ("maskclip85", "openai80", "single") and "{}" not in templates:
        path = Path(templates)
        if not path.is_file():
            raise InvalidInputError(
                f"--templates {templates!r}: use maskclip85, openai80, single, or a file of templates."
            )
        templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    values = dict(
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
        pamr=args.pamr,
        pamr_iterations=args.pamr_iterations,
        pamr_dilations=tuple(args.pamr_dilations),
        regions=region_source(args),
        slic_segments=args.slic_segments,
        slic_compactness=args.slic_compactness,
        felzenszwalb_scale=args.felzenszwalb_scale,
        felzenszwalb_sigma=args.felzenszwalb_sigma,
        felzenszwalb_min_size=args.felzenszwalb_min_size,
        attention_regions=getattr(args, "attention_regions", None),
        # None = not given (a preset's value, else the engine's default), so that an explicit
        # default still wins over a preset.
        pos_embed_resize=getattr(args, "pos_embed_resize", None) or "grid",
        partial_patches=getattr(args, "partial_patches", None) or "pad",
        resize_antialias=getattr(args, "resize_antialias", None) is not False,
        refine_guide=getattr(args, "refine_guide", None) or "original",
        rfclip_global=getattr(args, "rfclip_global", None) or "window",
        resclip_base=getattr(args, "resclip_base", None) or "naclip",
        tlp=getattr(args, "tlp", False),
        tlp_iterations=getattr(args, "tlp_iterations", 25),
        tlp_grid=getattr(args, "tlp_grid", 80),
        region_vote=getattr(args, "region_vote", "mean"),
    )
    preset = getattr(args, "preset", None)
    if preset:
        from ..engine.presets import preset_settings

        # The preset fills every option left at its default; options the user changed win.
        defaults = getattr(args, "engine_option_defaults", {})
        for field, value in preset_settings(preset).items():
            dest = _PRESET_OPTIONS.get(field)
            if dest is None or getattr(args, dest) == defaults.get(dest):
                values[field] = value
    return SegmentSettings(**values).validate()


#: SegmentSettings field -> option dest, for the fields a preset sets.
_PRESET_OPTIONS = {"mode": "mode", "templates": "templates", "logit_scale": "temperature",
                   "denoise": "denoise", "key_smoothing": "key_smoothing",
                   "short_side": "short_side", "window": "window", "stride": "stride",
                   "pamr": "pamr", "pamr_iterations": "pamr_iterations",
                   "pamr_dilations": "pamr_dilations", "pos_embed_resize": "pos_embed_resize",
                   "partial_patches": "partial_patches", "resize_antialias": "resize_antialias",
                   "refine_guide": "refine_guide", "rfclip_global": "rfclip_global",
                   "resclip_base": "resclip_base"}




def _run(args: argparse.Namespace) -> int:
    from ..segment_batch import segment_tasks
    from .batch import run_tasks, run_tasks_on_cluster, skipped_line

    # Validate everything cheap, and every file the run will write, before loading a model.
    settings = settings_from_args(args)
    if str(args.out).endswith(".zarr"):
        return _run_large(args, settings)
    if args.chunk is not None or args.level is not None:
        raise InvalidInputError("--chunk and --level are for huge images: write them to a zarr "
                                "store with --out OUT.zarr.")

    def announce(loaded) -> None:  # in this process only (workers do not print)
        if not args.quiet:
            print(f"model: {loaded.describe()}", file=sys.stderr)

    batch = segment_tasks(
        args.images, args.out, classes=args.classes, background=args.background or None,
        model=args.model, pretrained=args.pretrained, device=args.device,
        precision=args.precision, settings=settings, channel_axis=args.channel_axis,
        channels=args.channels, confidence=not args.no_confidence, overwrite=args.overwrite,
        regions_file=args.regions if region_source(args) == "labels" else None, on_load=announce)
    if batch.skipped:
        print(skipped_line(batch.skipped))
    if not batch.tasks:
        return 0
    if args.scheduler is not None or args.workers is not None:
        return run_tasks_on_cluster(batch.tasks, command="segment", scheduler=args.scheduler,
                                    workers=args.workers, quiet=args.quiet)
    return run_tasks(batch.tasks, command="segment", quiet=args.quiet)


def _run_large(args: argparse.Namespace, settings) -> int:
    """``segment BIG --out OUT.zarr``: one huge image, tile by tile (:mod:`..huge`)."""
    import contextlib

    from ..huge import segment_large
    from ..progress import run_to_completion

    if len(args.images) != 1:
        raise InvalidInputError(f"--out {args.out} segments one huge image; got "
                                f"{len(args.images)} inputs.")

    def announce(loaded) -> None:
        if not args.quiet:
            print(f"model: {loaded.describe()}", file=sys.stderr)

    with contextlib.ExitStack() as stack:
        client = None
        if args.scheduler is not None or args.workers is not None:
            from ..distributed import open_client

            client = stack.enter_context(open_client(args.scheduler, args.workers))
            if not args.quiet:
                where = args.scheduler or f"{args.workers} local worker(s)"
                print(f"dask: tiles on {where}", file=sys.stderr)
        run = segment_large(
            args.images[0], args.out, classes=args.classes, background=args.background or None,
            model=args.model, pretrained=args.pretrained, device=args.device,
            precision=args.precision, settings=settings, level=args.level,
            channel_axis=args.channel_axis, channels=args.channels, chunk=args.chunk,
            confidence=not args.no_confidence, overwrite=args.overwrite, client=client,
            on_load=announce)
        bar, update = progress_bar(Path(args.images[0]).name, disable=args.quiet, unit="tile")
        try:
            result = run_to_completion(run, update)
        finally:
            run.close()
            bar.close()
    print(result.line(), flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images into typed class names with MaskCLIP",
        description="Segment each IMAGE into the given classes and write <stem>_labels.png "
        "(palette PNG; uint16 TIFF beyond 255 classes), <stem>_confidence.tif (float32 CxHxW) and "
        "<stem>_classes.json (classes, colours, settings) into --out. A TIFF stack or time series "
        "(Z x H x W, T x Z x H x W, with a channel axis) is segmented slice by slice into one "
        "<stem>_labels.tif and one <stem>_confidence.tif (C x the leading axes x H x W).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (PNG, JPEG, TIFF...); with --out OUT.zarr one huge "
                        "image: a .zarr array, an OME-Zarr group or a TIFF")
    parser.add_argument("--classes", required=True,
                        help="class names separated by commas or new lines; ';' separates "
                        "synonyms, e.g. 'cat, dog; puppy'.")
    add_batch_output_options(parser)
    add_cluster_options(parser)
    huge = parser.add_argument_group(
        "huge images (--out OUT.zarr)",
        "One IMAGE (a .zarr array, an OME-Zarr group or a TIFF, read lazily) segmented tile by "
        "tile at its native resolution into the zarr store OUT.zarr (labels, float16 "
        "confidence); a killed run resumes.")
    huge.add_argument("--chunk", type=positive_int, default=None, metavar="PX",
                      help="tile and output chunk size (default: a multiple of the stride "
                      "near 1024)")
    huge.add_argument("--level", type=nonneg_int, default=None, metavar="N",
                      help="pyramid level of an OME-Zarr group or a pyramidal TIFF (default 0, "
                      "full resolution)")
    add_model_options(parser)
    add_engine_options(parser)
    parser.set_defaults(func=_run)
