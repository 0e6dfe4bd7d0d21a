"""Segmentation results on disk: the three files ``segment`` and ``predict`` write per image.

* ``<stem>_labels.png``: palette PNG, uint8 (0 = background); ``<stem>_labels.tif`` (uint16)
  when there are more than 255 classes.
* ``<stem>_confidence.tif``: float32 ``C x H x W``, one probability map per class.
* ``<stem>_classes.json``: index -> name, synonyms and colour, the background, the classes
  removed by prompt denoising, and the settings used (model, thresholds, windows...).

Every file is written atomically, the JSON last, so a folder holding ``*_classes.json`` for an
image holds its two other files too. :func:`read_result` reads them back (used by ``export``).

Which files are ours: a ``<stem>_classes.json`` this package wrote (its ``files`` entry lists the
other two), and label/confidence files it lists. :func:`plan_result` decides, before any work,
whether an image is still to do, already finished by the same request (same input file, same
settings: skipped), or blocked by files that are not ours or belong to another request.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .atomic import atomic_write_text
from .errors import InvalidInputError
from .image_files import read_float_stack, read_label_image, write_float_stack, write_label_image

__all__ = [
    "ResultFiles",
    "write_result",
    "read_result",
    "result_paths",
    "find_results",
    "read_result_table",
    "ResultPlan",
    "plan_result",
    "request_digest",
    "source_fingerprint",
    "remove_stale_results",
    "table_text",
    "previous_table",
]

LABELS_SUFFIX = "_labels"
CONFIDENCE_SUFFIX = "_confidence.tif"
CLASSES_SUFFIX = "_classes.json"


@dataclass
class ResultFiles:
    """The paths of one image's result files, and (after reading) their content."""

    labels_path: Path
    confidence_path: Optional[Path]
    classes_path: Path
    labels: Optional[np.ndarray] = None
    confidence: Optional[np.ndarray] = None
    table: Optional[dict[str, Any]] = None

    @property
    def stem(self) -> str:
        return self.classes_path.name[: -len(CLASSES_SUFFIX)]

    @property
    def paths(self) -> list[Path]:
        """Every file of this result, the classes table last."""
        return [p for p in (self.labels_path, self.confidence_path, self.classes_path) if p]


def result_paths(
    out_dir: str | os.PathLike,
    stem: str,
    *,
    n_classes: Optional[int] = None,
    confidence: bool = True,
    stack: bool = False,
) -> ResultFiles:
    """Where the files of image ``stem`` go in ``out_dir``.

    The labels are a PNG up to 255 classes and a TIFF beyond (as :func:`write_label_image`
    decides); without ``n_classes`` the PNG name is given. A ``stack``'s labels are a TIFF.
    """
    out = Path(out_dir)
    suffix = ".tif" if stack or (n_classes is not None and n_classes > 255) else ".png"
    return ResultFiles(
        labels_path=out / f"{stem}{LABELS_SUFFIX}{suffix}",
        confidence_path=out / f"{stem}{CONFIDENCE_SUFFIX}" if confidence else None,
        classes_path=out / f"{stem}{CLASSES_SUFFIX}",
    )


def write_result(
    result: Any,
    out_dir: str | os.PathLike,
    stem: str,
    *,
    confidence: bool = True,
    extra: Optional[dict[str, Any]] = None,
    confidence_writer: Any = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ResultFiles:
    """Write a :class:`~napari_maskclip.engine.SegmentationResult` (or alike) as three files.

    ``confidence_writer``: a :class:`~napari_maskclip.image_files.FloatStackWriter` the maps were
    streamed into (when ``result.probabilities`` is None because they were too large to hold).
    ``progress(done, total)``: rows written, counting the labels' rows and each confidence map's
    (a huge image's files take minutes to compress: the bar's last stage).
    Files an earlier result of ``stem`` listed and this one does not (a confidence TIFF now
    skipped, a labels TIFF now a PNG) are removed after the new table is in place.
    """
    colors = result.colors
    paths = result_paths(out_dir, stem, n_classes=len(colors), confidence=confidence)
    previous = _read_own_table(paths.classes_path)
    # The table first: a result that cannot be written whole (NaN in a setting) writes nothing.
    table = result.classes_table()
    table["files"] = {
        "labels": paths.labels_path.name,
        "confidence": paths.confidence_path.name if paths.confidence_path else None,
    }
    if extra:
        table.update(extra)
    text = table_text(table, paths.classes_path)
    height = int(result.labels.shape[0])
    maps = len(colors) if confidence else 0
    total, written = height * (1 + maps), [0]

    def rows_done(n: int) -> None:
        written[0] = min(total, written[0] + n)
        if progress is not None:
            progress(written[0], total)

    rows_done(0)
    labels_path = write_label_image(paths.labels_path, result.labels, colors)
    rows_done(height)
    if labels_path != paths.labels_path:  # label values beyond the class count: not a result
        labels_path.unlink()
        raise InvalidInputError(f"{stem}: label values exceed the {len(colors)} classes; not written.")
    confidence_path = None
    if confidence and confidence_writer is not None:
        confidence_path = confidence_writer.commit(paths.confidence_path, on_rows=rows_done)
    elif confidence:
        confidence_path = write_float_stack(paths.confidence_path, result.probabilities)
    rows_done(total)
    atomic_write_text(paths.classes_path, text)
    remove_stale_results(previous, paths.classes_path.parent, stem,
                         keep={labels_path.name, confidence_path.name if confidence_path else ""})
    return ResultFiles(labels_path, confidence_path, paths.classes_path, table=table)


def table_text(table: dict[str, Any], path: Path) -> str:
    """The JSON text of a results table; NaN in a setting is refused (the file would not be
    JSON), so a result that cannot be written whole writes nothing."""
    try:
        return json.dumps(table, indent=2, default=_jsonable, allow_nan=False)
    except ValueError as exc:
        raise InvalidInputError(f"Refusing to write {path}: {exc}.") from exc


def previous_table(path: Path) -> Optional[dict[str, Any]]:
    """The table of an earlier result at ``path`` this package wrote (for the clean-up of
    :func:`remove_stale_results`), else None."""
    return _read_own_table(path)


def remove_stale_results(previous: Optional[dict[str, Any]], folder: Path, stem: str,
                         keep: set[str]) -> None:
    """Remove the files an earlier result of ``stem`` listed (``previous``, its table) and the
    new one does not (``keep``): only names this module gives a result of ``stem``, so a
    hand-edited table cannot point the clean-up at other files."""
    if previous is None:
        return
    ours = {f"{stem}{LABELS_SUFFIX}.png", f"{stem}{LABELS_SUFFIX}.tif", f"{stem}{CONFIDENCE_SUFFIX}"}
    for name in previous["files"].values():
        old = folder / str(name)
        if name in ours and name not in keep and old.is_file() and not old.is_symlink():
            old.unlink()


def request_digest(request: dict[str, Any]) -> str:
    """A short stable hash of what a run was asked to do (inputs' options and settings)."""
    text = json.dumps(request, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def source_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Which input file a result was made from: its absolute path, size and modification time."""
    p = Path(path)
    stat = p.stat()
    return {"path": str(p.resolve()), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


@dataclass
class ResultPlan:
    """What a run does about one image's result files (see :func:`plan_result`)."""

    files: ResultFiles
    #: ``"todo"``, ``"finished"`` (same request already written: skip) or ``"refused"``.
    state: str
    reason: str = ""


def _read_own_table(path: Path) -> Optional[dict[str, Any]]:
    """The table of a ``<stem>_classes.json`` this package wrote, else None (not ours/unreadable)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_TABLE_BYTES:
            return None
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(table, dict) or not isinstance(table.get("classes"), list):
        return None
    if not isinstance(table.get("settings"), dict) or not isinstance(table.get("files"), dict):
        return None
    return table


def plan_result(
    files: ResultFiles,
    *,
    run_record: dict[str, Any],
    overwrite: bool,
) -> ResultPlan:
    """Decide, before any work, what to do with the result files of one image.

    * none exists: ``todo``;
    * the classes table is ours, records the same request and the same input file, and every
      file exists: ``finished`` (unless ``overwrite``: then ``todo``);
    * a file exists that no classes table of ours lists (the user's own), or a path is a
      folder: ``refused``, even with ``overwrite`` (the project replaces only files it made);
    * files of an earlier run with other settings or another input: ``refused`` without
      ``overwrite``, ``todo`` with it.
    """
    paths = files.paths
    for path in paths:
        if path.is_dir():
            return ResultPlan(files, "refused", f"{path} is a folder; move it away or choose another --out.")
        if path.is_symlink():
            return ResultPlan(files, "refused", f"{path} is a symbolic link; napari-maskclip does not "
                              "write through links. Remove it or choose another --out.")
    existing = [p for p in paths if p.exists()]
    if not existing:
        return ResultPlan(files, "todo")
    table = _read_own_table(files.classes_path)
    listed = set()
    if table is not None:
        listed = {files.classes_path.name, *(str(v) for v in table["files"].values() if v)}
    foreign = [p for p in existing if p.name not in listed]
    if foreign:
        return ResultPlan(files, "refused", f"{foreign[0]} exists and was not written by "
                          "napari-maskclip (no result of it lists it); move it away or choose "
                          "another --out.")
    same = table is not None and table.get("run") == run_record
    if same and all(p.is_file() for p in paths):
        return ResultPlan(files, "todo" if overwrite else "finished")
    if overwrite:
        return ResultPlan(files, "todo")
    return ResultPlan(files, "refused", f"{files.classes_path} holds the result of an earlier run "
                      "with other settings or another input; pass --overwrite to replace it, or "
                      "choose another --out.")


#: A results table is a few kB; anything much larger is not one of ours (and is not read whole).
_MAX_TABLE_BYTES = 16 << 20


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_result_table(classes_json: str | os.PathLike) -> dict[str, Any]:
    """The table of a ``<stem>_classes.json``, checked: size, JSON, and the file names it lists
    (plain names of this folder), so an edited table cannot point readers elsewhere."""
    path = Path(classes_json)
    try:
        size = path.stat().st_size
        if size > _MAX_TABLE_BYTES:
            raise InvalidInputError(f"{path} is {size} bytes: too large to be a result table.")
        table = json.loads(path.read_text(encoding="utf-8"))
    except InvalidInputError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise InvalidInputError(
            f"Cannot read {path} ({' '.join(str(exc).split())}): restore it, or run segment again."
        ) from exc
    files = table.get("files", {}) if isinstance(table, dict) else None
    if not isinstance(table, dict) or not isinstance(files, dict):
        raise InvalidInputError(f"{path} is not a result table written by napari-maskclip segment.")
    for key in ("labels", "confidence"):
        name = files.get(key)
        if name is not None and (not isinstance(name, str) or Path(name).name != name
                                 or name in ("", ".", "..")):
            raise InvalidInputError(f"{path}: files.{key} {name!r} is not a file name of this folder.")
    return table


def read_result(classes_json: str | os.PathLike, *, confidence: bool = False) -> ResultFiles:
    """Read one image's result files back, starting from its ``*_classes.json``."""
    path = Path(classes_json)
    if not path.name.endswith(CLASSES_SUFFIX):
        raise InvalidInputError(f"{path} is not a '*{CLASSES_SUFFIX}' file written by segment.")
    table = read_result_table(path)
    files = table.get("files", {})
    labels_path = path.parent / (files.get("labels") or path.name.replace(CLASSES_SUFFIX, LABELS_SUFFIX + ".png"))
    conf_name = files.get("confidence")
    confidence_path = path.parent / conf_name if conf_name else None
    out = ResultFiles(labels_path, confidence_path, path, table=table)
    out.labels = read_label_image(labels_path)
    if confidence and confidence_path is not None and confidence_path.is_file():
        if out.labels.ndim > 2:  # a stack's maps: read slice by slice when used (export)
            from .stack_files import TiffPlanes

            out.confidence = TiffPlanes(confidence_path)
        else:
            out.confidence = read_float_stack(confidence_path)
        expected = (len(table.get("classes") or []), *out.labels.shape)
        if out.confidence.shape != expected:
            raise InvalidInputError(
                f"{confidence_path} has shape {out.confidence.shape}, but {path} says "
                f"{expected}; run segment again for this image."
            )
    return out


def find_results(folder: str | os.PathLike) -> list[Path]:
    """All ``*_classes.json`` files of a ``segment`` output folder, sorted."""
    return sorted(Path(folder).glob(f"*{CLASSES_SUFFIX}"))
