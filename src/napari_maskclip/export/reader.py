"""Reading a training dataset: :func:`read_dataset` is the one way in.

Only samples listed in ``dataset.json`` exist; leftovers of an interrupted export (files the index
does not list, ``.tmp-*`` files) are ignored. Arrays load lazily, per sample, so opening a large
dataset costs only two small JSON reads.

Example::

    from napari_maskclip.export import read_dataset

    ds = read_dataset("my_dataset")
    ds.classes.all_names            # ['background', 'cat', 'dog']: label value -> name
    for sample in ds:               # in export order
        image = sample.read_image()        # H x W [x C], dtype as exported (None: mask-only sample)
        mask = sample.read_mask()          # H x W uint8 (uint16); sample.ignore_index marks ignored
        edited = sample.read_edited()      # H x W bool (a person painted) or None (unknown)
        conf = sample.read_confidence()    # float16 C x H x W or None; channel k-1 = class k
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import DatasetError
from .class_table import DatasetClasses, read_class_table
from .files import read_confidence_file, read_edited_file, read_image_file, read_mask_file
from .layout import CLASSES_JSON, DATASET_FORMAT, DATASET_JSON, FORMAT_VERSION

__all__ = ["Dataset", "DatasetSample", "read_dataset", "read_index", "is_dataset"]


@dataclass
class DatasetSample:
    """One listed sample: its files (absolute paths) and what ``dataset.json`` says about it."""

    name: str
    root: Path
    image_path: Optional[Path]
    mask_path: Path
    confidence_path: Optional[Path]
    edited_path: Optional[Path]
    #: ``(H, W)`` of the mask (and image).
    shape: tuple[int, int]
    #: Named classes when it was exported; its confidence has this many channels, and its mask
    #: uses labels 0..num_classes (a dataset's class list only ever grows at the end).
    num_classes: int
    #: The ``dataset.json`` entry as stored (provenance, pixel counts, source...).
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ignore_index(self) -> int:
        """The "ignore" label of this sample's mask: 255 (uint8 PNG) or 65535 (uint16 TIFF)."""
        return 65535 if self.mask_path.suffix.lower() in (".tif", ".tiff") else 255

    @property
    def provenance(self) -> dict[str, Any]:
        """Model, pretrained weights, MaskCLIP settings and package version that made the labels."""
        return dict(self.info.get("provenance") or {})

    @property
    def has_image(self) -> bool:
        return self.image_path is not None

    def read_image(self) -> Optional[np.ndarray]:
        """The image as exported (``H x W`` or ``H x W x C``), or None for a mask-only sample."""
        return read_image_file(self.image_path) if self.image_path is not None else None

    def read_mask(self) -> np.ndarray:
        """``H x W`` labels: 0 background, k = class k, :attr:`ignore_index` = ignored."""
        return read_mask_file(self.mask_path)

    def read_confidence(self) -> Optional[np.ndarray]:
        """float16 ``num_classes x H x W`` (NaN where a class was not queried), or None."""
        return read_confidence_file(self.confidence_path) if self.confidence_path else None

    def read_edited(self) -> Optional[np.ndarray]:
        """``H x W`` bool, True where a person painted the label; None when unknown."""
        return read_edited_file(self.edited_path) if self.edited_path else None


@dataclass
class Dataset:
    """A dataset folder: its classes and its listed samples (see :mod:`.layout` for the format)."""

    path: Path
    classes: DatasetClasses
    samples: list[DatasetSample]
    #: ``dataset.json`` as stored.
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[DatasetSample]:
        return iter(self.samples)

    def __getitem__(self, key: int | str) -> DatasetSample:
        if isinstance(key, str):
            for sample in self.samples:
                if sample.name == key:
                    return sample
            raise KeyError(f"No sample {key!r} in {self.path}.")
        return self.samples[key]

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self.samples)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    @property
    def class_names(self) -> list[str]:
        """Names by label value, background first (``class_names[k]`` is label ``k``)."""
        return self.classes.all_names


def is_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dataset folder (holds ``dataset.json``)."""
    return (Path(path) / DATASET_JSON).is_file()


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """``dataset.json`` of the dataset folder ``path``, checked for format and version."""
    index_path = Path(path) / DATASET_JSON
    if not index_path.is_file():
        raise DatasetError(
            f"{Path(path)} is not a napari-maskclip dataset: it has no {DATASET_JSON}. Export at "
            "least one sample into it (an export interrupted before its first sample finished "
            "leaves none)."
        )
    try:
        info = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"Cannot read {index_path}: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{index_path} is not a napari-maskclip dataset index.")
    version = int(info.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise DatasetError(
            f"{index_path} has format version {version}; this napari-maskclip reads up to "
            f"{FORMAT_VERSION}. Update napari-maskclip."
        )
    if not isinstance(info.get("samples"), list):
        raise DatasetError(f"{index_path} has no sample list.")
    return info


def read_dataset(path: str | os.PathLike, *, check_files: bool = True) -> Dataset:
    """Open the dataset folder ``path``: classes, and the samples ``dataset.json`` lists.

    With ``check_files`` every listed file must exist (a missing one means the folder was edited
    by hand, since exports list a sample only after all its files are in place).
    """
    root = Path(path)
    info = read_index(root)
    classes = read_class_table(root / CLASSES_JSON)
    samples: list[DatasetSample] = []
    seen: set[str] = set()
    for entry in info["samples"]:
        try:
            sample = _sample_from_entry(root, entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{root / DATASET_JSON}: a sample entry is malformed ({exc!r}).") from exc
        if sample.name in seen:
            raise DatasetError(f"{root / DATASET_JSON} lists sample {sample.name!r} twice.")
        seen.add(sample.name)
        if sample.num_classes > len(classes.classes):
            raise DatasetError(
                f"Sample {sample.name!r} was exported with {sample.num_classes} classes but "
                f"{CLASSES_JSON} lists {len(classes.classes)}; restore {CLASSES_JSON}."
            )
        if check_files:
            for file in (sample.image_path, sample.mask_path, sample.confidence_path, sample.edited_path):
                if file is not None and not file.is_file():
                    raise DatasetError(
                        f"Sample {sample.name!r}: {file} is missing (deleted by hand?). Export the "
                        "sample again, or remove it from dataset.json."
                    )
        samples.append(sample)
    return Dataset(path=root, classes=classes, samples=samples, info=info)


def _sample_from_entry(root: Path, entry: dict[str, Any]) -> DatasetSample:
    def opt(key: str) -> Optional[Path]:
        value = entry.get(key)
        return root / value if value else None

    shape = entry["shape"]
    return DatasetSample(
        name=str(entry["name"]),
        root=root,
        image_path=opt("image"),
        mask_path=root / entry["mask"],
        confidence_path=opt("confidence"),
        edited_path=opt("edited"),
        shape=(int(shape[0]), int(shape[1])),
        num_classes=int(entry["num_classes"]),
        info=dict(entry),
    )
