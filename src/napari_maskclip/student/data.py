"""Training data for the student: samples, the held-out split, batches and augmentation.

A :class:`Sample` holds an image prepared as the engine prepares it (0..1 RGB), its label map
(0 = background, k = class k, :data:`IGNORE` = ignored) and which pixels are *trusted*: labelled by
a person (or declared exact), so they are targets as they are. Every other pixel gets its target
online from the teacher (or, in the self-training stage, from the student itself) on the same
augmented crop; see :func:`compose_targets`.

Everything random is a pure function of ``(seed, iteration)`` (:func:`iteration_rng`): batches
are drawn from per-epoch permutations and each crop's scale, position and flip from the
iteration's generator. A run resumed at iteration ``n`` therefore sees exactly the crops an
uninterrupted run would, without storing generator states.

Augmentation (random scale, crop, horizontal flip, as in the official configs) is one resampling
per crop with ``grid_sample``: only the pixels of the crop are computed, whatever the scale.
Labels are sampled nearest; crop pixels outside the image are padding (image 0, target ignored).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..classes import ClassesLike, ClassSpec, parse_classes
from ..engine.preprocess import prepare_image
from ..errors import DatasetError, InvalidInputError

__all__ = [
    "IGNORE",
    "Sample",
    "TrainingData",
    "Batch",
    "compose_targets",
    "split_indices",
    "batch_indices",
    "iteration_rng",
    "augment_batch",
    "load_training_data",
    "labels_from_mask",
    "compact_image",
]

#: Target value of ignored pixels inside the trainer (files use 255, or 65535 in uint16 masks).
IGNORE = -1


@dataclass
class Sample:
    """One training image with its labels and the pixels whose labels are trusted."""

    name: str
    #: ``H x W x 3`` in 0..1, stored compactly: uint8 (x/255) or float16.
    image: np.ndarray
    #: ``H x W`` int32: 0 background, k class k, :data:`IGNORE`.
    labels: np.ndarray
    #: ``H x W`` bool, True where the label is a target as is; None = every pixel.
    trusted: Optional[np.ndarray] = None
    #: Where it came from (dataset folder), for messages.
    source: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    def image_float(self, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """A region of the image as float32 0..1."""
        region = self.image[rows, cols]
        if region.dtype == np.uint8:
            return region.astype(np.float32) / 255.0
        return region.astype(np.float32)

    def trusted_mask(self) -> np.ndarray:
        if self.trusted is None:
            return np.ones(self.shape, dtype=bool)
        return self.trusted

    @property
    def needs_teacher(self) -> bool:
        """Whether some labelled pixels are not trusted (their targets come from the teacher)."""
        if self.trusted is None:
            return False
        return bool(np.any(~self.trusted & (self.labels != IGNORE)))


def compact_image(image: np.ndarray, **prepare: Any) -> np.ndarray:
    """Prepare an image like the engine does and store it as uint8 (exact for 8-bit) or float16."""
    source = np.asarray(image)
    unit = prepare_image(source, **prepare)
    if source.dtype == np.uint8 or source.dtype == np.bool_:
        return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    return unit.astype(np.float16)


@dataclass
class TrainingData:
    """Samples with one class list (index k = class k) and the background names (class 0)."""

    samples: list[Sample]
    classes: list[ClassSpec]
    background: list[ClassSpec] = field(default_factory=lambda: parse_classes("background"))
    #: What made the exported labels: {"model", "pretrained", "settings"} when known.
    provenance: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        classes: ClassesLike,
        *,
        background: ClassesLike = "background",
        trusted: Optional[Sequence[Optional[np.ndarray]]] = None,
        names: Optional[Sequence[str]] = None,
        ignore_value: Optional[int] = None,
    ) -> "TrainingData":
        """Training data from in-memory images and masks (0 background, k class k).

        ``trusted`` gives, per image, the pixels a person labelled (None: all of them).
        ``ignore_value`` defaults to 255 for uint8 masks and 65535 for uint16 ones.
        """
        specs = parse_classes(classes)
        bg = parse_classes(background, allow_empty=True) if background else []
        if len(images) != len(masks):
            raise InvalidInputError(f"{len(images)} images but {len(masks)} masks.")
        if not images:
            raise DatasetError("No training images given.")
        names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        trusted = list(trusted) if trusted is not None else [None] * len(images)
        samples = []
        for name, image, mask, trust in zip(names, images, masks, trusted):
            labels = labels_from_mask(mask, len(specs), ignore_value=ignore_value, name=name)
            unit = compact_image(image)
            if unit.shape[:2] != labels.shape:
                raise DatasetError(
                    f"{name}: the image is {unit.shape[1]}x{unit.shape[0]} px but its mask is "
                    f"{labels.shape[1]}x{labels.shape[0]}; they must match."
                )
            if trust is not None:
                trust = np.asarray(trust, dtype=bool)
                if trust.shape != labels.shape:
                    raise DatasetError(f"{name}: the edited-pixels mask does not match the image size.")
            samples.append(Sample(name=name, image=unit, labels=labels, trusted=trust))
        return cls(samples=samples, classes=specs, background=bg or parse_classes("background"))


def labels_from_mask(
    mask: np.ndarray, n_classes: int, *, ignore_value: Optional[int] = None, name: str = "mask"
) -> np.ndarray:
    """A mask file's values -> int32 labels with :data:`IGNORE`; values above the classes fail."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DatasetError(f"{name}: a mask must be a 2D integer array, got {mask.dtype} {mask.shape}.")
    if ignore_value is None:
        ignore_value = 65535 if mask.dtype == np.uint16 or n_classes >= 255 else 255
    labels = mask.astype(np.int32)
    ignored = labels == ignore_value
    labels[ignored] = IGNORE
    if labels.size and (labels.min() < IGNORE or labels.max() > n_classes):
        bad = int(labels.max())
        raise DatasetError(
            f"{name}: label {bad} is outside 0..{n_classes} (0 background, 1..{n_classes} the "
            f"classes, {ignore_value} ignored); is classes.json complete?"
        )
    return labels


def compose_targets(
    labels: torch.Tensor, trusted: torch.Tensor, valid: torch.Tensor, pseudo: Optional[torch.Tensor]
) -> torch.Tensor:
    """Per-pixel targets: trusted labels where given, ``pseudo`` elsewhere, ignore where the
    label is ignore or the pixel is padding. ``pseudo=None``: untrusted pixels are ignored."""
    if pseudo is None:
        targets = torch.where(trusted, labels, torch.full_like(labels, IGNORE))
    else:
        targets = torch.where(trusted, labels, pseudo.to(labels.dtype))
    return targets.masked_fill((labels == IGNORE) | ~valid, IGNORE)


# ---- randomness, split and batches ----------------------------------------------------------
def iteration_rng(seed: int, iteration: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one iteration (a pure function of its arguments)."""
    return np.random.default_rng([int(seed), int(iteration), int(stream), 0x5EED])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) sample indices; at least one of each when ``n >= 2`` and a fraction
    is asked for, and always at least one training sample."""
    if n <= 0:
        raise DatasetError("No training images.")
    order = np.random.default_rng([int(seed), 0x5B117]).permutation(n)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    val = sorted(int(i) for i in order[:n_val])
    train = sorted(int(i) for i in order[n_val:])
    return train, val


def batch_indices(n: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """Positions (into the training list) of the batch of ``iteration``: consecutive slices of
    seeded per-epoch permutations, so every image is seen once per epoch."""
    out = []
    for pos in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([int(seed), 0xE90C, epoch]).permutation(n)
        out.append(int(perm[offset]))
    return out


# ---- augmentation -----------------------------------------------------------------------------
@dataclass
class Batch:
    """Augmented crops: images ``B x 3 x C x C`` (0..1), labels ``B x C x C`` (long), trusted and
    valid (not padding) ``B x C x C`` (bool)."""

    images: torch.Tensor
    labels: torch.Tensor
    trusted: torch.Tensor
    valid: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.images.to(device), self.labels.to(device), self.trusted.to(device),
                     self.valid.to(device))


def _axis_plan(size: int, scale: float, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """Source coordinates (pixel-centre units) of the crop's pixels along one axis, and the
    source index range they read from."""
    scaled = max(1, int(round(size * scale)))
    start = int(rng.integers(0, scaled - crop + 1)) if scaled > crop else 0
    s = scaled / size
    coords = (start + np.arange(crop) + 0.5) / s - 0.5
    lo = max(0, int(math.floor(coords.min())) - 1)
    hi = min(size, int(math.ceil(coords.max())) + 2)
    return coords, lo, hi


_Plan = tuple[np.ndarray, int, int, np.ndarray, int, int]


def _draw_plan(
    sample: Sample, rng: np.random.Generator, crop: int, scale_range: tuple[float, float], flip: bool
) -> _Plan:
    """The random draws of one crop (scale, position, flip), without computing its pixels."""
    h, w = sample.shape
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    ys, y_lo, y_hi = _axis_plan(h, scale, crop, rng)
    xs, x_lo, x_hi = _axis_plan(w, scale, crop, rng)
    if flip and rng.uniform() < 0.5:
        xs = xs[::-1].copy()
    return ys, y_lo, y_hi, xs, x_lo, x_hi


def augment_sample(
    sample: Sample, rng: np.random.Generator, crop: int, scale_range: tuple[float, float], flip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random scale + crop + flip of ``sample`` (see the module doc)."""
    return _apply_plan(sample, _draw_plan(sample, rng, crop, scale_range, flip))


def _apply_plan(
    sample: Sample, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crop a plan describes: image, labels, trusted and valid (not padding)."""
    h, w = sample.shape
    ys, y_lo, y_hi, xs, x_lo, x_hi = plan
    rows, cols = slice(y_lo, max(y_hi, y_lo + 1)), slice(x_lo, max(x_hi, x_lo + 1))
    region = torch.from_numpy(sample.image_float(rows, cols)).permute(2, 0, 1)[None]
    labels = torch.from_numpy(sample.labels[rows, cols].astype(np.float32))[None, None]
    trusted = torch.from_numpy(sample.trusted_mask()[rows, cols].astype(np.float32))[None, None]
    rh, rw = region.shape[-2:]
    ly, lx = ys - y_lo, xs - x_lo
    gy = torch.from_numpy((ly + 0.5) * 2.0 / rh - 1.0).float()
    gx = torch.from_numpy((lx + 0.5) * 2.0 / rw - 1.0).float()
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # 1 x C x C x (x, y)
    image = F.grid_sample(region, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    lab = F.grid_sample(labels, grid, mode="nearest", padding_mode="border", align_corners=False)[0, 0]
    tru = F.grid_sample(trusted, grid, mode="nearest", padding_mode="border", align_corners=False)[0, 0]
    inside_y = torch.from_numpy((ys >= -0.5) & (ys <= h - 0.5))
    inside_x = torch.from_numpy((xs >= -0.5) & (xs <= w - 0.5))
    valid = inside_y[:, None] & inside_x[None, :]
    image = image * valid[None].float()
    return image, lab.round().long(), tru > 0.5, valid


def augment_batch(
    samples: Sequence[Sample],
    rng: np.random.Generator,
    crop: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    keep: slice = slice(None),
) -> Batch:
    """Augment each sample once (in order, drawing from ``rng``) and stack the crops; with
    ``keep``, only those crops are computed (a data-parallel rank's share: every rank makes the
    same draws, so its crops are exactly those of the whole batch at those positions)."""
    plans = [_draw_plan(s, rng, crop, scale_range, flip) for s in samples]
    parts = [_apply_plan(s, p) for s, p in list(zip(samples, plans))[keep]]
    return Batch(
        images=torch.stack([p[0] for p in parts]),
        labels=torch.stack([p[1] for p in parts]),
        trusted=torch.stack([p[2] for p in parts]),
        valid=torch.stack([p[3] for p in parts]),
    )


# ---- exported datasets ------------------------------------------------------------------------
def load_training_data(
    paths: Sequence[str | os.PathLike],
    *,
    unknown_edits: str = "labels",
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
) -> TrainingData:
    """Read one or more exported datasets (:func:`napari_maskclip.export.read_dataset`).

    Classes are matched by name: the first dataset's classes keep their label values, classes
    only later datasets have are appended, and masks are remapped accordingly. Pixels a person
    edited are trusted; the others get teacher labels during training. Samples without edit
    information follow ``unknown_edits`` (``labels``: trusted, ``teacher``: not trusted).
    Mask-only samples (no image) cannot be trained on and are skipped.
    """
    from ..export import read_dataset

    if unknown_edits not in ("labels", "teacher"):
        raise InvalidInputError(f"unknown_edits must be 'labels' or 'teacher', got {unknown_edits!r}.")
    if not paths:
        raise DatasetError("No dataset given: pass one or more exported dataset folders.")
    datasets = [read_dataset(p) for p in paths]
    classes: list[ClassSpec] = []
    background: list[ClassSpec] = []
    index: dict[str, int] = {}
    for ds in datasets:
        for spec in ds.classes.classes:
            if spec.name.casefold() not in index:
                classes.append(spec)
                index[spec.name.casefold()] = len(classes)
        for spec in ds.classes.background:
            if all(spec.name.casefold() != b.name.casefold() for b in background):
                background.append(spec)
    try:
        parse_classes(classes + background)
    except InvalidInputError as exc:
        raise DatasetError(f"The datasets' class lists do not combine: {exc}") from exc
    prefix = len(datasets) > 1
    samples: list[Sample] = []
    provenance: dict[str, Any] = {}
    skipped = 0
    for ds in datasets:
        lut = np.array([0] + [index[s.name.casefold()] for s in ds.classes.classes], dtype=np.int32)
        for entry in ds.samples:
            if not entry.has_image:
                skipped += 1
                continue
            if not provenance and (entry.provenance.get("model")):
                provenance = entry.provenance
            raw = entry.read_mask()
            labels = labels_from_mask(raw, entry.num_classes, ignore_value=entry.ignore_index,
                                      name=f"{ds.path}/{entry.name}")
            labels = np.where(labels == IGNORE, IGNORE, lut[np.clip(labels, 0, None)]).astype(np.int32)
            edited = entry.read_edited()
            if edited is None:
                trusted = None if unknown_edits == "labels" else np.zeros(labels.shape, dtype=bool)
            else:
                trusted = np.asarray(edited, dtype=bool)
            try:
                image = compact_image(entry.read_image(), channel_axis=channel_axis, channels=channels)
            except InvalidInputError as exc:
                raise DatasetError(
                    f"{ds.path}/{entry.name}: {exc} (pass channel_axis/channels, or "
                    "--channel-axis/--channels on the command line)"
                ) from exc
            if image.shape[:2] != labels.shape:
                raise DatasetError(
                    f"{ds.path}/{entry.name}: the image and its mask differ in size."
                )
            name = f"{ds.path.name}/{entry.name}" if prefix else entry.name
            samples.append(Sample(name=name, image=image, labels=labels, trusted=trusted,
                                  source=str(ds.path)))
    if not samples:
        raise DatasetError(
            "The datasets hold no sample with an image"
            + (f" ({skipped} mask-only samples skipped)" if skipped else "")
            + "; export images with their labels."
        )
    return TrainingData(samples=samples, classes=classes, background=background or
                        parse_classes("background"), provenance=provenance,
                        sources=[str(ds.path) for ds in datasets])
