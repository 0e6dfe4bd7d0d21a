"""Exporting labels (2D or stacks) into a dataset folder, safely.

:func:`export_sample_iter` is the one exporter: the widget's Export button, napari's Save
(``_writer``), the CLI and Python all call it (or :func:`export_sample`, which runs it to the end).
It yields :class:`~napari_maskclip.progress.Progress` per slice and returns an
:class:`ExportReport`.

Safety, in order:

1. **Everything is checked before anything is written**: shapes, label values (for in-memory
   arrays), the class list against the dataset's (see :mod:`.remap`), that no listed sample
   would be replaced without ``overwrite``, and that the folder and the paths the new samples use
   hold nothing the exporter did not make (see :mod:`.ownership`: it only ever creates, replaces or
   deletes files its own ``dataset.json`` lists, and its own temp and lock files).
2. **One export at a time**: the dataset's lock file (:mod:`.lock`) makes a concurrent export
   wait (up to ``lock_timeout`` seconds, then it is refused with one line).
3. **A journal first**: before any sample file is written, ``dataset.json`` lists the paths the
   export may create (``"pending"``) and drops the samples it replaces. A crash therefore leaves
   only files the index accounts for; the next export removes the unlisted pending ones.
4. **A sample's files are committed together**: each is written to a temporary file beside its
   target and fsynced; only when all are complete are they renamed into place.
5. **``dataset.json`` is rewritten (atomically) after the files it lists**, at least once a
   second and at the end. A crash leaves either the old index or the new one, never a listed
   sample with missing or partial files. Replacing a sample first drops it from the index, so an
   interrupted overwrite loses the old version (which was being replaced) but never pairs an old
   mask with a new image.

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
from ..atomic import atomic_write, atomic_write_text
from ..classes import ClassesLike
from ..errors import DatasetError, InvalidInputError
from ..progress import ProgressGenerator, Progress, run_to_completion
from . import files as _files
from .class_table import DEFAULT_BACKGROUND, DatasetClasses, read_class_table
from .layout import (
    CLASSES_JSON,
    DATASET_FORMAT,
    DATASET_JSON,
    FORMAT_VERSION,
    ignore_index,
    sample_file_slots,
    sample_paths,
)
from .lock import LOCK_TIMEOUT_S, DatasetLock
from .ownership import (
    check_dataset_folder,
    files_in_the_way,
    own_file,
    remove_own_files,
    remove_stale_temps,
)
from .pixels import prepare_mask
from .reader import read_index
from .remap import ClassMapping, plan_class_mapping
from .slices import EditedLike, SliceData, plan_stack

__all__ = [
    "ExportReport",
    "export_sample_iter",
    "export_sample",
    "export_result",
    "check_export_target",
]

#: Longest time between two rewrites of dataset.json while a stack is exported.
COMMIT_INTERVAL_S = 1.0
#: Key of ``dataset.json`` that journals the files an export is creating (see :mod:`.ownership`).
PENDING_KEY = "pending"
_FILE_KEYS = ("image", "mask", "confidence", "edited")


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
        stored = self.info.pop(PENDING_KEY, None)
        #: Files an export journaled (may be creating); the exporter's even while unlisted.
        self.pending: set[str] = set()
        if isinstance(stored, list):
            self.pending = {p for p in stored if isinstance(p, str)}

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.info["samples"]

    def names(self) -> list[str]:
        return [str(e["name"]) for e in self.entries]

    def files_of(self, names: Iterable[str]) -> set[str]:
        """Relative paths the entries of ``names`` list."""
        wanted = set(names)
        return {e[k] for e in self.entries if e.get("name") in wanted
                for k in _FILE_KEYS if isinstance(e.get(k), str)}

    def listed_files(self) -> set[str]:
        return {e[k] for e in self.entries for k in _FILE_KEYS if isinstance(e.get(k), str)}

    def drop(self, names: Iterable[str]) -> None:
        gone = set(names)
        self.info["samples"] = [e for e in self.entries if e["name"] not in gone]

    def add(self, entry: dict[str, Any]) -> None:
        self.drop([entry["name"]])
        self.entries.append(entry)

    def settle(self) -> None:
        """Delete the pending files no sample lists (a stopped or killed export's, or a replaced
        sample's old ones); keep journaling those that cannot be deleted."""
        self.pending = set(remove_own_files(self.root, sorted(self.pending - self.listed_files())))

    def commit(self) -> Path:
        self.info["modified"] = _now()
        self.info["modified_with"] = f"napari-maskclip {__version__}"
        info = dict(self.info)
        pending = sorted(self.pending - self.listed_files())
        if pending:
            info[PENDING_KEY] = pending
        return _commit_index(self.root / DATASET_JSON, _index_text(info))


def _index_text(info: dict[str, Any]) -> str:
    """dataset.json: the header indented, then one line per sample. json's ``indent`` falls back to
    its pure-Python encoder; each export rewrites the index (twice), so at 1200 samples that cost
    0.19 s per rewrite, 0.06 s with one C-encoded line per sample (measured on 2 busy cores)."""
    head = _dumps({k: v for k, v in info.items() if k != "samples"}).rstrip()[:-1].rstrip()
    rows = ",\n    ".join(json.dumps(e, default=_jsonable, ensure_ascii=False) for e in info["samples"])
    samples = f'[\n    {rows}\n  ]' if rows else "[]"
    return f'{head}{"," if head != "{" else ""}\n  "samples": {samples}\n}}\n'


def _in_the_way(root: Path, blocked: list[str]) -> DatasetError:
    more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
    return DatasetError(
        f"{root / blocked[0]} is in the way of a new sample{more}: dataset.json does not list it, "
        "so napari-maskclip did not write it and never replaces it (overwrite replaces listed "
        "samples only). Move it out of the dataset, or choose another sample name."
    )


def check_export_target(dataset_dir: Union[str, os.PathLike], names: Iterable[str]) -> None:
    """Refuse now what exporting samples ``names`` into ``dataset_dir`` would refuse for the folder
    (not a dataset and not empty, links) and its files (in the way), before anything is written.

    For batch exports (the CLI) that check every input before the first one is exported; the
    export itself checks again under the dataset's lock. (Names the dataset lists already are
    refused without overwrite by the export, not here.)
    """
    root = Path(dataset_dir)
    if not check_dataset_folder(root):
        return
    index = _Index(root, read_index(root))
    listed = set(index.names())
    names = list(names)
    replacing = [n for n in names if n in listed]
    owned = {rel for rel in index.files_of(replacing) | index.pending if own_file(root, rel)}
    blocked = files_in_the_way(root, names, owned)
    if blocked:
        raise _in_the_way(root, blocked)


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
    lock_timeout: Optional[float] = None,
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
    * ``lock_timeout``: seconds to wait for another export writing to the same dataset (default
      :data:`~napari_maskclip.export.lock.LOCK_TIMEOUT_S`), then refuse.
    """
    root = Path(dataset_dir)
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise InvalidInputError(f"min_confidence must lie in 0..1, got {min_confidence}.")
    if min_confidence is not None and probabilities is None:
        raise InvalidInputError(
            "A minimum confidence needs the probability maps (confidence) of the labels; pass "
            "them, or export without the threshold."
        )
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

    check_dataset_folder(root)  # refuse a foreign folder before creating anything in it
    total = len(plan.slices)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"Cannot create the dataset folder {root} ({exc.strerror or exc}); choose a folder you "
            "can write to."
        ) from exc
    lock = DatasetLock(root)
    try:
        for message in lock.acquire_iter(LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout):
            yield Progress("export", 0, total, message)
        return (yield from _export_locked(
            root, plan, new_classes, in_ignore, overwrite=overwrite, remap=remap,
            add_classes=add_classes, min_confidence=min_confidence,
            save_confidence=save_confidence, provenance=provenance, source=source,
        ))
    finally:
        lock.release()


def _export_locked(
    root: Path,
    plan: Any,
    new_classes: DatasetClasses,
    in_ignore: int,
    *,
    overwrite: bool,
    remap: bool,
    add_classes: bool,
    min_confidence: Optional[float],
    save_confidence: bool,
    provenance: Optional[dict[str, Any]],
    source: Optional[dict[str, Any]],
) -> ProgressGenerator[ExportReport]:
    """The part of an export that reads and writes the dataset (the caller holds its lock)."""
    is_dataset = check_dataset_folder(root)  # again: another export may have made it meanwhile
    index = _Index(root, read_index(root) if is_dataset else None)
    # A killed export's leftovers: its journaled files that no sample lists, and its temp files.
    index.settle()
    remove_stale_temps(root)
    existing_classes = read_class_table(root / CLASSES_JSON) if index.entries else None
    mapping: ClassMapping = plan_class_mapping(existing_classes, new_classes, remap=remap,
                                               add_classes=add_classes)
    mapping.target = mapping.target.with_colors()  # classes.json and every mask palette agree
    m = len(new_classes.classes)
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
    # Files the exporter may replace: those the replaced samples list (and that are plain files
    # inside the dataset). Anything else at a path a new sample may use is someone else's.
    owned = {rel for rel in index.files_of(replacing) if own_file(root, rel) is not None}
    blocked = files_in_the_way(root, names, owned)
    if blocked:
        raise _in_the_way(root, blocked)

    report = ExportReport(dataset=root, overwritten=replacing, classes=mapping.target,
                          classes_added=list(mapping.added),
                          class_mapping=None if mapping.identity else mapping.as_dict())
    total = len(plan.slices)
    yield Progress("export", 0, total, f"exporting {total} sample(s) to {root}")

    # The journal: drop the replaced samples and list every path the new ones may use, so that
    # whatever a crash leaves behind is accounted for by dataset.json.
    index.drop(replacing)
    index.pending |= owned | {rel for n in names for rel in sample_file_slots(n)}
    report.files.append(index.commit())
    classes_text = _dumps(mapping.target.to_json())
    classes_path = root / CLASSES_JSON
    if not classes_path.is_file() or classes_path.read_text(encoding="utf-8") != classes_text:
        atomic_write_text(classes_path, classes_text)
        report.files.append(classes_path)

    prov = _provenance(provenance)
    last_commit = time.monotonic()
    completed = settled = False
    try:
        for i in range(total):
            piece = plan.get(i)
            entry, written = _export_one(root, piece, mapping, m, in_ignore, min_confidence,
                                         save_confidence, prov, source, report)
            report.files.extend(written)
            index.add(entry)
            report.samples.append(piece.name)
            if i == total - 1:
                # Unlisted pending files (a replaced sample's old .tif now a .png) go first; the
                # index that no longer journals them is written next.
                index.settle()
                report.files.append(index.commit())
                settled = True
            elif time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                report.files.append(index.commit())
                last_commit = time.monotonic()
            yield Progress("export", i + 1, total, piece.name)
        completed = True
    finally:
        if not settled:  # stopped or failed: list what is complete, remove the rest's files
            index.settle()
            index.commit()
        report.cancelled = not completed
    report.files = list(dict.fromkeys(report.files))  # dataset.json is committed more than once
    return report


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
