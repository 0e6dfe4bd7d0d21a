"""Importing existing labelled datasets: the part every source format shares.

A format's planner (:mod:`.import_coco`, :mod:`.import_folders`) turns its source into an
:class:`ImportPlan`: the class list, and one :class:`ImportItem` per image that loads the image
and builds its semantic mask. :func:`import_plan_iter` checks the plan against the target dataset
first (names, classes: nothing is written when something would be refused), then writes every
sample through the project's one exporter, in one batch session
(:class:`~napari_maskclip.export.ExportSession`), so an imported dataset has exactly the format,
crash safety, locking and append rules of an exported one. Imported labels are human labels: every pixel is marked as edited.

Problems with one image (its file missing, a size that differs from the declared one, a mask value
that is no class, an undecodable annotation) skip that image and are counted in the report with an
example, never guessed; ``strict`` turns the first one into an error. Rules applied to pixels (an
overlap resolved, crowd regions ignored) are counted too.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ..classes import ClassSpec, parse_classes
from ..errors import InvalidInputError
from ..progress import Progress, ProgressGenerator, run_to_completion
from .class_table import DEFAULT_BACKGROUND, DatasetClasses, read_class_table
from .layout import CLASSES_JSON, ignore_index, mask_dtype
from .reader import is_dataset, read_dataset
from .remap import plan_class_mapping
from .writer import ExportSession, check_export_target

__all__ = [
    "ImportItem",
    "ImportPlan",
    "ImportReport",
    "SkipSample",
    "import_plan_iter",
    "import_plan",
    "read_checked_image",
    "image_size",
    "class_list",
    "MAX_IMAGE_PIXELS",
]

#: Largest image (height * width) an import allocates for: 2**28 pixels (16384 x 16384), about
#: 0.8 GB for the RGB image plus 0.25 GB for its mask. Declared sizes are checked before reading.
MAX_IMAGE_PIXELS = 1 << 28


class SkipSample(Exception):
    """This image cannot be imported as it is; ``reason`` is the counted kind, ``detail`` the
    example shown."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Loaded:
    image: np.ndarray
    labels: np.ndarray
    #: Pixel or annotation counts of rules applied while building the mask.
    facts: dict[str, int] = field(default_factory=dict)


@dataclass
class ImportItem:
    """One image to import: its sample name, and how to load it (may raise SkipSample)."""

    name: str
    image_path: Path
    load: Callable[[], Loaded]
    #: Recorded as the sample's ``source`` in dataset.json.
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportPlan:
    format: str
    source: Path
    classes: DatasetClasses
    items: list[ImportItem]
    #: Images left out while planning: reason -> (count, first example).
    skipped: dict[str, list[Any]] = field(default_factory=dict)
    #: Rules applied while planning (e.g. annotations of unknown images): counts.
    facts: dict[str, int] = field(default_factory=dict)
    #: Recorded in every sample's ``provenance.imported_from`` (e.g. COCO category ids).
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ignore_index(self) -> int:
        return ignore_index(len(self.classes.classes))

    def skip(self, reason: str, example: str) -> None:
        entry = self.skipped.setdefault(reason, [0, example])
        entry[0] += 1


@dataclass
class ImportReport:
    dataset: Path
    format: str
    samples: list[str] = field(default_factory=list)
    classes: Optional[DatasetClasses] = None
    skipped: dict[str, list[Any]] = field(default_factory=dict)
    facts: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(count for count, _ in self.skipped.values())

    def notes(self) -> list[str]:
        """One line per kind of skipped image and per rule applied."""
        lines = [
            f"{count} image(s) skipped: {reason} (e.g. {example})"
            for reason, (count, example) in self.skipped.items()
        ]
        lines += [f"{reason}: {count}" for reason, count in self.facts.items() if count]
        return lines

    def summary(self) -> str:
        text = f"{len(self.samples)} sample(s) imported from {self.format} -> {self.dataset}"
        if self.n_skipped:
            text += f"; {self.n_skipped} image(s) skipped"
        return text


# ---- helpers for the planners --------------------------------------------------------------------
def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file's header, without decoding the pixels."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        with Image.open(path) as image:
            return int(image.size[1]), int(image.size[0])
    except Exception as exc:  # any unreadable header: the image is skipped with this reason
        raise SkipSample("unreadable image", f"{path.name}: {exc}") from exc


def read_checked_image(
    path: Path, expected: Optional[tuple[int, int]], max_pixels: int
) -> np.ndarray:
    """The image at ``path`` once its header says it fits ``max_pixels`` (and ``expected``)."""
    from ..image_files import read_image

    if not path.is_file():
        raise SkipSample("image file not found", str(path))
    h, w = image_size(path)
    if h * w > max_pixels:
        raise SkipSample(
            "image larger than the pixel limit (--max-pixels)", f"{path.name}: {w} x {h}"
        )
    if expected is not None and (h, w) != tuple(expected):
        raise SkipSample(
            "image size differs from its labels",
            f"{path.name} is {w} x {h}, labels are {expected[1]} x {expected[0]}",
        )
    try:
        image = read_image(path)
    except InvalidInputError as exc:
        raise SkipSample("unreadable image", str(exc)) from exc
    if (
        image.shape[:2] != (h, w)
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] > 4)
    ):
        raise SkipSample("unsupported image layout", f"{path.name}: array of shape {image.shape}")
    return image


def class_list(
    classes: Optional[str] = None,
    classes_file: Optional[Union[str, os.PathLike]] = None,
    background: Optional[str] = None,
) -> DatasetClasses:
    """Classes typed (``"cat, dog; puppy"``) or read from a file: a dataset ``classes.json`` /
    ``segment`` ``<stem>_classes.json``, or a text file with one class per line."""
    if (classes is None) == (classes_file is None):
        raise InvalidInputError(
            "Give the class list either as text (--classes 'a, b') or as a file "
            "(--classes-file), not both."
        )
    if classes is not None:
        return DatasetClasses.from_user(classes, background or DEFAULT_BACKGROUND)
    path = Path(classes_file)  # type: ignore[arg-type]
    if path.suffix.lower() == ".json":
        table = read_class_table(path)
        if background:
            return DatasetClasses.from_user(list(table.classes), background)
        return table
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"Cannot read the class list {path}: {exc}") from exc
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    return DatasetClasses.from_user(
        [ClassSpec.from_text(line) for line in lines], background or DEFAULT_BACKGROUND
    )


def classes_from_names(
    names: list[str], background: str, *, synonyms: Optional[list[list[str]]] = None
) -> DatasetClasses:
    """A class list from names taken literally (commas and ';' are not separators here);
    extra synonyms already used by another class are dropped."""
    cleaned = [" ".join(str(n).split()) for n in names]
    taken: set[str] = set()
    for name in cleaned + [background]:
        if not name:
            raise InvalidInputError("A category has an empty name.")
        if name.casefold() in taken:
            raise InvalidInputError(
                f"The category name {name!r} appears twice (or is the background name; choose "
                "another with --background)."
            )
        taken.add(name.casefold())
    specs = []
    for i, name in enumerate(cleaned):
        extra = []
        for syn in synonyms[i] if synonyms else []:
            syn = " ".join(str(syn).split())
            if syn and syn.casefold() not in taken:
                taken.add(syn.casefold())
                extra.append(syn)
        specs.append(ClassSpec((name, *extra)))
    if len(specs) > 65534:
        raise InvalidInputError(f"{len(specs)} classes: at most 65534 fit a dataset mask.")
    return DatasetClasses(parse_classes(specs), parse_classes(background))


def empty_labels(shape: tuple[int, int], n_classes: int) -> np.ndarray:
    return np.zeros(shape, dtype=mask_dtype(n_classes))


def check_label_values(labels: np.ndarray, n_classes: int, ignore: int, example: str) -> None:
    """Refuse (skip) a mask holding values that are neither a class nor ``ignore``."""
    top = int(labels.max()) if labels.size else 0
    if top <= n_classes:
        return
    bad = (labels > n_classes) & (labels != ignore)
    if bad.any():
        values = np.unique(labels[bad])[:5].tolist()
        raise SkipSample(
            "mask values that are not classes",
            f"{example}: {values} (classes 1..{n_classes}, {ignore} = ignore)",
        )


# ---- the writer loop -----------------------------------------------------------------------------
def _precheck(plan: ImportPlan, out: Path, overwrite: bool, remap: bool, add_classes: bool) -> None:
    folded: dict[str, str] = {}
    for item in plan.items:
        key = item.name.casefold()
        if key in folded:
            raise InvalidInputError(
                f"Two images would both become sample {item.name!r} ({folded[key]} and "
                f"{item.image_path}); rename one."
            )
        folded[key] = str(item.image_path)
    # A foreign non-empty folder, links, unlisted files in the way: refused before any write.
    check_export_target(out, [item.name for item in plan.items])
    if not is_dataset(out):
        return
    dataset = read_dataset(out, check_files=False)
    existing_names = {n.casefold(): n for n in dataset.names}
    clash = [
        (item.name, existing_names[item.name.casefold()])
        for item in plan.items
        if existing_names.get(item.name.casefold(), item.name) != item.name
    ]
    if clash:
        raise InvalidInputError(
            f"Sample {clash[0][0]!r} differs only in letter case from the dataset's sample "
            f"{clash[0][1]!r}; their files would collide on macOS and Windows."
        )
    taken = [item.name for item in plan.items if item.name in dataset]
    if taken and not overwrite:
        raise InvalidInputError(
            f"The dataset already has sample(s) {', '.join(taken[:3])}"
            f"{' ...' if len(taken) > 3 else ''}; pass --overwrite to replace them."
        )
    existing = read_class_table(out / CLASSES_JSON) if len(dataset) else None
    plan_class_mapping(existing, plan.classes, remap=remap, add_classes=add_classes)


def import_plan_iter(
    plan: ImportPlan,
    out: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
    remap: bool = False,
    add_classes: bool = False,
    strict: bool = False,
) -> ProgressGenerator[ImportReport]:
    """Write the plan's images into the dataset ``out``; yields Progress per image."""
    root = Path(out)
    if plan.skipped and strict:
        reason, (count, example) = next(iter(plan.skipped.items()))
        raise InvalidInputError(f"{count} image(s) cannot be imported: {reason} (e.g. {example}).")
    _precheck(plan, root, overwrite, remap, add_classes)
    report = ImportReport(
        dataset=root,
        format=plan.format,
        classes=plan.classes,
        skipped={k: list(v) for k, v in plan.skipped.items()},
    )
    report.facts.update(plan.facts)
    classes = list(plan.classes.classes)
    background = [spec.text for spec in plan.classes.background]
    provenance = {
        "model": None,
        "pretrained": None,
        "labelled_by": "human",
        "imported_from": {"format": plan.format, "path": str(plan.source), **plan.details},
    }
    total = len(plan.items)
    yield Progress("import", 0, total, f"importing {total} image(s) into {root}")
    # One writer session for all images: one lock, one index read, dataset.json rewritten about
    # once a second. Opened at the first image that loads (nothing is created if none does).
    session: Optional[ExportSession] = None
    try:
        for i, item in enumerate(plan.items):
            try:
                loaded = item.load()
            except SkipSample as exc:
                if strict:
                    raise InvalidInputError(f"Cannot import {item.image_path}: {exc}.") from exc
                entry = report.skipped.setdefault(exc.reason, [0, exc.detail or item.name])
                entry[0] += 1
                yield Progress("import", i + 1, total, f"{item.name}: skipped ({exc.reason})")
                continue
            report.facts.update(loaded.facts)
            if session is None:
                session = ExportSession(root)
                for step in session.open_iter(total):
                    yield Progress("import", i, total, step.message)
                session.expect([it.name for it in plan.items[i:]], overwrite=overwrite)
            session.export(
                item.name,
                loaded.image,
                loaded.labels,
                classes,
                background=background,
                edited=True,
                overwrite=overwrite,
                remap=remap,
                add_classes=add_classes,
                provenance=provenance,
                source={"image": str(item.image_path), **item.source},
                input_ignore=plan.ignore_index,
            )
            report.samples.append(item.name)
            yield Progress("import", i + 1, total, item.name)
    finally:
        if session is not None:
            session.close()
    if not report.samples:
        reasons = "; ".join(report.notes()[:3]) or "the source lists no images"
        raise InvalidInputError(f"Nothing was imported from {plan.source}: {reasons}.")
    return report


def import_plan(
    plan: ImportPlan, out: Union[str, os.PathLike], *, progress: Any = None, **options: Any
) -> ImportReport:
    """:func:`import_plan_iter` run to the end."""
    return run_to_completion(import_plan_iter(plan, out, **options), progress)


__all__ += ["Loaded", "classes_from_names", "empty_labels", "check_label_values"]
