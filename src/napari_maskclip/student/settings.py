"""The settings of a MaskCLIP+ student training run, with the paper's defaults where they apply.

Defaults follow ``method.md`` section 6 (SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly decay
0.9; self-training after a tenth of the schedule; random scale 0.5-2, crop and flip as in the
official configs). The network default is DeepLabv3 on MobileNetV3-Large, small enough to train on
a CPU; ``resnet50``/``resnet101`` are closer to the paper's DeepLabv2-ResNet101.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InvalidInputError

#: The student networks :func:`napari_maskclip.student.network.build_student` can build (kept here,
#: torch-free, so CLIs and UIs can list them without loading torch).
BACKBONES = ("mobilenet_v3_large", "resnet50", "resnet101", "tiny")

__all__ = ["TrainSettings", "UNKNOWN_EDITS", "BACKBONE_WEIGHTS", "LIMITS"]

#: What pixels of a sample without edit information are: ``labels`` = the exported labels are
#: trusted targets (a person reviewed them); ``teacher`` = they are replaced by the teacher.
UNKNOWN_EDITS = ("labels", "teacher")
#: ``auto``: ImageNet weights if cached or downloadable, else random (said so); ``imagenet``:
#: ImageNet weights or an error; ``random``: no pretrained weights; or a path to a state dict.
BACKBONE_WEIGHTS = ("auto", "imagenet", "random")


@dataclass(frozen=True)
class TrainSettings:
    """How a student is trained. Stored in the checkpoint; a resumed run reuses them."""

    #: Optimiser steps in the whole schedule (poly decay runs over these).
    iterations: int = 2000
    #: Crops per step (at least 2: batch norm needs two values per channel).
    batch_size: int = 4
    #: Square training crop in pixels (images are padded with "ignore" when smaller).
    crop_size: int = 320
    #: Random rescaling range before cropping.
    scale_min: float = 0.5
    scale_max: float = 2.0
    #: Random horizontal flip.
    flip: bool = True
    #: SGD with poly decay: ``lr * (1 - it / iterations) ** poly_power``.
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    #: After this fraction of the schedule the student's own predictions replace the teacher's
    #: for pixels nobody labelled; 1.0 disables self-training.
    self_train_fraction: float = 0.1
    #: Network: ``mobilenet_v3_large`` (default, CPU-friendly), ``resnet50``, ``resnet101``
    #: (torchvision DeepLabv3), or ``tiny`` (a few conv layers, for tests and quick trials).
    backbone: str = "mobilenet_v3_large"
    #: See :data:`BACKBONE_WEIGHTS`.
    backbone_weights: str = "auto"
    #: L2-normalise the student's features before the frozen text classifier and scale the cosine
    #: by ``feature_scale`` (off, as in the official MaskCLIP+ configs: raw dot products).
    normalize_features: bool = False
    feature_scale: float = 20.0
    #: Batch-norm layers in eval mode: their statistics stay as initialised (or as the ImageNet
    #: weights have them) and only their scale and shift train. Makes a data-parallel run compute
    #: exactly what one process computes on the same global batch (see ``README: Scaling out``).
    frozen_batch_norm: bool = False
    #: Teacher pixels whose max class probability is below this are ignored (None: off, as in
    #: the official configs).
    confidence_threshold: Optional[float] = None
    #: MaskCLIP settings of the teacher (a dict of ``SegmentSettings`` fields); None = the ones
    #: recorded in the dataset, else the teacher segmenter's, else the engine's defaults.
    teacher_settings: Optional[dict[str, Any]] = None
    #: See :data:`UNKNOWN_EDITS`.
    unknown_edits: str = "labels"
    #: Share of the images held out for validation (at least one when there are two or more).
    val_fraction: float = 0.1
    #: Validate every this many iterations (and at the end); 0 = only at the end.
    val_interval: int = 200
    #: Save the checkpoint every this many iterations (and at the end); 0 = only at the end.
    save_interval: int = 250
    #: Everything random (split, batches, augmentation, initialisation, dropout) derives from it.
    seed: int = 0

    def replace(self, **changes: Any) -> "TrainSettings":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInputError(f"Unknown training setting(s): {', '.join(sorted(unknown))}.")
        return dataclasses.replace(self, **changes)

    @property
    def self_train_start(self) -> int:
        """The first iteration of the self-training stage (``iterations`` when disabled)."""
        if self.self_train_fraction >= 1.0:
            return self.iterations
        return int(round(self.self_train_fraction * self.iterations))

    def validate(self) -> "TrainSettings":
        """Raise :class:`InvalidInputError` with a clear message for impossible values.

        Types are checked first and sizes are bounded (:data:`LIMITS`), because the settings of a
        resumed run come from a checkpoint file that may have been edited."""
        for f in dataclasses.fields(self):
            problem = _type_problem(str(f.type), getattr(self, f.name))
            if problem:
                raise InvalidInputError(f"{f.name} {problem}, got {_short(getattr(self, f.name))}.")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if value <= 0:
                raise InvalidInputError(f"{name} must be a positive whole number, got {value!r}.")
            if value > LIMITS[name]:
                raise InvalidInputError(f"{name} must be at most {LIMITS[name]}, got {value}.")

        for name in ("iterations", "batch_size", "crop_size"):
            positive(name)
        if self.batch_size < 2:
            raise InvalidInputError(
                "batch_size must be at least 2 (batch norm needs two crops per step)."
            )
        if self.crop_size < 32:
            raise InvalidInputError(f"crop_size must be at least 32 px, got {self.crop_size}.")
        if self.batch_size * self.crop_size**2 > LIMITS["pixels_per_step"]:
            raise InvalidInputError(
                f"batch_size x crop_size^2 must stay under {LIMITS['pixels_per_step']} pixels per "
                f"step, got {self.batch_size} x {self.crop_size}^2; use fewer or smaller crops."
            )
        if not 0 <= self.seed <= LIMITS["seed"]:
            raise InvalidInputError(f"seed must lie in 0..{LIMITS['seed']}, got {self.seed}.")
        if not 0 < self.scale_min <= self.scale_max:
            raise InvalidInputError(
                f"The scale range must satisfy 0 < min <= max, got {self.scale_min}..{self.scale_max}."
            )
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0 or self.poly_power < 0:
            raise InvalidInputError("lr must be positive; momentum, weight decay and poly power >= 0.")
        if not 0.0 <= self.self_train_fraction <= 1.0:
            raise InvalidInputError(
                f"self_train_fraction must lie in 0..1 (1 = no self-training), got {self.self_train_fraction}."
            )
        if self.backbone not in BACKBONES:
            raise InvalidInputError(
                f"Unknown backbone {_short(self.backbone)}: use one of {', '.join(BACKBONES)}."
            )
        if not self.backbone_weights:
            raise InvalidInputError(
                "backbone_weights must be auto, imagenet, random, or a state-dict file."
            )
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise InvalidInputError(
                f"confidence_threshold must lie in 0..1, got {self.confidence_threshold}."
            )
        if self.unknown_edits not in UNKNOWN_EDITS:
            raise InvalidInputError(
                f"unknown_edits must be one of {', '.join(UNKNOWN_EDITS)}, got {_short(self.unknown_edits)}."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise InvalidInputError(f"val_fraction must lie in 0..1, got {self.val_fraction}.")
        for name in ("val_interval", "save_interval"):
            value = getattr(self, name)
            if value < 0:
                raise InvalidInputError(f"{name} must be a whole number >= 0, got {value!r}.")
        if not self.feature_scale > 0:
            raise InvalidInputError("feature_scale must be positive.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSettings":
        """Settings from their dict (unknown keys are ignored, missing ones keep the defaults);
        call :meth:`validate` before use."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"The training settings must be a mapping, got {_short(data)}.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


#: Upper bounds, so that no edited checkpoint can make a run allocate without bound or never end
#: (a checkpoint's history grows by about 100 bytes per iteration).
LIMITS = {
    "iterations": 500_000,
    "batch_size": 1024,
    "crop_size": 4096,
    "pixels_per_step": 2**28,
    "seed": 2**63 - 1,
    "text": 4096,
}


def _type_problem(annotation: str, value: Any) -> Optional[str]:
    """Why ``value`` does not fit the field annotation (``int``, ``Optional[float]``...), or None."""
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional["):-1] if optional else annotation
    if value is None:
        return None if optional else "must be given"
    if base == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be a whole number"
    if base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a finite number"
    if base == "str":
        if not isinstance(value, str):
            return "must be text"
        return None if len(value) <= LIMITS["text"] else f"must be at most {LIMITS['text']} characters"
    if base.startswith("dict"):
        return None if isinstance(value, dict) else "must be a mapping"
    return None


def _short(value: Any) -> str:
    """``repr`` cut to a length that fits in one line of an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
