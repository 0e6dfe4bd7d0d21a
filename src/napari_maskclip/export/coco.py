"""A dataset as a COCO instance-segmentation file (``napari-maskclip export-coco``).

Rules (the README's "Interoperability" section says the same):

* **One annotation per connected component of each class** (:mod:`.instances`): connectivity 2
  (diagonal neighbours connect) by default, 1 for face neighbours only; components smaller than
  ``min_area`` pixels are left out (counted). Masks are RLE (pycocotools' compressed string), so
  holes are kept; ``iscrowd`` is 0, ``area`` the pixel count, ``bbox`` ``[x, y, width, height]``
  of the pixels.
* **Categories** are the dataset's named classes: category id ``k`` = label ``k``, named as in
  ``classes.json`` (all of them, used or not). Background (label 0) is not a category, and ignored
  pixels (255 / 65535) are never part of an annotation; the image's ignored region is kept in its
  ``napari_maskclip.ignore`` field (an RLE, or null), which ``napari-maskclip import`` restores.
* **Images**: ``file_name`` is the image's path relative to the dataset folder (so
  ``CocoDetection(root=DATASET, annFile=...)`` finds it), ``width``/``height`` the mask's size,
  ids 1, 2, ... in dataset order. Mask-only samples (no image) are skipped and counted.
* **Provenance** per annotation: ``napari_maskclip.human_fraction`` is the share of its pixels a
  person painted (null when the sample does not record edits).

The output file is written atomically; an existing file is replaced only with ``overwrite`` and
only when napari-maskclip wrote it (its ``info.napari_maskclip`` marker).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .. import __version__
from ..atomic import atomic_write_text
from ..errors import DatasetError, InvalidInputError
from ..progress import Progress, ProgressGenerator, run_to_completion
from .coco_masks import counts_to_string, encode_instance, encode_mask, require_pycocotools
from .instances import instance_labels
from .reader import read_dataset

__all__ = ["CocoExportReport", "export_coco_iter", "export_coco", "COCO_MARKER"]

#: ``info.napari_maskclip.format`` of the files written here (what ``overwrite`` may replace).
COCO_MARKER = "napari-maskclip-coco"


@dataclass
class CocoExportReport:
    path: Path
    images: int = 0
    annotations: int = 0
    #: Samples without an image (COCO needs one).
    skipped_mask_only: list[str] = field(default_factory=list)
    #: Components left out for having fewer than ``min_area`` pixels.
    dropped_small: int = 0
    per_category: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.images} image(s), {self.annotations} annotation(s) -> {self.path}"]
        if self.dropped_small:
            parts.append(f"{self.dropped_small} component(s) below the minimum area left out")
        if self.skipped_mask_only:
            parts.append(f"{len(self.skipped_mask_only)} mask-only sample(s) skipped (no image)")
        return "; ".join(parts)


def is_own_coco_file(path: Path) -> bool:
    """Whether ``path`` is a COCO file napari-maskclip wrote (looks only at its start)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return re.search(rb'"format"\s*:\s*"' + COCO_MARKER.encode() + rb'"', head) is not None


def _check_target(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise InvalidInputError(f"{out} is a folder; give the path of the JSON file to write.")
    if out.exists():
        if not overwrite:
            raise InvalidInputError(
                f"{out} exists already; pass --overwrite (overwrite=True) to replace it."
            )
        if not is_own_coco_file(out):
            raise InvalidInputError(
                f"{out} exists and was not written by napari-maskclip export-coco; it is left "
                "alone. Choose another file name."
            )
    if out.suffix.lower() != ".json":
        raise InvalidInputError(f"The COCO file must end in .json, got {out.name}.")


def _bbox(box: tuple[slice, slice], inside: np.ndarray) -> list[float]:
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    y0, x0 = box[0].start + int(rows[0]), box[1].start + int(cols[0])
    return [float(x0), float(y0), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def export_coco_iter(
    dataset_dir: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    connectivity: int = 2,
    min_area: int = 1,
    overwrite: bool = False,
) -> ProgressGenerator[CocoExportReport]:
    """Write the dataset ``dataset_dir`` as the COCO file ``out``; yields Progress per sample.

    Nothing is written until every sample is encoded (closing the generator writes nothing).
    """
    if connectivity not in (1, 2):
        raise InvalidInputError(f"connectivity must be 1 or 2, got {connectivity}.")
    if int(min_area) < 1:
        raise InvalidInputError(f"The minimum area must be at least 1 pixel, got {min_area}.")
    require_pycocotools()
    target = Path(out)
    _check_target(target, overwrite)
    dataset = read_dataset(dataset_dir)
    names = dataset.classes.names
    n_classes = len(names)
    report = CocoExportReport(path=target)
    categories = [
        {
            "id": k,
            "name": spec.name,
            "supercategory": "",
            "napari_maskclip": {"synonyms": list(spec.synonyms)},
        }
        for k, spec in enumerate(dataset.classes.classes, start=1)
    ]
    counts_by_class = np.zeros(n_classes + 1, dtype=np.int64)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    total = len(dataset)
    yield Progress("export-coco", 0, total, f"encoding {total} sample(s)")
    for i, sample in enumerate(dataset):
        if not sample.has_image:
            report.skipped_mask_only.append(sample.name)
            yield Progress("export-coco", i + 1, total, f"{sample.name}: no image, skipped")
            continue
        try:
            mask = sample.read_mask()
            edited = sample.read_edited()
        except (OSError, ValueError) as exc:
            raise DatasetError(f"Sample {sample.name!r}: cannot read its files ({exc}).") from exc
        if edited is not None and edited.shape != mask.shape:
            raise DatasetError(
                f"Sample {sample.name!r}: its edited-pixels mask {edited.shape} does not match its "
                f"mask {mask.shape}; export the sample again."
            )
        ignore = sample.ignore_index
        bad = (mask > n_classes) & (mask != ignore)
        if bad.any():
            raise DatasetError(
                f"Sample {sample.name!r}: mask value {int(mask[bad].max())} is not a class of "
                f"the dataset (1..{n_classes}, {ignore} = ignore); the dataset was edited by "
                "hand. Export the sample again."
            )
        h, w = int(mask.shape[0]), int(mask.shape[1])
        image_id = len(images) + 1
        ignored = mask == ignore
        images.append(
            {
                "id": image_id,
                "file_name": sample.info["image"],
                "width": w,
                "height": h,
                "napari_maskclip": {
                    "sample": sample.name,
                    "mask": sample.info["mask"],
                    "ignore": (
                        {"size": [h, w], "counts": counts_to_string(encode_mask(ignored), (h, w))}
                        if ignored.any()
                        else None
                    ),
                },
            }
        )
        inst = instance_labels(
            mask,
            connectivity=connectivity,
            min_area=int(min_area),
            background=0,
            ignore_index=ignore,
        )
        report.dropped_small += inst.dropped_small
        for j in range(1, len(inst) + 1):
            box, inside = inst.mask(j)
            area = int(inst.areas[j - 1])
            category = int(inst.classes[j - 1])
            counts_by_class[category] += 1
            human = None
            if edited is not None:
                human = round(float(np.count_nonzero(edited[box][inside])) / area, 6)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": {
                        "size": [h, w],
                        "counts": counts_to_string(encode_instance(box, inside, (h, w)), (h, w)),
                    },
                    "area": area,
                    "bbox": _bbox(box, inside),
                    "iscrowd": 0,
                    "napari_maskclip": {"human_fraction": human},
                }
            )
        yield Progress("export-coco", i + 1, total, sample.name)
    document = {
        "info": {
            "description": f"napari-maskclip dataset {dataset.path.name}",
            "version": "1.0",
            "contributor": "napari-maskclip",
            "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "napari_maskclip": {
                "format": COCO_MARKER,
                "version": __version__,
                "dataset": str(dataset.path),
                "connectivity": connectivity,
                "min_area": int(min_area),
                "background": dataset.classes.background_name,
            },
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_text(
        target, json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n"
    )
    report.images = len(images)
    report.annotations = len(annotations)
    report.per_category = {names[k - 1]: int(counts_by_class[k]) for k in range(1, n_classes + 1)}
    return report


def export_coco(
    dataset_dir: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    progress: Optional[Any] = None,
    **options: Any,
) -> CocoExportReport:
    """:func:`export_coco_iter` run to the end."""
    return run_to_completion(export_coco_iter(dataset_dir, out, **options), progress)
