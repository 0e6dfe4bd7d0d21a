"""Folders of label masks -> import plans: PASCAL VOC layout, and images + masks folders.

**VOC** (``JPEGImages/`` + ``SegmentationClass/``, as in VOC2012 or CVAT/Datumaro's "Segmentation
mask" export): one sample per mask PNG whose image exists. Classes: ``labelmap.txt`` when present
(``name:r,g,b:...`` per line; line k is label k, line 0 the background), else the 20 VOC classes
(``--classes`` replaces them). Palette or gray masks hold label indices; RGB masks are mapped by
the class colours (the VOC colour map, or labelmap.txt's). 255 (VOC's object border, colour
224,224,192) is ignore. ``split`` keeps the names listed in ``ImageSets/Segmentation/<split>.txt``
(or a given list file).

**Images + masks**: every image in a folder whose mask (same stem, optionally ending ``_labels``
or ``_mask``; PNG or TIFF) is in the masks folder; values 0 = background, k = class k, 255 (65535
beyond 254 classes, or ``ignore_index``) = ignore.

Either way a mask value that is not a class, a colour that is no class colour, or a mask whose
size differs from its image skips that image (counted, with an example). Every file read must lie
inside its folder once links are followed, and a split list's names must not leave
``SegmentationClass/``: one that does refuses the whole import (see :mod:`.confined`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InvalidInputError
from .class_table import DEFAULT_BACKGROUND, DatasetClasses
from .importing import (
    MAX_IMAGE_PIXELS,
    ImportItem,
    ImportPlan,
    Loaded,
    SkipSample,
    check_label_values,
    classes_from_names,
    image_size,
    read_checked_image,
)
from .confined import Confinement
from .layout import safe_sample_name

__all__ = [
    "VOC_CLASSES",
    "voc_colormap",
    "plan_voc",
    "plan_mask_folder",
    "is_voc_folder",
    "IMAGE_SUFFIXES",
]

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_MASK_SUFFIXES = (".png", ".tif", ".tiff")
_MASK_ENDINGS = ("", "_labels", "_mask")
#: What to do when a listed file or link leads outside its folder (see :mod:`.confined`).
_LINK_HINT = "copy the files into the folder instead of linking them"
_SPLIT_HINT = f"{_LINK_HINT}, or fix the split list's names"


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (``n x 3`` uint8): label k's colour; 255 is (224, 224, 192)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def is_voc_folder(path: Union[str, os.PathLike]) -> bool:
    p = Path(path)
    return (p / "JPEGImages").is_dir() and (p / "SegmentationClass").is_dir()


def _read_mask(
    path: Path, colours: Optional[dict[tuple[int, int, int], int]], max_pixels: int
) -> np.ndarray:
    """Label indices of a mask file; RGB masks through ``colours`` (else refused)."""
    h, w = image_size(path)
    if h * w > max_pixels:
        raise SkipSample(
            "image larger than the pixel limit (--max-pixels)", f"{path.name}: {w} x {h}"
        )
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as image:
                mode = image.mode
                if mode in ("P", "L", "I;16", "I;16B", "I;16L", "I", "1"):
                    array = np.asarray(image)
                elif mode in ("RGB", "RGBA", "LA", "PA"):
                    array = np.asarray(image.convert("RGB"))
                else:
                    raise SkipSample(
                        "masks in an unsupported mode", f"{path.name}: PNG mode {mode}"
                    )
    except SkipSample:
        raise
    except Exception as exc:  # a truncated or foreign file: this image is skipped
        raise SkipSample("unreadable masks", f"{path.name}: {exc}") from exc
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            array = rgb[..., 0]
        elif colours is None:
            raise SkipSample("colour masks (save label indices: a palette or gray PNG)", path.name)
        else:
            array = _colours_to_labels(rgb, colours, path.name)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise SkipSample(
            "masks that are not 2D label images", f"{path.name}: {array.dtype} {array.shape}"
        )
    if array.min() < 0 or array.max() > 65535:
        raise SkipSample("mask values that are not classes", f"{path.name}: outside 0..65535")
    return array


def _colours_to_labels(
    rgb: np.ndarray, colours: dict[tuple[int, int, int], int], name: str
) -> np.ndarray:
    packed = (
        (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    )
    values, inverse = np.unique(packed.ravel(), return_inverse=True)
    lut = np.empty(values.size, dtype=np.int64)
    for i, v in enumerate(values.tolist()):
        colour = ((v >> 16) & 255, (v >> 8) & 255, v & 255)
        if colour not in colours:
            raise SkipSample("mask colours that are no class colour", f"{name}: RGB {colour}")
        lut[i] = colours[colour]
    return lut[inverse].reshape(rgb.shape[:2]).astype(np.uint16)


def _labelmap(path: Path) -> tuple[list[str], list[Optional[tuple[int, int, int]]]]:
    names, colours = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"Cannot read {path}: {exc}") from exc
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":")
        names.append(parts[0].strip())
        colour = None
        if len(parts) > 1 and parts[1].strip():
            try:
                rgb = tuple(int(v) for v in parts[1].split(","))
            except ValueError as exc:
                raise InvalidInputError(
                    f"{path}: colour {parts[1]!r} of {parts[0]!r} is not r,g,b."
                ) from exc
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise InvalidInputError(
                    f"{path}: colour {parts[1]!r} of {parts[0]!r} is not r,g,b."
                )
            colour = rgb  # type: ignore[assignment]
        colours.append(colour)
    if len(names) < 2:
        raise InvalidInputError(f"{path} lists fewer than two labels (background and a class).")
    return names, colours


def _split_names(root: Path, split: str) -> list[str]:
    candidate = Path(split)
    path = (
        candidate
        if candidate.suffix == ".txt" and candidate.is_file()
        else root / "ImageSets" / "Segmentation" / f"{split}.txt"
    )
    if not path.is_file():
        raise InvalidInputError(
            f"Split list not found: {path} (give a name such as train or val, or "
            "a .txt file with one image name per line)."
        )
    try:
        return [
            line.split()[0]
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"Cannot read {path}: {exc}") from exc


def _find_image(folder: Path, stem: str) -> Optional[Path]:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _mask_item(
    plan: ImportPlan,
    name: str,
    image_path: Path,
    mask_path: Path,
    colours: Optional[dict[tuple[int, int, int], int]],
    input_ignore: int,
    max_pixels: int,
) -> ImportItem:
    n_classes = len(plan.classes.classes)
    out_ignore = plan.ignore_index

    def load() -> Loaded:
        labels = _read_mask(mask_path, colours, max_pixels)
        check_label_values(labels, n_classes, input_ignore, mask_path.name)
        if input_ignore != out_ignore:
            labels = np.where(labels == input_ignore, out_ignore, labels)
        image = read_checked_image(image_path, labels.shape, max_pixels)
        dtype = np.uint8 if out_ignore == 255 else np.uint16
        return Loaded(image, labels.astype(dtype), {})

    return ImportItem(name=name, image_path=image_path, load=load, source={"mask": str(mask_path)})


def plan_voc(
    root: Union[str, os.PathLike],
    *,
    split: Optional[str] = None,
    classes: Optional[DatasetClasses] = None,
    background: str = DEFAULT_BACKGROUND,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> ImportPlan:
    """Plan the import of a VOC-style folder (see the module docstring)."""
    folder = Path(root)
    if not is_voc_folder(folder):
        raise InvalidInputError(
            f"{folder} is not a VOC-style folder: it needs JPEGImages/ and SegmentationClass/ "
            "(for VOCdevkit give VOCdevkit/VOC2012)."
        )
    colours: Optional[dict[tuple[int, int, int], int]] = None
    labelmap = folder / "labelmap.txt"
    if classes is None and labelmap.is_file():
        names, rgb = _labelmap(labelmap)
        zero = names[0].strip("_ ")
        classes = classes_from_names(
            names[1:], background if zero.casefold() in ("", "background") else zero
        )
        if all(c is not None for c in rgb):
            colours = {c: k for k, c in enumerate(rgb)}  # type: ignore[misc]
    elif classes is None:
        classes = classes_from_names(list(VOC_CLASSES), background)
    n = len(classes.classes)
    if colours is None and n <= 254:
        cmap = voc_colormap()
        colours = {tuple(int(v) for v in cmap[k]): k for k in range(n + 1)}
    if colours is not None:
        colours.setdefault((224, 224, 192), 255)  # VOC's object border: ignore
    plan = ImportPlan(format="voc", source=folder, classes=classes, items=[])
    masks_dir = folder / "SegmentationClass"
    masks_inside = Confinement(masks_dir, "masks folder", _SPLIT_HINT if split else _LINK_HINT)
    images_inside = Confinement(folder / "JPEGImages", "images folder", _LINK_HINT)
    if split is not None:
        wanted = _split_names(folder, split)
        masks = []
        for stem in wanted:
            mask = masks_inside.resolve(f"{stem}.png")
            if mask is None:
                continue  # refused below
            if mask.is_file():
                masks.append(mask)
            else:
                plan.skip("mask file not found", str(mask))
    else:
        masks = sorted(p for p in masks_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    for mask in masks:
        if not masks_inside.check_file(mask):
            continue
        image = _find_image(folder / "JPEGImages", mask.stem)
        if image is None:
            plan.skip("image file not found", str(folder / "JPEGImages" / f"{mask.stem}.jpg"))
            continue
        if not images_inside.check_file(image):
            continue
        plan.items.append(
            _mask_item(plan, safe_sample_name(mask.stem), image, mask, colours, 255, max_pixels)
        )
    masks_inside.check(folder)
    images_inside.check(folder)
    return plan


def plan_mask_folder(
    images_dir: Union[str, os.PathLike],
    masks_dir: Union[str, os.PathLike],
    classes: DatasetClasses,
    *,
    ignore_index: Optional[int] = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> ImportPlan:
    """Plan the import of a folder of images and a folder of label masks (module docstring)."""
    images_root, masks_root = Path(images_dir), Path(masks_dir)
    for folder, what in ((images_root, "images"), (masks_root, "masks")):
        if not folder.is_dir():
            raise InvalidInputError(f"The {what} folder {folder} does not exist.")
    plan = ImportPlan(
        format="masks",
        source=images_root,
        classes=classes,
        items=[],
        details={"masks": str(masks_root)},
    )
    input_ignore = plan.ignore_index if ignore_index is None else int(ignore_index)
    if not 0 <= input_ignore <= 65535 or 1 <= input_ignore <= len(classes.classes):
        raise InvalidInputError(
            f"The ignore value {input_ignore} must lie in 0..65535 and not be a class "
            f"(1..{len(classes.classes)})."
        )
    images = sorted(
        p for p in images_root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    pairs: list[tuple[Path, Optional[Path]]] = []
    used: set[Path] = set()
    for image in images:
        mask = next(
            (
                m
                for ending in _MASK_ENDINGS
                for suffix in _MASK_SUFFIXES
                for m in (masks_root / f"{image.stem}{ending}{suffix}",)
                if m.is_file() and m.resolve() != image.resolve()
            ),
            None,
        )
        pairs.append((image, mask))
        if mask is not None:
            used.add(mask.resolve())
    images_inside = Confinement(images_root, "images folder", _LINK_HINT)
    masks_inside = Confinement(masks_root, "masks folder", _LINK_HINT)
    for image, mask in pairs:
        if image.resolve() in used:
            continue  # a mask in a shared images/masks folder
        if mask is None:
            plan.skip("no mask for the image", image.name)
            continue
        if not images_inside.check_file(image) or not masks_inside.check_file(mask):
            continue
        plan.items.append(
            _mask_item(
                plan, safe_sample_name(image.stem), image, mask, None, input_ignore, max_pixels
            )
        )
    image_files = {i.resolve() for i in images}
    orphans = [
        p
        for p in masks_root.iterdir()
        if p.suffix.lower() in _MASK_SUFFIXES
        and p.resolve() not in used
        and p.resolve() not in image_files
    ]
    plan.facts["masks without an image (left out)"] = len(orphans)
    images_inside.check(images_root)
    masks_inside.check(masks_root)
    return plan
