"""Segmentation results on disk: the three files ``segment`` and ``predict`` write per image.

* ``<stem>_labels.png``: palette PNG, uint8 (0 = background); ``<stem>_labels.tif`` (uint16)
  when there are more than 255 classes.
* ``<stem>_confidence.tif``: float32 ``C x H x W``, one probability map per class.
* ``<stem>_classes.json``: index -> name, synonyms and colour, the background, the classes
  removed by prompt denoising, and the settings used (model, thresholds, windows...).

Every file is written atomically, the JSON last, so a folder holding ``*_classes.json`` for an
image holds its two other files too. :func:`read_result` reads them back (used by ``export``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .atomic import atomic_write_text
from .errors import InvalidInputError
from .image_files import read_float_stack, read_label_image, write_float_stack, write_label_image

__all__ = ["ResultFiles", "write_result", "read_result", "result_paths", "find_results"]

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


def result_paths(out_dir: str | os.PathLike, stem: str) -> ResultFiles:
    """Where the files of image ``stem`` go in ``out_dir`` (labels suffix decided on write)."""
    out = Path(out_dir)
    return ResultFiles(
        labels_path=out / f"{stem}{LABELS_SUFFIX}.png",
        confidence_path=out / f"{stem}{CONFIDENCE_SUFFIX}",
        classes_path=out / f"{stem}{CLASSES_SUFFIX}",
    )


def write_result(
    result: Any,
    out_dir: str | os.PathLike,
    stem: str,
    *,
    confidence: bool = True,
    extra: Optional[dict[str, Any]] = None,
) -> ResultFiles:
    """Write a :class:`~napari_maskclip.engine.SegmentationResult` (or alike) as three files."""
    paths = result_paths(out_dir, stem)
    labels_path = write_label_image(paths.labels_path, result.labels, result.colors)
    confidence_path = None
    if confidence:
        confidence_path = write_float_stack(paths.confidence_path, result.probabilities)
    table = result.classes_table()
    table["files"] = {
        "labels": labels_path.name,
        "confidence": confidence_path.name if confidence_path else None,
    }
    if extra:
        table.update(extra)
    atomic_write_text(paths.classes_path, json.dumps(table, indent=2, default=_jsonable))
    return ResultFiles(labels_path, confidence_path, paths.classes_path, table=table)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_result(classes_json: str | os.PathLike, *, confidence: bool = False) -> ResultFiles:
    """Read one image's result files back, starting from its ``*_classes.json``."""
    path = Path(classes_json)
    if not path.name.endswith(CLASSES_SUFFIX):
        raise InvalidInputError(f"{path} is not a '*{CLASSES_SUFFIX}' file written by segment.")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"Cannot read {path}: {exc}") from exc
    files = table.get("files", {})
    labels_path = path.parent / files.get("labels", path.name.replace(CLASSES_SUFFIX, LABELS_SUFFIX + ".png"))
    conf_name = files.get("confidence")
    confidence_path = path.parent / conf_name if conf_name else None
    out = ResultFiles(labels_path, confidence_path, path, table=table)
    out.labels = read_label_image(labels_path)
    if confidence and confidence_path is not None and confidence_path.is_file():
        out.confidence = read_float_stack(confidence_path)
    return out


def find_results(folder: str | os.PathLike) -> list[Path]:
    """All ``*_classes.json`` files of a ``segment`` output folder, sorted."""
    return sorted(Path(folder).glob(f"*{CLASSES_SUFFIX}"))
