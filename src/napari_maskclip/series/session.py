"""One image series annotated into one dataset: what is saved, what comes next, saving.

:class:`SeriesSession` is plain Python (no threads, no napari): it pairs an :class:`ImageList` with
a dataset folder. The dataset itself is the record of progress, so closing at any moment loses
nothing saved and reopening the same folder and dataset continues at the first image not saved
yet. Saving goes through the project's one exporter (:func:`~napari_maskclip.export.export_sample`:
checked first, atomic, locked, edited-pixel provenance, the same class rules as Export), one
image per export, so a kill mid-save leaves the dataset as it was before that image.

*Mark reviewed* saves an image with every pixel marked edited (a person looked at all of it and
accepts it) and ``"reviewed": true`` in its provenance; training (:mod:`napari_maskclip.student.data`)
and the student's validation trust edited pixels, so reviewed images count as human labels there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..array_checks import require_array, require_kind, require_shape
from ..classes import ClassesLike
from ..errors import DatasetError, InvalidInputError
from ..export import ExportReport, export_sample, read_dataset
from ..export.class_table import DEFAULT_BACKGROUND, DatasetClasses, read_class_table
from ..export.layout import CLASSES_JSON, check_sample_name, ignore_index
from ..export.ownership import check_dataset_folder
from ..export.reader import Dataset, DatasetSample, read_index
from ..export.remap import ClassMapping, plan_class_mapping
from ..image_files import read_image
from .listing import ImageList

__all__ = ["SeriesSession", "SeriesStatus", "SERIES_KEY"]

#: Key of a sample's ``source`` (and provenance) that records the series image it came from.
SERIES_KEY = "series_image"


@dataclass(frozen=True)
class SeriesStatus:
    """Counts for the progress line."""

    total: int
    saved: int
    #: Saved images with at least one edited pixel (reviewed ones not counted twice).
    edited: int
    reviewed: int
    unreadable: int

    def line(self, model_label: str) -> str:
        """``37 / 500 saved, 12 with edits, model: student (iteration 600)`` (reviewed and
        unreadable images are mentioned only when there are any)."""
        parts = [f"{self.saved} / {self.total} saved", f"{self.edited} with edits"]
        if self.reviewed:
            parts.append(f"{self.reviewed} reviewed")
        parts.append(f"model: {model_label}")
        text = ", ".join(parts)
        if self.unreadable:
            text += f"; {self.unreadable} unreadable, skipped"
        return text


def _as_2d_image(image: np.ndarray, path: Path) -> np.ndarray:
    """Gray ``H x W`` or ``H x W x C`` (C <= 4): channel-first planes are moved last; stacks refused."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] > 4 and 1 <= image.shape[0] <= 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] <= 4):
        return image
    raise InvalidInputError(
        f"{path} is not a 2D image (shape {image.shape}); the series annotates gray, RGB or RGBA "
        "images. Open stacks in the Segment page instead, or leave the file out."
    )


def _edited_marks(edited: Any, shape: tuple[int, ...], i: int) -> np.ndarray:
    """``edited`` of :meth:`SeriesSession.save` as an ``H x W`` bool mask: None (no pixel), one
    bool for every pixel, or a bool/integer mask of the labels' exact shape."""
    if edited is None:
        return np.zeros(shape, dtype=bool)
    if isinstance(edited, (bool, np.bool_)) or (hasattr(edited, "shape") and edited.shape == ()):
        return np.full(shape, bool(edited), dtype=bool)
    what = f"The edited mask of image {i}"
    edited = require_array(edited, what)
    require_kind(edited, what, "biu", "booleans (True where a person painted)")
    require_shape(edited, what, shape, "the labels' shape")
    return np.asarray(edited, dtype=bool).copy()


class SeriesSession:
    """An image series and the dataset its labels are saved into (see the module docstring)."""

    def __init__(self, images: ImageList, dataset_dir: Path, classes: DatasetClasses, *,
                 remap: bool = False, add_classes: bool = False) -> None:
        self.image_list = images
        self.dataset_dir = Path(dataset_dir)
        self.classes = classes
        self.remap = bool(remap)
        self.add_classes = bool(add_classes)
        self._names = images.names
        self._by_name = {n: i for i, n in enumerate(self._names)}
        #: Images that failed to read: index -> the one-line reason.
        self.unreadable: dict[int, str] = {}
        self._order = list(range(len(images)))
        self._dataset: Optional[Dataset] = None
        self._samples: dict[str, DatasetSample] = {}
        self.refresh()

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        images: ImageList,
        dataset_dir: Union[str, os.PathLike],
        classes: ClassesLike,
        *,
        background: Optional[ClassesLike] = DEFAULT_BACKGROUND,
        remap: bool = False,
        add_classes: bool = False,
    ) -> "SeriesSession":
        """Pair ``images`` with ``dataset_dir`` (created on the first save). Refuses now, with
        Export's messages, a folder that is not a dataset and not empty, and a dataset whose
        classes differ from ``classes`` (unless ``remap``; classes it lacks need ``add_classes``)."""
        if len(images) == 0:
            raise InvalidInputError("The image series is empty; choose a folder with images.")
        new = DatasetClasses.from_user(classes, background)
        root = Path(dataset_dir).expanduser()
        if check_dataset_folder(root) and read_index(root)["samples"]:  # as Export: an empty one adopts
            existing = read_class_table(root / CLASSES_JSON)
            plan_class_mapping(existing, new, remap=remap, add_classes=add_classes)
        for name in images.names:
            check_sample_name(name)
        return cls(images, root, new, remap=remap, add_classes=add_classes)

    def refresh(self) -> None:
        """Read the dataset's index again (after a save, or another program's)."""
        if not (self.dataset_dir / "dataset.json").is_file():
            self._dataset, self._samples = None, {}
            return
        self._dataset = read_dataset(self.dataset_dir, check_files=False)
        self._samples = {s.name: s for s in self._dataset.samples if s.name in self._by_name}

    # ---- the images ------------------------------------------------------------------------------
    @property
    def images(self) -> list[Path]:
        return list(self.image_list.paths)

    @property
    def names(self) -> list[str]:
        """Each image's sample name in the dataset."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _check(self, i: int) -> int:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"image {i} is not in the series of {len(self)} images")
        return int(i)

    def read_image(self, i: int) -> np.ndarray:
        """Image ``i`` as stored (gray, RGB(A), any dtype). An unreadable file raises
        :class:`InvalidInputError` and is recorded in :attr:`unreadable` (then skipped)."""
        path = self.image_list.paths[self._check(i)]
        try:
            image = _as_2d_image(read_image(path), path)
        except InvalidInputError as exc:
            self.unreadable[i] = str(exc)
            raise
        except OSError as exc:
            self.unreadable[i] = f"Cannot read {path}: {exc.strerror or exc}"
            raise InvalidInputError(self.unreadable[i]) from exc
        self.unreadable.pop(i, None)
        return image

    # ---- order and navigation --------------------------------------------------------------------
    @property
    def order(self) -> list[int]:
        """The order images are visited in (default: folder order)."""
        return list(self._order)

    def set_order(self, order: list[int]) -> None:
        """Visit images in ``order`` (e.g. hardest first); images it leaves out follow in folder order."""
        picked: list[int] = []
        seen: set[int] = set()
        for i in order:
            i = self._check(i)
            if i in seen:
                raise InvalidInputError(f"Image {i} appears twice in the order.")
            seen.add(i)
            picked.append(i)
        self._order = picked + [i for i in range(len(self)) if i not in seen]

    def next_index(self, i: Optional[int], step: int = 1) -> Optional[int]:
        """The image ``step`` places after (negative: before) ``i`` in :attr:`order`, skipping
        unreadable ones; None past either end. ``i`` None starts before the first (after the last
        for a negative step)."""
        if step == 0:
            return i
        position = {k: p for p, k in enumerate(self._order)}
        if i is None:
            p = -1 if step > 0 else len(self._order)
        else:
            p = position[self._check(i)]
        direction = 1 if step > 0 else -1
        remaining = abs(step)
        while True:
            p += direction
            if not 0 <= p < len(self._order):
                return None
            k = self._order[p]
            if k in self.unreadable:
                continue
            remaining -= 1
            if remaining == 0:
                return k

    def first_unsaved(self) -> int:
        """The first image (in :attr:`order`) not saved yet and not known unreadable; ``len`` if none."""
        for k in self._order:
            if not self.is_saved(k) and k not in self.unreadable:
                return k
        return len(self)

    # ---- what is saved ---------------------------------------------------------------------------
    def is_saved(self, i: int) -> bool:
        return self._names[self._check(i)] in self._samples

    def saved_count(self) -> int:
        return len(self._samples)

    def saved_sample(self, i: int) -> Optional[DatasetSample]:
        """The dataset's sample of image ``i``, or None."""
        return self._samples.get(self._names[self._check(i)])

    def is_reviewed(self, i: int) -> bool:
        sample = self.saved_sample(i)
        return bool(sample is not None and sample.provenance.get("reviewed"))

    def _mapping(self) -> Optional[ClassMapping]:
        """How this session's labels map to the dataset's (None: no dataset yet)."""
        if self._dataset is None or not self._dataset.samples:
            return None
        return plan_class_mapping(self._dataset.classes, self.classes, remap=self.remap,
                                  add_classes=self.add_classes)

    @property
    def ignore_value(self) -> int:
        """The "ignore" label in this session's labels (255, or 65535 beyond 254 classes)."""
        return ignore_index(len(self.classes.classes))

    def saved_labels(self, i: int) -> Optional[np.ndarray]:
        """The saved mask of image ``i`` in this session's label values, or None if not saved.

        Ignored pixels get :attr:`ignore_value`; with a remapped class list, dataset classes this
        session does not name become ignore too (they are not the page's to paint)."""
        sample = self.saved_sample(i)
        if sample is None:
            return None
        mask = sample.read_mask().astype(np.int64)
        ignored = mask == sample.ignore_index
        mapping = self._mapping()
        out_dtype = np.uint8 if self.ignore_value == 255 else np.uint16
        if mapping is None or mapping.identity:
            out = np.where(ignored, self.ignore_value, mask)
            return out.astype(out_dtype)
        back = np.full(max(int(mapping.lut.max()), int(mask[~ignored].max(initial=0))) + 1,
                       self.ignore_value, dtype=np.int64)
        for k, v in enumerate(mapping.lut):
            back[int(v)] = k
        out = back[np.where(ignored, 0, mask)]
        out[ignored] = self.ignore_value
        return out.astype(out_dtype)

    def saved_edited(self, i: int) -> Optional[np.ndarray]:
        """The saved edited-pixels mask of image ``i`` (None: not saved, or edits unknown)."""
        sample = self.saved_sample(i)
        return None if sample is None else sample.read_edited()

    def _own(self, i: int, sample: DatasetSample) -> bool:
        """Whether the listed sample was saved from image ``i`` of this series (same relative path)."""
        source = sample.info.get("source") or {}
        return isinstance(source, dict) and source.get(SERIES_KEY) == self.image_list.relative(i)

    # ---- saving ----------------------------------------------------------------------------------
    def save(
        self,
        i: int,
        image: np.ndarray,
        labels: np.ndarray,
        *,
        probabilities: Optional[np.ndarray] = None,
        edited: Optional[np.ndarray] = None,
        reviewed: bool = False,
        provenance: Optional[dict[str, Any]] = None,
    ) -> ExportReport:
        """Save image ``i`` and its labels (this session's values, :attr:`ignore_value` = ignore).

        ``edited``: True where a person painted: a bool (or 0/1 integer) mask of the labels'
        shape, one bool for every pixel, or None (no pixel: the labels are the model's). Arrays
        of another shape or kind raise :class:`InvalidInputError` saying what was expected.
        ``reviewed``: every pixel counts as a person's (edited everywhere, ``"reviewed": true``).
        Saving an image again replaces its earlier save, keeping the pixels edited then as edited
        (its labels are what the page showed) and a review. A sample of the same name that this
        series did not save is refused, never replaced.
        """
        i = self._check(i)
        name = self._names[i]
        labels = np.asarray(require_array(labels, f"The labels of image {i}"))
        if labels.ndim != 2:
            raise InvalidInputError(f"Labels of image {i} must be 2D, got shape {labels.shape}.")
        require_kind(labels, f"The labels of image {i}", "biu", "integers (class indices)")
        image = np.asarray(require_array(image, f"Image {i}"))
        require_kind(image, f"Image {i}", "biuf", "numbers (gray, RGB(A) or channels)")
        if image.ndim not in (2, 3) or image.shape[:2] != labels.shape:
            raise InvalidInputError(
                f"Image {i} has shape {image.shape}; expected {labels.shape[0]} x "
                f"{labels.shape[1]} (gray) or {labels.shape[0]} x {labels.shape[1]} x C, the "
                "labels' size."
            )
        self.refresh()
        previous = self._samples.get(name)
        if previous is not None and not self._own(i, previous):
            raise DatasetError(
                f"The dataset {self.dataset_dir} already has a sample {name!r} that this series did "
                "not save (another export, or another image folder); choose another dataset folder "
                "so it is not replaced."
            )
        marks = _edited_marks(edited, labels.shape, i)
        was_reviewed = False
        if previous is not None:
            was_reviewed = bool(previous.provenance.get("reviewed"))
            before = previous.read_edited()
            if before is not None and before.shape == marks.shape:
                marks |= before
        reviewed = bool(reviewed) or was_reviewed
        if reviewed:
            marks[:] = True
        record = dict(provenance or {})
        record["reviewed"] = reviewed
        record["series"] = {"image": self.image_list.relative(i), "edited_pixels": int(marks.sum())}
        source = {"path": str(self.image_list.paths[i]), SERIES_KEY: self.image_list.relative(i),
                  "series_root": str(self.image_list.root)}
        report = export_sample(
            self.dataset_dir, name, image, labels, list(self.classes.classes),
            background=list(self.classes.background), probabilities=probabilities,
            edited=marks, overwrite=previous is not None, remap=self.remap,
            add_classes=self.add_classes, provenance=record, source=source,
            input_ignore=self.ignore_value,
        )
        self.refresh()
        return report

    # ---- progress --------------------------------------------------------------------------------
    def status(self) -> SeriesStatus:
        edited = reviewed = 0
        for sample in self._samples.values():
            if sample.provenance.get("reviewed"):
                reviewed += 1
            elif ((sample.info.get("pixels") or {}).get("edited") or 0) > 0:
                edited += 1
        return SeriesStatus(total=len(self), saved=len(self._samples), edited=edited,
                            reviewed=reviewed, unreadable=len(self.unreadable))
