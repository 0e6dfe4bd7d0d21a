"""``napari-maskclip export``: labels -> a training dataset folder.

    napari-maskclip export --images a.png b.tif --labels a_labels.png b_labels.tif \\
        --classes "cat, dog; puppy" --out dataset/
    napari-maskclip export --from-segment results/ --images-dir photos/ --out dataset/

The first form pairs images and label files in order (sample names are the image stems; a 3D
label TIFF gives one sample per slice). The second exports a ``segment`` output folder: each
``<stem>_classes.json`` names the classes and settings, its labels and confidence files come
along, and the source image is the one ``segment`` recorded or ``<stem>.*`` in ``--images-dir``.
Everything is checked before the first sample is written; existing samples are kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidInputError
from .args import unit_float

__all__ = ["register"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def _check_files(paths: list[Path], what: str) -> None:
    for path in paths:
        if not path.is_file():
            raise InvalidInputError(f"{what} file not found: {path}")


def _find_image(stem: str, table: dict[str, Any], images_dir: Optional[Path]) -> Optional[Path]:
    recorded = table.get("source_image") if isinstance(table.get("source_image"), str) else None
    if images_dir is not None:
        for suffix in _IMAGE_SUFFIXES:
            for candidate in (images_dir / f"{stem}{suffix}", images_dir / f"{stem}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    return None


def _jobs_from_files(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ..classes import parse_classes
    from ..export import safe_sample_name

    if not args.classes:
        raise InvalidInputError("--classes is required with --images/--labels (e.g. 'cat, dog; puppy').")
    parse_classes(args.classes)
    images = [Path(p) for p in args.images]
    labels = [Path(p) for p in args.labels or []]
    if len(images) != len(labels):
        raise InvalidInputError(f"{len(images)} images but {len(labels)} label files; give one label file per image.")
    confidence = [Path(p) for p in args.confidence or []]
    if confidence and len(confidence) != len(images):
        raise InvalidInputError(f"{len(confidence)} confidence files for {len(images)} images; give one per image.")
    edited = [Path(p) for p in args.edited or []]
    if edited and len(edited) != len(images):
        raise InvalidInputError(f"{len(edited)} edited masks for {len(images)} images; give one per image.")
    _check_files(images, "Image")
    _check_files(labels, "Labels")
    _check_files(confidence, "Confidence")
    _check_files(edited, "Edited-mask")
    jobs = []
    for i, (image, label) in enumerate(zip(images, labels)):
        jobs.append({
            "name": safe_sample_name(image.stem), "image": image, "labels": label,
            "confidence": confidence[i] if confidence else None,
            "edited": edited[i] if edited else None,
            "classes": args.classes, "background": args.background or "background",
            "provenance": {"labels_file": str(label)},
        })
    return jobs


def _jobs_from_segment(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ..export import DatasetClasses, safe_sample_name
    from ..result_files import find_results, read_result_table

    folder = Path(args.from_segment)
    if not folder.is_dir():
        raise InvalidInputError(f"Folder not found: {folder}")
    results = find_results(folder)
    if not results:
        raise InvalidInputError(f"{folder} holds no '<stem>_classes.json' files written by 'segment'.")
    images_dir = Path(args.images_dir) if args.images_dir else None
    if images_dir is not None and not images_dir.is_dir():
        raise InvalidInputError(f"--images-dir {images_dir} is not a folder.")
    jobs, missing = [], []
    for path in results:
        table = read_result_table(path)
        stem = path.name[: -len("_classes.json")]
        classes = DatasetClasses.from_json(table, source=str(path))
        image = _find_image(stem, table, images_dir)
        if image is None:
            missing.append(stem)
            continue
        settings = table.get("settings") if isinstance(table.get("settings"), dict) else {}
        stack = table.get("stack") if isinstance(table.get("stack"), dict) else {}
        jobs.append({
            "name": safe_sample_name(stem), "image": image, "result": path,
            # a stack's channel axis (one sample per slice, its channels last)
            "channel_axis": stack.get("channel_axis"),
            "classes": list(classes.classes),
            "background": [spec.text for spec in classes.background],
            "provenance": {"model": settings.get("model"), "pretrained": settings.get("pretrained"),
                           "settings": settings,
                           "removed_by_denoising": table.get("removed_by_denoising", []),
                           "segment_result": str(path)},
        })
    if missing:
        raise InvalidInputError(
            f"No source image found for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
            "give the folder of the original images with --images-dir."
        )
    return jobs


def _load(job: dict[str, Any], want_confidence: bool) -> dict[str, Any]:
    import numpy as np

    from ..image_files import read_float_stack, read_image, read_label_image
    from ..result_files import read_result

    if "result" in job:
        result = read_result(job["result"], confidence=want_confidence)
        image = _stack_image(job["image"]) if result.labels.ndim > 2 else read_image(job["image"])
        return {"image": image, "labels": result.labels, "probabilities": result.confidence,
                "edited": None}
    image = read_image(job["image"])
    labels = read_label_image(job["labels"])
    probabilities = read_float_stack(job["confidence"]) if job.get("confidence") else None
    if probabilities is not None:
        if probabilities.shape[1:] != labels.shape:
            raise InvalidInputError(
                f"{job['confidence']} has shape {probabilities.shape}; for labels of shape "
                f"{labels.shape} it must be C x {' x '.join(map(str, labels.shape))} (one map per class)."
            )
        if not np.issubdtype(probabilities.dtype, np.floating) or not np.all(
                (probabilities >= 0) & (probabilities <= 1)):  # also false for NaN
            raise InvalidInputError(
                f"{job['confidence']} must hold probabilities in 0..1 (no NaN); give the "
                "confidence TIFF written by segment, or leave --confidence out."
            )
    edited = None
    if job.get("edited"):
        edited = read_image(job["edited"]) != 0
        if edited.ndim == labels.ndim + 1:  # an RGB(A) picture of the mask
            edited = edited.any(axis=-1)
        if edited.shape != labels.shape:
            raise InvalidInputError(
                f"The edited-pixels mask {job['edited']} is {edited.shape[-1]}x{edited.shape[0]} "
                f"px but the labels {job['labels']} are {labels.shape[-1]}x{labels.shape[0]}; "
                "give a mask of the same size (non-zero = painted by a person)."
            )
    return {"image": image, "labels": labels, "probabilities": probabilities, "edited": edited}


def _stack_image(path: Path) -> Any:
    """A stack's source image, read a slice at a time where it is a paged TIFF (the export pulls
    one slice per sample; moving a channel axis reads it whole), else read whole."""
    from ..image_files import image_header, read_image
    from ..stack_files import TiffPlanes

    image_header(path)  # the size limits, one-line errors
    if Path(path).suffix.lower() in (".tif", ".tiff"):
        return TiffPlanes(path)
    return read_image(path)


def _request(job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What an export of ``job`` was asked to do: its input files (as they are now) and options."""
    from ..result_files import source_fingerprint

    files = {key: source_fingerprint(job[key]) for key in ("image", "labels", "confidence",
                                                            "edited", "result") if job.get(key)}
    as_text = (lambda v: v if isinstance(v, str) or v is None else [getattr(c, "text", c) for c in v])
    return {"command": "export", "files": files, "classes": as_text(job["classes"]),
            "background": as_text(job["background"]), "min_confidence": args.min_confidence,
            "confidence": not args.no_confidence, "remap": args.remap,
            "add_classes": args.add_classes, "channel_axis": args.channel_axis}


def _finished_jobs(dataset: Any, jobs: list[dict[str, Any]]) -> set[str]:
    """Inputs whose samples the dataset lists from the same request, all of them."""
    counts: dict[tuple[str, str], int] = {}
    expected: dict[tuple[str, str], Any] = {}
    for sample in dataset:
        run = sample.provenance.get("cli_run")
        if isinstance(run, dict) and isinstance(run.get("job"), str) and isinstance(run.get("request"), str):
            key = (run["job"], run["request"])
            counts[key] = counts.get(key, 0) + 1
            expected[key] = run.get("samples")
    done = set()
    for job in jobs:
        key = (job["name"], job["run"]["request"])
        if key in counts and counts[key] == expected[key]:
            done.add(job["name"])
    return done


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..export import ExportSession, check_export_target
    from ..export.class_table import DatasetClasses, read_class_table
    from ..export.layout import CLASSES_JSON
    from ..export.reader import is_dataset, read_dataset
    from ..export.remap import plan_class_mapping
    from ..progress import run_to_completion
    from ..result_files import request_digest
    from ..errors import MaskClipError
    from .batch import SetupFailed, Task, run_tasks, skipped_line

    if bool(args.from_segment) == bool(args.images):
        raise InvalidInputError("Give either --images with --labels, or --from-segment (not both).")
    if args.from_segment:
        extra = [flag for flag, value in (("--labels", args.labels), ("--classes", args.classes),
                                          ("--background", args.background),
                                          ("--confidence", args.confidence),
                                          ("--edited", args.edited)) if value]
        if extra:
            raise InvalidInputError(
                f"{', '.join(extra)} cannot be used with --from-segment: the segment folder's "
                "<stem>_classes.json files give the classes, labels and confidence."
            )
    jobs = _jobs_from_segment(args) if args.from_segment else _jobs_from_files(args)
    names = [job["name"] for job in jobs]
    if len({n.casefold() for n in names}) != len(names):
        raise InvalidInputError("Two inputs share a file name stem; sample names would collide.")

    # Checks against the dataset before anything is written (2D names; stacks are checked per file).
    out = Path(args.out)
    check_export_target(out, names)  # a foreign folder, links, files in the way
    existing = None
    skipped = 0
    for job in jobs:
        job["run"] = {"job": job["name"], "request": request_digest(_request(job, args))}
    if is_dataset(out):
        dataset = read_dataset(out, check_files=False)
        finished = _finished_jobs(dataset, jobs)
        if not args.overwrite and finished:
            jobs = [job for job in jobs if job["name"] not in finished]
            names = [job["name"] for job in jobs]
            skipped = len(finished)
        taken = [n for n in names if n in dataset]
        if taken and not args.overwrite:
            raise InvalidInputError(
                f"The dataset already has sample(s) {', '.join(taken[:3])}; pass --overwrite to "
                "replace them."
            )
        existing = read_class_table(out / CLASSES_JSON) if len(dataset) else None
    for job in jobs:  # every input's classes must fit the dataset's (as extended by earlier ones)
        new = DatasetClasses.from_user(job["classes"], job["background"])
        existing = plan_class_mapping(existing, new, remap=args.remap,
                                      add_classes=args.add_classes).target

    if skipped:
        print(skipped_line(skipped))

    def task(job: dict[str, Any]) -> Task:
        def run(update) -> str:
            data = _load(job, want_confidence=not args.no_confidence or args.min_confidence is not None)
            shape = data["labels"].shape
            # Which samples this input makes, so a rerun knows when it is finished.
            job["provenance"]["cli_run"] = {**job["run"], "samples": int(np.prod(shape[:-2], dtype=np.int64))}
            if not session.opened:  # at the first input that loads (a bad first one creates nothing)
                try:
                    run_to_completion(session.open_iter(len(jobs)), update)
                except (MaskClipError, OSError) as exc:  # locked, unwritable: every input would fail
                    raise SetupFailed(exc) from exc
                session.expect(names, overwrite=args.overwrite)
            report = session.export(
                job["name"], data["image"], data["labels"], job["classes"],
                background=job["background"], probabilities=data["probabilities"],
                edited=data["edited"], min_confidence=args.min_confidence,
                save_confidence=not args.no_confidence, overwrite=args.overwrite,
                remap=args.remap, add_classes=args.add_classes, provenance=job["provenance"],
                source={"image": str(job["image"])},
                channel_axis=(args.channel_axis if args.channel_axis is not None
                              else job.get("channel_axis")),
                progress=update,
            )
            samples.extend(report.samples)
            return f"{Path(job['image']).name}: {report.summary()}"

        return Task(Path(job["image"]).name, run)

    samples: list[str] = []
    # One writer session for every input: one lock, one index read, few dataset.json rewrites.
    session = ExportSession(out)
    try:
        code = run_tasks([task(job) for job in jobs], command="export", quiet=args.quiet,
                         unit="sample")
    finally:
        session.close()
    print(f"{len(samples)} sample(s) in {out}")
    return code


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write images and labels as a training dataset folder",
        description="Write a dataset folder: images/<name>.png|tif, masks/<name>.png (palette, "
        "255 = ignore; uint16 TIFF beyond 254 classes), confidence/<name>.tif (float16 CxHxW), "
        "classes.json and dataset.json. Appends to an existing dataset with the same classes.",
    )
    source = parser.add_argument_group("from files")
    source.add_argument("--images", nargs="+", metavar="IMAGE", help="image files (sample names are their stems)")
    source.add_argument("--labels", nargs="+", metavar="LABELS",
                        help="label files in the same order (PNG or TIFF of class indices: 0 "
                        "background, k = k-th class, 255 ignore); a 3D TIFF gives one sample per slice")
    source.add_argument("--classes", help="class names as in segment, e.g. 'cat, dog; puppy'")
    source.add_argument("--background", default=None, metavar="NAMES",
                        help="names of class 0 (default 'background')")
    source.add_argument("--confidence", nargs="+", metavar="TIFF",
                        help="optional CxHxW probability TIFFs, one per image")
    source.add_argument("--edited", nargs="+", metavar="MASK",
                        help="optional masks of pixels a person painted (non-zero = edited), one per image")
    seg = parser.add_argument_group("from a segment output folder")
    seg.add_argument("--from-segment", metavar="DIR",
                     help="folder written by 'napari-maskclip segment' (classes and confidence come from it)")
    seg.add_argument("--images-dir", metavar="DIR",
                     help="folder of the source images (found by stem); default: the paths segment recorded")
    parser.add_argument("--out", required=True, metavar="DATASET", help="dataset folder (created or appended to)")
    parser.add_argument("--min-confidence", type=unit_float, default=None, metavar="P",
                        help="unedited pixels whose label has probability below P become 255 (ignore)")
    parser.add_argument("--no-confidence", action="store_true", help="do not store confidence maps")
    parser.add_argument("--overwrite", action="store_true", help="replace samples that exist")
    parser.add_argument("--remap", action="store_true",
                        help="map a different class list onto the dataset's by name")
    parser.add_argument("--add-classes", action="store_true",
                        help="with --remap: append classes the dataset lacks to its list")
    parser.add_argument("--channel-axis", type=int, default=None, metavar="AXIS",
                        help="axis of the image's channels, if not last")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
