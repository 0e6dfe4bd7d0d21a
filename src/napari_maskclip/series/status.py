"""How far a dataset's annotation has come: samples, reviewed, edited pixels, pixels per class.

Used by ``napari-maskclip status DS``. Everything is read through
:func:`~napari_maskclip.export.read_dataset` (checked); the edited share and the class counts come
from the sample files themselves (one mask and one edited mask in memory at a time), not from
counts stored in ``dataset.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import DatasetError
from ..export import read_dataset
from ..progress import Progress, ProgressGenerator, run_to_completion

__all__ = ["DatasetStatus", "dataset_status", "dataset_status_iter"]


@dataclass
class DatasetStatus:
    """Counts of one dataset (see :func:`dataset_status`)."""

    dataset: Path
    samples: int
    #: Samples that hold an image (mask-only samples do not).
    images: int
    reviewed: int
    #: Samples with at least one edited pixel, reviewed ones not counted.
    with_edits: int
    #: Samples saved without edit information (edited unknown).
    unknown_edits: int
    edited_pixels: int
    total_pixels: int
    #: Names by label value (background first).
    classes: list[str]
    #: Pixels per class name, in label order.
    class_pixels: dict[str, int]
    ignored_pixels: int
    #: With a series source: its images, and how many of them the dataset holds.
    series_images: Optional[int] = None
    series_saved: Optional[int] = None
    series_source: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def edited_share(self) -> float:
        return self.edited_pixels / self.total_pixels if self.total_pixels else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": str(self.dataset),
            "samples": self.samples,
            "saved": self.samples,
            "images": self.images,
            "reviewed": self.reviewed,
            "with_edits": self.with_edits,
            "unknown_edits": self.unknown_edits,
            "edited_pixels": self.edited_pixels,
            "total_pixels": self.total_pixels,
            "edited_pixel_share": round(self.edited_share, 6),
            "classes": list(self.classes),
            "class_pixels": dict(self.class_pixels),
            "ignored_pixels": self.ignored_pixels,
            "series_source": self.series_source,
            "series_images": self.series_images,
            "series_saved": self.series_saved,
        }

    def lines(self) -> list[str]:
        """The human-readable report (the CLI prints these, then the JSON object)."""
        out = [f"dataset: {self.dataset}",
               f"saved: {self.samples} sample(s), {self.images} with an image"]
        if self.series_images is not None:
            out.append(f"series: {self.series_saved} / {self.series_images} images of "
                       f"{self.series_source} saved")
        out.append(f"reviewed: {self.reviewed}")
        out.append(f"with edits: {self.with_edits}")
        unknown = f"; {self.unknown_edits} sample(s) without edit information" if self.unknown_edits else ""
        out.append(f"edited pixels: {100 * self.edited_share:.1f} % ({self.edited_pixels} of "
                   f"{self.total_pixels}){unknown}")
        out.append(f"classes: {', '.join(self.classes)}")
        out.append("pixels per class:")
        width = max([len(n) for n in self.class_pixels] + [len("ignore")])
        total = max(1, self.total_pixels)
        for name, count in [*self.class_pixels.items(), ("ignore", self.ignored_pixels)]:
            out.append(f"  {name:<{width}}  {count:>12d}  {100 * count / total:5.1f} %")
        return out


def dataset_status_iter(
    path: Union[str, os.PathLike],
    *,
    images: Optional[Union[str, os.PathLike]] = None,
    recursive: bool = False,
) -> ProgressGenerator[DatasetStatus]:
    """Read dataset ``path`` and count (a progress step per sample). ``images``: the series'
    folder or list file, to say how many of its images are saved."""
    dataset = read_dataset(path)
    names = dataset.class_names
    counts = np.zeros(len(names), dtype=np.int64)
    ignored = edited_pixels = total = 0
    reviewed = with_edits = unknown = with_images = 0
    n = len(dataset.samples)
    yield Progress("status", 0, n, f"reading {n} sample(s)")
    for k, sample in enumerate(dataset.samples):
        mask = sample.read_mask()
        ignore = sample.ignore_index
        hist = np.bincount(mask.ravel(), minlength=ignore + 1) if mask.dtype == np.uint8 else None
        if hist is None:
            values, freq = np.unique(mask, return_counts=True)
            hist = dict(zip(values.tolist(), freq.tolist()))
            get = hist.get
        else:
            get = lambda v, h=hist: int(h[v]) if v < h.size else 0  # noqa: E731
        bad = [v for v in (range(hist.size) if isinstance(hist, np.ndarray) else hist)
               if get(v) and v != ignore and v > sample.num_classes]
        if bad:
            raise DatasetError(
                f"Sample {sample.name!r} of {dataset.path}: its mask holds label {bad[0]}, but it "
                f"was saved with {sample.num_classes} classes. Export the sample again."
            )
        for v in range(min(len(names), sample.num_classes + 1)):
            counts[v] += get(v)
        ignored += get(ignore)
        total += int(mask.size)
        with_images += int(sample.has_image)
        is_reviewed = bool(sample.provenance.get("reviewed"))
        reviewed += int(is_reviewed)
        edited = sample.read_edited()
        if edited is None:
            unknown += 1
        else:
            count = int(np.count_nonzero(edited))
            edited_pixels += count
            with_edits += int(count > 0 and not is_reviewed)
        yield Progress("status", k + 1, n, sample.name)
    status = DatasetStatus(
        dataset=dataset.path, samples=n, images=with_images, reviewed=reviewed,
        with_edits=with_edits, unknown_edits=unknown, edited_pixels=edited_pixels,
        total_pixels=total, classes=names,
        class_pixels={name: int(c) for name, c in zip(names, counts)}, ignored_pixels=ignored,
    )
    if images is not None:
        from .listing import list_images

        listing = list_images(images, recursive=recursive)
        listed = set(dataset.names)
        status.series_source = str(listing.source)
        status.series_images = len(listing)
        status.series_saved = sum(1 for name in listing.names if name in listed)
    return status


def dataset_status(path: Union[str, os.PathLike], **kwargs: Any) -> DatasetStatus:
    """:func:`dataset_status_iter` run to the end."""
    return run_to_completion(dataset_status_iter(path, **kwargs))
