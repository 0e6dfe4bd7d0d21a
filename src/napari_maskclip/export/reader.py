"""Reading a training dataset: :func:`read_dataset` is the one way in.

Only samples listed in ``dataset.json`` exist; leftovers of an interrupted export (files the index
does not list, ``.tmp-*`` files) are ignored. Arrays load lazily, per sample, so opening a large
dataset costs only two small JSON reads.

Nothing in a dataset folder is trusted: ``dataset.json`` is size-limited and every entry is
checked (types, ranges, paths inside the dataset's own folders, counts that agree with
``classes.json``) before use, and each file is checked against its entry when read (size from
the header before decoding, shape, dtype). Anything wrong raises
:class:`~napari_maskclip.errors.DatasetError` naming the file and what to do, so an edited or
damaged dataset can neither crash, hang nor allocate without bound.

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

from ..errors import DatasetError, InvalidInputError
from .class_table import DatasetClasses, read_class_table
from .files import read_confidence_file, read_edited_file, read_image_file, read_mask_file
from .layout import (
    CLASSES_JSON,
    CONFIDENCE_DIR,
    DATASET_FORMAT,
    DATASET_JSON,
    EDITED_DIR,
    FORMAT_VERSION,
    IMAGES_DIR,
    MASKS_DIR,
    check_sample_name,
)

#: ``dataset.json`` of a million samples is ~1 GB; 256 MB is far beyond any real dataset.
MAX_INDEX_BYTES = 256 << 20
#: Label values fit uint16 with 65535 left for "ignore".
MAX_CLASSES = 65534
_FOLDERS = {"image": IMAGES_DIR, "mask": MASKS_DIR, "confidence": CONFIDENCE_DIR, "edited": EDITED_DIR}

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
        if self.image_path is None:
            return None
        image = self._read(self.image_path, read_image_file, "image")
        if image.shape[:2] != self.shape:
            self._mismatch(self.image_path, image.shape, "image")
        return image

    def read_mask(self) -> np.ndarray:
        """``H x W`` labels: 0 background, k = class k, :attr:`ignore_index` = ignored."""
        mask = self._read(self.mask_path, read_mask_file, "mask")
        if mask.shape != self.shape:
            self._mismatch(self.mask_path, mask.shape, "mask")
        if mask.dtype not in (np.uint8, np.uint16):
            raise DatasetError(f"Sample {self.name!r}: {self.mask_path} holds {mask.dtype} values; "
                               "masks are uint8 PNGs or uint16 TIFFs. Export the sample again.")
        return mask

    def read_confidence(self) -> Optional[np.ndarray]:
        """float16 ``num_classes x H x W`` (NaN where a class was not queried), or None."""
        if not self.confidence_path:
            return None
        conf = self._read(self.confidence_path, read_confidence_file, "confidence")
        if conf.ndim == 2 and self.num_classes == 1:
            conf = conf[None]
        if conf.shape != (self.num_classes, *self.shape) or not np.issubdtype(conf.dtype, np.floating):
            self._mismatch(self.confidence_path, conf.shape, "confidence",
                           expected=(self.num_classes, *self.shape))
        return conf

    def read_edited(self) -> Optional[np.ndarray]:
        """``H x W`` bool, True where a person painted the label; None when unknown."""
        if not self.edited_path:
            return None
        edited = self._read(self.edited_path, read_edited_file, "edited-pixels mask")
        if edited.shape != self.shape:
            self._mismatch(self.edited_path, edited.shape, "edited-pixels mask")
        return edited

    # -- checked reading --------------------------------------------------------------------------
    def _read(self, path: Path, reader: Any, what: str) -> np.ndarray:
        """Read one file of this sample: size checked from the header, errors as one line."""
        from ..image_files import image_header

        try:
            image_header(path)
            return np.asarray(reader(path))
        except (DatasetError, MemoryError):
            raise
        except Exception as exc:  # damaged, truncated, not an image, too large...
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise DatasetError(
                f"Sample {self.name!r} of {self.root}: cannot read its {what} {path} ({reason}). "
                "Export the sample again, or remove it from dataset.json."
            ) from exc

    def _mismatch(self, path: Path, shape: Any, what: str, expected: Any = None) -> None:
        raise DatasetError(
            f"Sample {self.name!r} of {self.root}: its {what} {path} has shape {tuple(shape)} but "
            f"dataset.json says {tuple(expected or self.shape)}. Export the sample again, or "
            "remove it from dataset.json."
        )


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
        size = index_path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise DatasetError(
                f"{index_path} is {size / 2**20:.0f} MB, far larger than a dataset index; it is "
                "damaged or not napari-maskclip's. Restore it from a backup."
            )
        info = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"Cannot read {index_path}: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{index_path} is not a napari-maskclip dataset index.")
    version = info.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise DatasetError(f"{index_path}: format_version {version!r} is not a version number.")
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
        except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
            raise DatasetError(
                f"{root / DATASET_JSON}: a sample entry is malformed ({exc}); restore the file "
                "from a backup or export the samples again."
            ) from exc
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
    """One ``dataset.json`` entry, checked: every field's type and range, paths in their folder."""
    from ..image_files import MAX_IMAGE_PIXELS

    if not isinstance(entry, dict):
        raise TypeError("an entry is not a JSON object")
    name = entry["name"]
    if not isinstance(name, str):
        raise TypeError(f"sample name {name!r} is not text")
    check_sample_name(name)

    def opt(key: str, required: bool = False) -> Optional[Path]:
        value = entry.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name}: {key!r} is {value!r}, not a file path")
        parts = value.split("/")
        # <folder>/<name>.<suffix>: inside its own folder of the dataset, never elsewhere.
        if (len(parts) != 2 or parts[0] != _FOLDERS[key] or parts[1].startswith(".")
                or Path(parts[1]).stem != name or "\\" in value):
            raise ValueError(f"{name}: {key} path {value!r} is not {_FOLDERS[key]}/{name}.<ext>")
        return root / parts[0] / parts[1]

    shape = entry["shape"]
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise TypeError(f"{name}: shape {shape!r} is not [height, width]")
    if min(shape) < 1 or shape[0] * shape[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name}: shape {shape!r} is out of range")
    for key in ("provenance", "source", "pixels"):
        if entry.get(key) is not None and not isinstance(entry[key], dict):
            raise TypeError(f"{name}: {key!r} is not a JSON object")
    num_classes = entry["num_classes"]
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 0 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"{name}: num_classes {num_classes!r} is not a class count")
    return DatasetSample(
        name=name,
        root=root,
        image_path=opt("image"),
        mask_path=opt("mask", required=True),
        confidence_path=opt("confidence"),
        edited_path=opt("edited"),
        shape=(int(shape[0]), int(shape[1])),
        num_classes=int(num_classes),
        info=dict(entry),
    )
