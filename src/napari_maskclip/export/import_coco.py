"""A COCO instance-segmentation file -> an import plan (semantic masks by class).

Rules (the README's "Interoperability" section says the same):

* **Classes**: the file's categories sorted by id become labels 1, 2, ... (all of them, used or
  not, so the train and val files of one dataset import with the same labels). The dataset keeps
  names; each sample's provenance maps every COCO category id to its label. A category named
  like the background (``background``, ``_background_``, or the ``--background`` name) is
  label 0.
  Extra synonyms (LVIS ``synonyms``, or napari-maskclip's own) are kept when no other class uses
  them. Duplicate ids or names are refused.
* **Pixels**: not covered by any annotation = background (0). **Overlaps: the smaller instance
  wins** (instances are painted from the largest to the smallest; equal areas: the later
  annotation wins), so an object lying on a larger one stays visible. Overlapping pixels are
  counted in the report.
* **Crowd** (``iscrowd: 1``) regions become ignore (255) by default (their outlines are rough);
  ``crowd="class"`` labels them with their class. Either way non-crowd instances are painted over
  them.
* **Annotations naming an unknown category id**: their pixels become ignore (counted); an
  annotation with no mask (bbox only): its box becomes ignore. An annotation that cannot be
  decoded (RLE of the wrong size or length, bad polygon numbers) skips its image: a mask with an
  object silently missing would teach background there.
* **Polygons** are rasterised by pycocotools, clipped to the image (see :mod:`.coco_masks`).
* **Images**: ``file_name`` is looked up under ``images_dir`` (default: the JSON file's folder)
  and must stay inside it once links are followed: a name such as ``../x.png``, ``/abs/x.png``
  or a link to a file elsewhere refuses the whole import, naming it (:mod:`.confined` says why).
  When no image is found and the file is an ``export-coco`` output, the error names the dataset
  its file names are relative to (``--images DATASET``).
  Missing files, headers that differ from the declared ``width``/``height``, and declared sizes
  over ``max_pixels`` skip the image (counted, with an example); nothing is allocated for a
  declared size before it is checked. A ``napari_maskclip.ignore`` region (written by
  ``export-coco``) is restored as ignore.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InvalidInputError
from .class_table import DEFAULT_BACKGROUND
from .confined import Confinement
from .coco_masks import (
    MalformedSegmentation,
    decode_counts,
    polygons_to_mask,
    require_pycocotools,
    rle_counts,
)
from .importing import (
    MAX_IMAGE_PIXELS,
    ImportItem,
    ImportPlan,
    Loaded,
    SkipSample,
    classes_from_names,
    empty_labels,
    read_checked_image,
)
from .layout import safe_sample_name

__all__ = ["plan_coco", "read_coco_json", "CROWD_RULES"]

CROWD_RULES = ("ignore", "class")

# Fact keys (the report prints them as they are).
OVERLAP = "pixels covered by more than one instance (the smaller instance kept)"
CROWD_IGNORED = "crowd pixels set to ignore"
UNKNOWN_CATEGORY = "annotations of unknown category ids (their pixels set to ignore)"
NO_MASK = "annotations without a mask (their box set to ignore)"
EMPTY = "annotations covering no pixel of their image"
UNKNOWN_IMAGE = "annotations of image ids not in 'images' (left out)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_coco_json(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed file, checked to be a COCO instance file (one-line errors otherwise)."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"Cannot read {p}: {exc.strerror or exc}.") from exc
    try:
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{p} is not a UTF-8 JSON file ({exc.reason}).") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{p} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from exc
    except RecursionError as exc:
        raise InvalidInputError(f"{p} is nested too deeply to be a COCO file.") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{p} is not a COCO file (expected a JSON object at the top).")
    missing = [
        k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)
    ]
    if missing:
        raise InvalidInputError(
            f"{p} is not a COCO instance file: it has no {', '.join(repr(m) for m in missing)} "
            "list (an image-info-only file has no annotations to import)."
        )
    anns = data["annotations"]
    if anns and isinstance(anns[0], dict) and "segments_info" in anns[0]:
        raise InvalidInputError(
            f"{p} is a COCO panoptic file (annotations hold segments_info and PNGs); import the "
            "instance file (instances_*.json) instead."
        )
    return data


def _background_like(name: str, background: str) -> bool:
    key = name.strip().strip("_").strip().casefold()
    return key in ("background", background.strip().casefold())


def _categories(data: dict[str, Any], background: str, source: Path):
    """(class list, COCO id -> label, COCO id -> name)."""
    cats = data["categories"]
    if not cats:
        raise InvalidInputError(
            f"{source} lists no categories; there is nothing to name the masks."
        )
    by_id: dict[int, dict[str, Any]] = {}
    for cat in cats:
        if (
            not isinstance(cat, dict)
            or not _is_int(cat.get("id"))
            or not isinstance(cat.get("name"), str)
        ):
            raise InvalidInputError(
                f"{source}: a category is malformed ({str(cat)[:80]}); each needs an "
                "integer id and a name."
            )
        if cat["id"] in by_id:
            raise InvalidInputError(f"{source}: category id {cat['id']} is listed twice.")
        by_id[cat["id"]] = cat
    label_of: dict[int, int] = {}
    names: list[str] = []
    synonyms: list[list[str]] = []
    for cid in sorted(by_id):
        cat = by_id[cid]
        if _background_like(cat["name"], background):
            label_of[cid] = 0
            continue
        names.append(cat["name"])
        label_of[cid] = len(names)
        extra = (
            (cat.get("napari_maskclip") or {}).get("synonyms")
            if isinstance(cat.get("napari_maskclip"), dict)
            else None
        )
        if not isinstance(extra, list):
            extra = cat.get("synonyms") if isinstance(cat.get("synonyms"), list) else []
        synonyms.append([s for s in extra if isinstance(s, str)])
    if not names:
        raise InvalidInputError(
            f"{source}: its only category is the background; nothing to import."
        )
    try:
        classes = classes_from_names(names, background, synonyms=synonyms)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{source}: {exc}") from exc
    return classes, label_of


def _bbox_mask(bbox: Any, shape: tuple[int, int]) -> Optional[np.ndarray]:
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in bbox
        )
    ):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return None
    r0, r1 = int(np.clip(np.floor(y), 0, shape[0])), int(np.clip(np.ceil(y + h), 0, shape[0]))
    c0, c1 = int(np.clip(np.floor(x), 0, shape[1])), int(np.clip(np.ceil(x + w), 0, shape[1]))
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _decode(segmentation: Any, shape: tuple[int, int]) -> Optional[np.ndarray]:
    if isinstance(segmentation, dict):
        return decode_counts(rle_counts(segmentation, shape), shape)
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, shape)
    raise MalformedSegmentation("segmentation must be polygons (a list) or an RLE (an object)")


def _crop(mask: np.ndarray) -> Optional[tuple[tuple[slice, slice], np.ndarray]]:
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    return box, mask[box]


def _build_labels(
    image: dict[str, Any],
    anns: list[dict[str, Any]],
    label_of: dict[int, int],
    n_classes: int,
    ignore: int,
    crowd: str,
) -> tuple[np.ndarray, Counter]:
    """The semantic mask of one image under the rules in this module's docstring."""
    shape = (int(image["height"]), int(image["width"]))
    facts: Counter = Counter()
    pieces = []  # (crowd first, -area, file order, value, box, crop)
    for order, ann in enumerate(anns):
        seg = ann.get("segmentation")
        is_crowd = ann.get("iscrowd") in (1, True)
        try:
            if seg is None or seg == [] or seg == {}:
                mask = _bbox_mask(ann.get("bbox"), shape)
                if mask is None:
                    raise MalformedSegmentation("it has neither a mask nor a valid bbox")
                facts[NO_MASK] += 1
                value = ignore
            else:
                mask = _decode(seg, shape)
                cid = ann.get("category_id")
                if not _is_int(cid) or cid not in label_of:
                    facts[UNKNOWN_CATEGORY] += 1
                    value = ignore
                elif is_crowd and crowd == "ignore":
                    value = ignore
                else:
                    value = label_of[cid]
        except MalformedSegmentation as exc:
            raise SkipSample(
                "annotations that cannot be decoded",
                f"annotation {ann.get('id')!r} of {image['file_name']}: {exc}",
            ) from exc
        cropped = _crop(mask) if mask is not None else None
        if cropped is None:
            facts[EMPTY] += 1
            continue
        box, inside = cropped
        pieces.append(
            (
                0 if is_crowd else 1,
                -int(np.count_nonzero(inside)),
                order,
                value,
                box,
                inside,
                is_crowd,
            )
        )
    labels = empty_labels(shape, n_classes)
    covered = np.zeros(shape, dtype=bool)
    for _, _, _, value, box, inside, is_crowd in sorted(pieces, key=lambda p: p[:3]):
        if not is_crowd:
            facts[OVERLAP] += int(np.count_nonzero(covered[box] & inside))
            covered[box] |= inside
        elif value == ignore:
            facts[CROWD_IGNORED] += int(np.count_nonzero(inside))
        labels[box][inside] = value
    extra = image.get("napari_maskclip")
    own_ignore = extra.get("ignore") if isinstance(extra, dict) else None
    if own_ignore:
        try:
            ignored = decode_counts(rle_counts(own_ignore, shape), shape)
        except MalformedSegmentation as exc:
            raise SkipSample(
                "annotations that cannot be decoded",
                f"the ignore region of {image['file_name']}: {exc}",
            ) from exc
        labels[ignored] = ignore
    return labels, facts


def _check_found(
    plan: ImportPlan,
    data: dict[str, Any],
    source: Path,
    images_dir: Optional[Union[str, os.PathLike]],
) -> None:
    """No image found at all: say which folder the names are relative to (one line).

    ``export-coco`` writes file names relative to the dataset (what ``CocoDetection(root=...)``
    expects), so its file written elsewhere finds its images only with ``--images DATASET``.
    The folder recorded in the file is named, never used on its own: a file must not choose
    where an import reads from.
    """
    missing = plan.skipped.get("image file not found")
    if plan.items or not missing:
        return
    info = data.get("info")
    own = info.get("napari_maskclip") if isinstance(info, dict) else None
    dataset = own.get("dataset") if isinstance(own, dict) else None
    root = Path(images_dir) if images_dir is not None else source.parent
    where = "--images" if images_dir is not None else "its folder (the default for --images)"
    if isinstance(dataset, str) and dataset.strip():
        dataset = dataset[:500]
        raise InvalidInputError(
            f"None of the images of {source} is under {where} {root} (e.g. {missing[1]}): it was "
            f"written by export-coco, whose file names are relative to the dataset; import it "
            f"with --images {dataset}."
        )
    raise InvalidInputError(
        f"None of the images of {source} is under {where} {root} (e.g. {missing[1]}): pass "
        "--images DIR, the folder its file names are relative to."
    )


def plan_coco(
    path: Union[str, os.PathLike],
    *,
    images_dir: Optional[Union[str, os.PathLike]] = None,
    background: str = DEFAULT_BACKGROUND,
    crowd: str = "ignore",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> ImportPlan:
    """Plan the import of the COCO instance file ``path`` (see the module docstring)."""
    if crowd not in CROWD_RULES:
        raise InvalidInputError(f"crowd must be one of {', '.join(CROWD_RULES)}, got {crowd!r}.")
    require_pycocotools()
    source = Path(path)
    data = read_coco_json(source)
    root = Path(images_dir) if images_dir is not None else source.parent
    if not root.is_dir():
        raise InvalidInputError(f"The images folder {root} does not exist; pass it with --images.")
    classes, label_of = _categories(data, background, source)
    n_classes = len(classes.classes)
    plan = ImportPlan(
        format="coco",
        source=source,
        classes=classes,
        items=[],
        details={"coco_category_to_label": {str(cid): label for cid, label in label_of.items()}},
    )
    ignore = plan.ignore_index

    images: dict[int, dict[str, Any]] = {}
    for image in data["images"]:
        ok = (
            isinstance(image, dict)
            and _is_int(image.get("id"))
            and isinstance(image.get("file_name"), str)
            and image["file_name"].strip()
            and _is_int(image.get("width"))
            and _is_int(image.get("height"))
            and image["width"] > 0
            and image["height"] > 0
        )
        if not ok:
            plan.skip(
                "malformed image entries (need id, file_name, width, height)", str(image)[:80]
            )
            continue
        if image["id"] in images:
            raise InvalidInputError(f"{source}: image id {image['id']} is listed twice.")
        images[image["id"]] = image
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    unknown_image = 0
    for ann in data["annotations"]:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not _is_int(image_id) or image_id not in images:
            unknown_image += 1
            continue
        by_image[image_id].append(ann)
    plan.facts[UNKNOWN_IMAGE] = unknown_image

    confinement = Confinement(root)
    stems = Counter(
        safe_sample_name(Path(im["file_name"]).stem).casefold() for im in images.values()
    )
    for image_id, image in images.items():
        h, w = int(image["height"]), int(image["width"])
        file_name = image["file_name"]
        if h * w > max_pixels:
            plan.skip(
                "declared size over the pixel limit (--max-pixels)",
                f"{file_name}: {w} x {h} > {max_pixels} pixels",
            )
            continue
        image_path = confinement.resolve(file_name)
        if image_path is None:
            continue  # refused below, with the others
        if not image_path.is_file():
            plan.skip("image file not found", str(image_path))
            continue
        stem = safe_sample_name(Path(file_name).stem)
        name = stem if stems[stem.casefold()] == 1 else safe_sample_name(f"{stem}_id{image_id}")

        def load(image=image, image_path=image_path, anns=by_image.get(image_id, [])) -> Loaded:
            pixels = read_checked_image(
                image_path, (int(image["height"]), int(image["width"])), max_pixels
            )
            labels, facts = _build_labels(image, anns, label_of, n_classes, ignore, crowd)
            return Loaded(pixels, labels, dict(facts))

        plan.items.append(
            ImportItem(
                name=name,
                image_path=image_path,
                load=load,
                source={"coco_image_id": image_id, "coco_file_name": file_name},
            )
        )
    confinement.check(source)
    _check_found(plan, data, source, images_dir)
    return plan
