"""Exporting labels (2D or stacks) into a dataset folder, safely.

:func:`export_sample_iter` is the one exporter: the widget's Export button, napari's Save
(``plugin.writer``), the CLI and Python all call it (or :func:`export_sample`, which runs it to the end).
It yields :class:`~napari_maskclip.progress.Progress` per slice and returns an
:class:`ExportReport`.

Safety, in order:

1. **Everything is checked before anything is written**: shapes, label values (for in-memory
   arrays), the class list against the dataset's (see :mod:`.remap`), and that no listed sample
   would be replaced without ``overwrite``.
2. **A sample's files are committed together**: each is written to a temporary file beside its
   target and fsynced; only when all are complete are they renamed into place.
3. **``dataset.json`` is rewritten (atomically) after the files it lists**, at least once a
   second and at the end. A crash leaves either the old index or the new one, never a listed
   sample with missing or partial files; files the index does not list are ignored by the reader
   and replaced by the next export of that name. Replacing a sample first drops it from the
   index, so an interrupted overwrite loses the old version (which was being replaced) but never
   pairs an old mask with a new image.

Closing the generator stops after the current slice; the slices already exported stay (each is a
complete sample) and are listed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .. import __version__
from ..atomic import TEMP_PREFIX, atomic_write, atomic_write_text
from ..classes import ClassesLike
from ..errors import DatasetError, InvalidInputError
from ..progress import ProgressGenerator, Progress, run_to_completion
from . import files as _files
from .class_table import DEFAULT_BACKGROUND, DatasetClasses, read_class_table
from .layout import (
    CLASSES_JSON,
    CONFIDENCE_DIR,
    DATASET_FORMAT,
    DATASET_JSON,
    EDITED_DIR,
    FORMAT_VERSION,
    IMAGES_DIR,
    MASKS_DIR,
    ignore_index,
    sample_file_candidates,
    sample_paths,
)
from .pixels import prepare_mask
from .reader import read_index
from .remap import ClassMapping, plan_class_mapping
from .slices import EditedLike, SliceData, plan_stack

__all__ = ["ExportReport", "export_sample_iter", "export_sample", "export_result"]

#: Longest time between two rewrites of dataset.json while a stack is exported.
COMMIT_INTERVAL_S = 1.0
_OWN_ENTRIES = {DATASET_JSON, CLASSES_JSON, IMAGES_DIR, MASKS_DIR, CONFIDENCE_DIR, EDITED_DIR}


@dataclass
class ExportReport:
    """What an export did."""

    dataset: Path
    #: Names of the samples written, in order.
    samples: list[str] = field(default_factory=list)
    #: Every file written (sample files, classes.json, dataset.json).
    files: list[Path] = field(default_factory=list)
    #: Samples that replaced existing ones (``overwrite``).
    overwritten: list[str] = field(default_factory=list)
    classes: Optional[DatasetClasses] = None
    #: Classes appended to the dataset's list (``remap`` + ``add_classes``).
    classes_added: list[str] = field(default_factory=list)
    #: The sample's label -> the dataset's label, when remapped (None: unchanged).
    class_mapping: Optional[dict[int, int]] = None
    ignored_low_confidence: int = 0
    #: True when the export was stopped before its last slice.
    cancelled: bool = False

    def summary(self) -> str:
        parts = [f"{len(self.samples)} sample(s) -> {self.dataset}"]
        if self.overwritten:
            parts.append(f"{len(self.overwritten)} replaced")
        if self.classes_added:
            parts.append(f"classes added: {', '.join(self.classes_added)}")
        if self.class_mapping:
            parts.append("labels remapped by class name")
        if self.ignored_low_confidence:
            parts.append(f"{self.ignored_low_confidence} low-confidence pixels set to ignore")
        if self.cancelled:
            parts.append("stopped early")
        return "; ".join(parts)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return str(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_jsonable, ensure_ascii=False) + "\n"


def _check_folder(root: Path) -> None:
    """Refuse to scatter dataset files into a folder that holds other things."""
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"{root} is a file; give a folder for the dataset.")
    if not root.is_dir() or (root / DATASET_JSON).is_file():
        return
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in _OWN_ENTRIES and not p.name.startswith(TEMP_PREFIX))
    if foreign:
        raise InvalidInputError(
            f"{root} is not empty and not a dataset (it holds {', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder, or an existing "
            "dataset to append to."
        )


def _remove_temp_leftovers(root: Path) -> None:
    """Delete ``.tmp-*`` files an interrupted export left (concurrent exports are unsupported)."""
    for folder in (root, *(root / d for d in (IMAGES_DIR, MASKS_DIR, CONFIDENCE_DIR, EDITED_DIR))):
        if folder.is_dir():
            for leftover in folder.glob(f"{TEMP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _provenance(provenance: Optional[dict[str, Any]]) -> dict[str, Any]:
    record = dict(provenance or {})
    settings = record.get("settings")
    if isinstance(settings, dict):
        for key in ("model", "pretrained"):
            if key not in record and key in settings:
                record[key] = settings[key]
    record.setdefault("model", None)
    record.setdefault("pretrained", None)
    record["napari_maskclip_version"] = __version__
    record["exported_at"] = _now()
    return record


class _Index:
    """``dataset.json`` in memory; :meth:`commit` writes it atomically."""

    def __init__(self, root: Path, info: Optional[dict[str, Any]]):
        self.root = root
        now = _now()
        self.info = info or {
            "format": DATASET_FORMAT,
            "format_version": FORMAT_VERSION,
            "created_with": f"napari-maskclip {__version__}",
            "created": now,
            "samples": [],
        }
        self.info["format_version"] = FORMAT_VERSION

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.info["samples"]

    def names(self) -> list[str]:
        return [str(e["name"]) for e in self.entries]

    def drop(self, names: Iterable[str]) -> None:
        gone = set(names)
        self.info["samples"] = [e for e in self.entries if e["name"] not in gone]

    def add(self, entry: dict[str, Any]) -> None:
        self.drop([entry["name"]])
        self.entries.append(entry)

    def commit(self) -> Path:
        self.info["modified"] = _now()
        self.info["modified_with"] = f"napari-maskclip {__version__}"
        return _commit_index(self.root / DATASET_JSON, _dumps(self.info))


def _commit_index(path: Path, text: str) -> Path:
    """The commit point of every export (a separate function, so tests can interrupt it)."""
    return atomic_write_text(path, text)


def _write_sample_files(
    root: Path, jobs: Sequence[tuple[str, Any]]
) -> list[Path]:
    """Write every file of one sample to temp files, then rename them all into place."""
    written = []
    with contextlib.ExitStack() as stack:
        for rel, write in jobs:
            target = root / rel
            tmp = stack.enter_context(atomic_write(target))
            write(tmp)
            written.append(target)
    return written


def export_sample_iter(
    dataset_dir: Union[str, os.PathLike],
    name: str,
    image: Any,
    labels: Any,
    classes: ClassesLike,
    *,
    background: Optional[ClassesLike] = DEFAULT_BACKGROUND,
    probabilities: Any = None,
    edited: EditedLike = None,
    min_confidence: Optional[float] = None,
    save_confidence: bool = True,
    overwrite: bool = False,
    remap: bool = False,
    add_classes: bool = False,
    provenance: Optional[dict[str, Any]] = None,
    source: Optional[dict[str, Any]] = None,
    input_ignore: Optional[int] = None,
    channel_axis: Optional[int] = None,
    slices: Optional[Iterable[Union[int, Sequence[int]]]] = None,
    axis_names: Optional[Sequence[str]] = None,
) -> ProgressGenerator[ExportReport]:
    """Export ``labels`` (and ``image``) as sample(s) ``name`` of the dataset ``dataset_dir``.

    * ``image``: ``H x W [x C]`` or a stack matching the labels (``channel_axis`` says where the
      channels are if not last); None writes a mask-only sample (``"image": null``).
    * ``labels``: ``H x W`` ints (0 background, k = ``classes[k-1]``, ``input_ignore`` = ignore,
      default 255, or 65535 beyond 254 classes), or a stack: one sample per slice, named
      ``<name>_z0003`` / ``<name>_t0001_z0003`` (``slices`` picks some, ``axis_names`` renames).
    * ``classes`` / ``background``: as typed (``"cat, dog; puppy"``) or ClassSpec lists.
    * ``probabilities``: ``C x ...labels.shape`` floats (one map per class) or a list of ``C``
      maps; saved as ``confidence/<name>.tif`` (float16) unless ``save_confidence`` is False.
    * ``edited``: bool mask shaped like the labels (True = a person painted it), True/False for
      all pixels, or None (unknown: recorded as ``"edited": null``).
    * ``min_confidence``: unedited pixels whose label has a probability below it become ignore.
    * ``overwrite``: replace listed samples of the same name (otherwise refused).
    * ``remap`` / ``add_classes``: fit a different class list to the dataset's (see :mod:`.remap`).
    * ``provenance``: ``{"model", "pretrained", "settings", ...}`` (``SegmentationResult.settings``
      carries model and pretrained); ``source``: free-form origin (file path, layer name).
    """
    root = Path(dataset_dir)
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise InvalidInputError(f"min_confidence must lie in 0..1, got {min_confidence}.")
    if min_confidence is not None and probabilities is None:
        raise InvalidInputError(
            "A minimum confidence needs the probability maps (confidence) of the labels; pass "
            "them, or export without the threshold."
        )
    _check_folder(root)
    new_classes = DatasetClasses.from_user(classes, background)
    m = len(new_classes.classes)
    plan = plan_stack(name, image, labels, probabilities=probabilities, edited=edited,
                      channel_axis=channel_axis, slices=slices, axis_names=axis_names)
    if plan.n_probability_channels is not None and plan.n_probability_channels != m:
        raise InvalidInputError(
            f"{plan.n_probability_channels} probability maps for {m} classes; give one map per "
            "class, in class order (background is not a map)."
        )
    in_ignore = ignore_index(m) if input_ignore is None else int(input_ignore)
    if isinstance(plan.labels, np.ndarray) and plan.labels.size:
        valid = plan.labels[plan.labels != in_ignore]
        if valid.size and (valid.min() < 0 or valid.max() > m):
            bad = int(valid.max()) if valid.max() > m else int(valid.min())
            raise InvalidInputError(
                f"Label value {bad} is not a class (0 = background, 1..{m} = "
                f"{', '.join(new_classes.names[:5])}{', ...' if m > 5 else ''}; {in_ignore} = "
                "ignore). Paint it with a listed class, or add the class to the list."
            )

    existing_info = read_index(root) if (root / DATASET_JSON).is_file() else None
    existing_classes = None
    if existing_info is not None and existing_info["samples"]:
        existing_classes = read_class_table(root / CLASSES_JSON)
    mapping: ClassMapping = plan_class_mapping(existing_classes, new_classes, remap=remap,
                                               add_classes=add_classes)
    index = _Index(root, existing_info)
    listed = index.names()
    names = [n for n, _ in plan.slices]
    folded = {n.casefold(): n for n in listed}
    clashes = [(n, folded[n.casefold()]) for n in names
               if n.casefold() in folded and folded[n.casefold()] != n]
    if clashes:
        new, old = clashes[0]
        raise DatasetError(
            f"Sample {new!r} differs only in letter case from the existing sample {old!r}; their "
            "files would collide on macOS and Windows. Choose another name."
        )
    replacing = [n for n in names if n in listed]
    if replacing and not overwrite:
        shown = ", ".join(replacing[:3]) + (f" and {len(replacing) - 3} more" if len(replacing) > 3 else "")
        raise DatasetError(
            f"The dataset already has sample(s) {shown}. Choose another name, or allow "
            "overwriting (Python: overwrite=True; CLI: --overwrite)."
        )

    report = ExportReport(dataset=root, overwritten=replacing, classes=mapping.target,
                          classes_added=list(mapping.added),
                          class_mapping=None if mapping.identity else mapping.as_dict())
    total = len(plan.slices)
    yield Progress("export", 0, total, f"exporting {total} sample(s) to {root}")

    # Commit order: drop replaced samples, then classes.json, then per slice files -> index.
    root.mkdir(parents=True, exist_ok=True)
    _remove_temp_leftovers(root)
    if replacing:
        index.drop(replacing)
        report.files.append(index.commit())
    classes_text = _dumps(mapping.target.to_json())
    classes_path = root / CLASSES_JSON
    if not classes_path.is_file() or classes_path.read_text(encoding="utf-8") != classes_text:
        atomic_write_text(classes_path, classes_text)
        report.files.append(classes_path)

    prov = _provenance(provenance)
    pending: list[str] = []
    last_commit = time.monotonic()
    completed = False
    try:
        for i in range(total):
            piece = plan.get(i)
            entry, written = _export_one(root, piece, mapping, m, in_ignore, min_confidence,
                                         save_confidence, prov, source, report)
            report.files.extend(written)
            index.add(entry)
            pending.append(piece.name)
            report.samples.append(piece.name)
            if i == total - 1 or time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                report.files.append(index.commit())
                _remove_stale(root, index, pending)
                pending.clear()
                last_commit = time.monotonic()
            yield Progress("export", i + 1, total, piece.name)
        completed = True
    finally:
        if pending:  # stopped or failed after some slices: list what is complete
            index.commit()
            _remove_stale(root, index, pending)
        report.cancelled = not completed
    report.files = list(dict.fromkeys(report.files))  # dataset.json is committed more than once
    return report


def _remove_stale(root: Path, index: _Index, names: Iterable[str]) -> None:
    """Delete files of ``names`` the index does not list (e.g. an old ``.tif`` now a ``.png``)."""
    by_name = {e["name"]: e for e in index.entries}
    for name in names:
        entry = by_name.get(name)
        if entry is None:
            continue
        keep = {root / entry[k] for k in ("image", "mask", "confidence", "edited") if entry.get(k)}
        for path in sample_file_candidates(root, name):
            if path not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()


def _export_one(
    root: Path,
    piece: SliceData,
    mapping: ClassMapping,
    m: int,
    in_ignore: int,
    min_confidence: Optional[float],
    save_confidence: bool,
    provenance: dict[str, Any],
    source: Optional[dict[str, Any]],
    report: ExportReport,
) -> tuple[dict[str, Any], list[Path]]:
    """Write one 2D sample's files (all or none) and return its index entry."""
    probabilities = None if piece.probabilities is None else np.asarray(piece.probabilities, dtype=np.float32)
    mask, stats = prepare_mask(
        piece.labels, n_classes=m, input_ignore=in_ignore, mapping=mapping,
        probabilities=probabilities, edited=piece.edited, min_confidence=min_confidence,
        name=piece.name,
    )
    report.ignored_low_confidence += stats.ignored_low_confidence
    image = piece.image
    if image is not None and image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    n_target = len(mapping.target.classes)
    keep_confidence = save_confidence and probabilities is not None
    paths = sample_paths(piece.name, image=image, n_classes=n_target,
                         confidence=keep_confidence, edited=piece.edited is not None)
    colors = mapping.target.colors
    jobs: list[tuple[str, Any]] = []
    if paths.image:
        jobs.append((paths.image, lambda p: _files.write_image_file(p, image)))
    jobs.append((paths.mask, lambda p: _files.write_mask_file(p, mask, colors)))
    if paths.confidence:
        conf = mapping.apply_confidence(probabilities)
        jobs.append((paths.confidence, lambda p: _files.write_confidence_file(p, conf)))
    if paths.edited:
        jobs.append((paths.edited, lambda p: _files.write_edited_file(p, piece.edited)))
    written = _write_sample_files(root, jobs)

    origin = dict(source or {})
    if piece.index:
        origin["index"] = list(piece.index)
    entry = {
        "name": piece.name,
        "image": paths.image,
        "mask": paths.mask,
        "confidence": paths.confidence,
        "edited": paths.edited,
        "shape": [int(mask.shape[0]), int(mask.shape[1])],
        "num_classes": n_target,
        "image_dtype": None if image is None else str(image.dtype),
        "image_shape": None if image is None else [int(s) for s in image.shape],
        "min_confidence": None if min_confidence is None else float(min_confidence),
        "pixels": stats.to_json(),
        "class_mapping": None if mapping.identity else {str(k): v for k, v in mapping.as_dict().items()},
        "source": origin,
        "provenance": provenance,
    }
    return entry, written


def export_sample(
    dataset_dir: Union[str, os.PathLike],
    name: str,
    image: Any,
    labels: Any,
    classes: ClassesLike,
    *,
    progress: Optional[Any] = None,
    **options: Any,
) -> ExportReport:
    """:func:`export_sample_iter` run to the end (``progress``: called with each Progress)."""
    return run_to_completion(
        export_sample_iter(dataset_dir, name, image, labels, classes, **options), progress
    )


def export_result(
    dataset_dir: Union[str, os.PathLike],
    name: str,
    image: Any,
    result: Any,
    *,
    labels: Any = None,
    **options: Any,
) -> ExportReport:
    """Export an engine :class:`~napari_maskclip.engine.SegmentationResult` (classes,
    background, probabilities and provenance taken from it). ``labels`` replaces
    ``result.labels`` (e.g. after editing); pass ``edited`` to say which pixels changed.
    """
    background = [spec.text for spec in getattr(result, "background", [])] or DEFAULT_BACKGROUND
    settings = dict(getattr(result, "settings", {}) or {})
    provenance = {
        "model": settings.get("model"),
        "pretrained": settings.get("pretrained"),
        "settings": settings,
        "removed_by_denoising": list(getattr(result, "removed_classes", [])),
        **(options.pop("provenance", None) or {}),
    }
    options.setdefault("probabilities", result.probabilities)
    options.setdefault("background", background)
    return export_sample(
        dataset_dir, name, image, result.labels if labels is None else labels,
        list(result.classes), provenance=provenance, **options,
    )
