"""``napari-maskclip train``: train a MaskCLIP+ student on exported datasets.

    napari-maskclip train my-dataset/ --out student.safetensors --iterations 2000 \
        --model ViT-B-16 --pretrained openai

People's labels (edited pixels) are targets as they are; every other pixel gets the MaskCLIP
teacher's label on the same augmented crop, then (after ``--self-train-fraction`` of the
schedule) the student's own. The teacher defaults to the model recorded in the dataset. The
checkpoint is saved every ``--save-every`` iterations, at the end, and on Ctrl-C (which takes
effect when the iteration in progress is complete; press it twice to stop at once and keep the last
save); ``--resume`` continues it exactly.

Under ``torchrun --nproc_per_node N -m napari_maskclip.cli train ...`` the N processes train one
student data-parallel (see :mod:`napari_maskclip.student.distributed`); rank 0 shows the progress,
saves and reports, also errors (every rank makes the same checks, and a rank that dies is seen by
rank 0 as lost contact). The other ranks print nothing of their own; unexpected errors keep
their traceback on any rank.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import InvalidInputError
from .args import (add_channel_options, add_precision_option, nonneg_int, positive_int,
                   unit_float)

__all__ = ["register"]


def _settings_overrides(args: argparse.Namespace) -> dict:
    """The training settings given on the command line (unset ones keep their defaults)."""
    names = ("iterations", "batch_size", "crop_size", "lr", "self_train_fraction", "backbone",
             "backbone_weights", "confidence_threshold", "unknown_edits", "val_fraction",
             "val_interval", "save_interval", "seed", "frozen_batch_norm")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _teacher_settings(args: argparse.Namespace):
    """MaskCLIP options of the teacher, as a dict, or None to use the dataset's settings."""
    changes = {}
    if args.denoise is not None:
        changes["denoise"] = args.denoise
    if args.key_smoothing:
        changes["key_smoothing"] = True
    if args.templates is not None:
        changes["templates"] = args.templates
    return changes


def _run(args: argparse.Namespace) -> int:
    """Train; under torchrun, as one rank of a data-parallel run (see the module doc)."""
    from ..engine.device import resolve_device
    from ..errors import MaskClipError
    from ..student import distributed

    ranks = distributed.start(resolve_device(args.device))  # 1 of 1 unless started by torchrun
    bar = _TrainBar(disable=args.quiet or not ranks.main)
    try:
        return _train(args, bar, report=ranks.main)
    except KeyboardInterrupt:
        if ranks.main:
            raise
        return 130  # rank 0 says what the checkpoint holds
    except MaskClipError:
        if ranks.main:
            raise
        return 1  # every rank checks the same things: rank 0 has said it (see the module doc)
    except RuntimeError as exc:  # torch.distributed's errors (DistError) are RuntimeErrors
        if not (ranks.active and _lost_contact(exc)):
            raise
        if not ranks.main:
            return 1  # rank 0 failed and said why (or died, and torchrun's summary says so)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # no source position
        print(f"napari-maskclip train: error: the training processes lost contact ({first}); "
              f"{_holds(Path(args.out))}.", file=sys.stderr)
        return 1
    finally:
        distributed.stop()


def _lost_contact(exc: RuntimeError) -> bool:
    """Whether ``exc`` says that another rank stopped or stopped answering."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout",
                                         "peer"))


def _train(args: argparse.Namespace, bar: "_TrainBar", report: bool = True) -> int:
    from ..engine.settings import SegmentSettings
    from ..progress import run_to_completion
    from ..student.data import load_training_data
    from ..student.settings import TrainSettings
    from ..student.training import RESUME_OVERRIDES, train_iter
    from .segment import default_pretrained

    out = Path(args.out)
    for folder in args.datasets:
        if not Path(folder).is_dir():
            raise InvalidInputError(f"Dataset folder not found: {folder}")
    overrides = _settings_overrides(args)
    teacher_changes = _teacher_settings(args)
    if args.resume:
        refused = sorted(set(overrides) - set(RESUME_OVERRIDES)) + (
            ["teacher options"] if teacher_changes else [])
        if refused:
            raise InvalidInputError(
                f"--resume keeps the checkpoint's settings; drop {', '.join(refused)} "
                "(only --iterations, --val-every and --save-every may change)."
            )
        unknown_edits = None
    else:
        unknown_edits = overrides.get("unknown_edits", "labels")
    settings = TrainSettings()
    if not args.resume:
        settings = settings.replace(**overrides)
    data = load_training_data(
        args.datasets,
        unknown_edits=unknown_edits or _resumed_policy(out),
        channel_axis=args.channel_axis, channels=args.channels,
    )
    if teacher_changes and not args.resume:
        base = dict(data.provenance.get("settings") or {})
        merged = SegmentSettings.from_dict(base).replace(**teacher_changes).validate()
        settings = settings.replace(teacher_settings=merged.to_dict())
    teacher = args.model
    pretrained = default_pretrained(args.model, args.pretrained) if args.model else None
    gen = train_iter(
        data, out, settings=settings, teacher=teacher, pretrained=pretrained,
        resume=args.resume, overwrite=args.overwrite, device=args.device, precision=args.precision,
        **({k: v for k, v in overrides.items() if k in RESUME_OVERRIDES} if args.resume else {}),
    )
    try:
        result = run_to_completion(gen, bar.update)
    except KeyboardInterrupt:
        gen.close()  # saves the last completed iteration (Ctrl-C acts between iterations)
        bar.close()
        if report:
            print(f"napari-maskclip train: interrupted; {_holds(out)}.", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if not report:
        return 0  # not rank 0: it reports
    miou = result.val_miou
    summary = f"{out}: {result.iteration} iterations"
    if result.history:
        summary += f", final loss {result.history[-1]['loss']:.4f}"
    if miou is not None:
        summary += f", validation mIoU {miou:.3f}"
    print(summary)
    return 0


def _holds(out: Path) -> str:
    """What the checkpoint holds after an interrupted run, in words."""
    from ..errors import MaskClipError
    from ..student.checkpoint import read_checkpoint_meta

    try:
        iteration = read_checkpoint_meta(out)["iteration"]
    except MaskClipError:
        return "nothing was saved"
    return f"{out} holds iteration {iteration} (continue with --resume)"


def _resumed_policy(out: Path) -> str:
    """The ``unknown_edits`` policy stored in the checkpoint being resumed."""
    from ..student.checkpoint import read_checkpoint_meta

    if not out.is_file():
        raise InvalidInputError(f"Nothing to resume: {out} does not exist. Start without --resume.")
    return read_checkpoint_meta(out)["settings"].get("unknown_edits", "labels")


class _TrainBar:
    """A tqdm bar for the iterations with the live loss; setup messages go to stderr."""

    def __init__(self, disable: bool) -> None:
        self.disable = disable
        self.bar = None

    def update(self, step) -> None:
        if step.stage == "setup":
            if step.message and not self.disable and step.message.startswith("backbone"):
                print(step.message, file=sys.stderr)
            return
        if step.stage != "train" or self.disable:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=step.total, initial=step.done, desc="train", unit="it",
                            file=sys.stderr, leave=False)
        self.bar.n = step.done
        post = {}
        if "loss" in step.info:
            post["loss"] = f"{step.info['loss']:.4f}"
        if step.info.get("val_miou") is not None:
            post["val_mIoU"] = f"{step.info['val_miou']:.3f}"
        if "stage" in step.info:
            post["stage"] = step.info["stage"]
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..student.settings import BACKBONES

    parser = subparsers.add_parser(
        "train",
        help="train a MaskCLIP+ student on exported datasets",
        description="Train a DeepLab student whose classifier is the CLIP text embeddings of the "
        "classes, on one or more exported datasets: a person's labels where given, the MaskCLIP "
        "teacher's pseudo-labels elsewhere, then self-training. Writes one checkpoint file.",
    )
    parser.add_argument("datasets", nargs="+", metavar="DATASET", help="exported dataset folders")
    parser.add_argument("--out", required=True, metavar="CKPT",
                        help="checkpoint file to write (e.g. student.safetensors)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the checkpoint at --out from its saved iteration")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    teacher = parser.add_argument_group("teacher (MaskCLIP)")
    teacher.add_argument("--model", default=None,
                         help="CLIP model of the teacher (open_clip name, config JSON, or 'demo'); "
                         "default: the model recorded in the dataset")
    teacher.add_argument("--pretrained", default=None, help="its weights (tag or file)")
    teacher.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    add_precision_option(teacher, kind="train")
    teacher.add_argument("--confidence-threshold", type=unit_float, default=None, metavar="P",
                         help="ignore teacher pixels whose probability is below P (default off)")
    teacher.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=None,
                         help="prompt denoising of the teacher (default: as in the dataset)")
    teacher.add_argument("--key-smoothing", action="store_true", help="key smoothing of the teacher")
    teacher.add_argument("--templates", default=None, help="maskclip85 or single (default: as in the dataset)")
    teacher.add_argument("--unknown-edits", choices=["labels", "teacher"], default=None,
                         help="samples without edit information: trust their labels (default) or "
                         "let the teacher relabel them")
    student = parser.add_argument_group("student")
    student.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                         help="optimiser steps (default 2000)")
    student.add_argument("--backbone", choices=list(BACKBONES), default=None,
                         help="network (default mobilenet_v3_large; resnet50/101 are slower, "
                         "tiny is for quick trials)")
    student.add_argument("--backbone-weights", default=None, metavar="W",
                         help="auto (ImageNet if cached or downloadable, else random), imagenet, "
                         "random, or a state-dict file")
    student.add_argument("--batch-size", type=positive_int, default=None, help="crops per step (default 4)")
    student.add_argument("--crop-size", type=positive_int, default=None, metavar="PX",
                         help="training crop (default 320)")
    student.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.01)")
    student.add_argument("--self-train-fraction", type=unit_float, default=None, metavar="F",
                         help="start self-training after this fraction of the schedule "
                         "(default 0.1; 1 = never)")
    student.add_argument("--val-fraction", type=unit_float, default=None, metavar="F",
                         help="share of images held out for validation (default 0.1)")
    student.add_argument("--val-every", dest="val_interval", type=nonneg_int, default=None,
                         metavar="N", help="validate every N iterations (default 200)")
    student.add_argument("--save-every", dest="save_interval", type=nonneg_int, default=None,
                         metavar="N", help="save the checkpoint every N iterations (default 250)")
    student.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    student.add_argument("--frozen-batch-norm", action="store_true", default=None,
                         help="keep batch-norm statistics fixed (only their scale and shift "
                         "train); makes several torchrun processes compute exactly what one does")
    add_channel_options(student, plural=True)
    parser.set_defaults(func=_run)

