"""From a sample's labels to its mask: validation, the confidence threshold, the class mapping.

The threshold drops (sets to "ignore") pseudo-labelled pixels MaskCLIP was unsure about, so a
student is not trained on guesses. A pixel's confidence is the probability of *its own label*:
``P[k-1]`` for class ``k``, and for background (0) the probability mass left to background,
``1 - sum(P)`` (MaskCLIP's maps cover the named classes only; background prompts take the rest).

Edited pixels are always kept. When no edit mask is known, a pixel whose label is not what the
probabilities say MaskCLIP would have chosen cannot be a pseudo-label (a person changed it), so it
is kept too; only pixels that agree with MaskCLIP and are below the threshold are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InvalidInputError
from .remap import ClassMapping

__all__ = ["PixelStats", "label_confidence", "model_choice", "prepare_mask"]


@dataclass
class PixelStats:
    total: int
    edited: Optional[int]
    ignored: int
    ignored_low_confidence: int

    def to_json(self) -> dict[str, Optional[int]]:
        return {
            "total": self.total,
            "edited": self.edited,
            "pseudo": None if self.edited is None else self.total - self.edited,
            "ignored": self.ignored,
            "ignored_low_confidence": self.ignored_low_confidence,
        }


def _background_mass(p: np.ndarray) -> np.ndarray:
    """``H x W``: the probability left to background, ``1 - sum(P)`` clipped to 0..1."""
    return np.clip(1.0 - p.sum(axis=0, dtype=np.float32), 0.0, 1.0)


def label_confidence(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The probability of each pixel's own label (0 = background mass), ``H x W`` float32.

    Only ``H x W`` temporaries: no ``(C+1) x H x W`` copy, so large images stay cheap.
    """
    p = np.asarray(probabilities)
    index = np.clip(labels.astype(np.intp) - 1, 0, p.shape[0] - 1)
    own = np.take_along_axis(p, index[None], axis=0)[0].astype(np.float32)
    return np.where(labels == 0, _background_mass(p), own)


def model_choice(probabilities: np.ndarray) -> np.ndarray:
    """The label the probabilities favour (0 when the background mass is at least every class's)."""
    p = np.asarray(probabilities)
    best = p.argmax(axis=0) + 1
    return np.where(_background_mass(p) >= p.max(axis=0), 0, best)


def prepare_mask(
    labels: np.ndarray,
    *,
    n_classes: int,
    input_ignore: int,
    mapping: ClassMapping,
    probabilities: Optional[np.ndarray] = None,
    edited: Optional[np.ndarray] = None,
    min_confidence: Optional[float] = None,
    name: str = "sample",
) -> tuple[np.ndarray, PixelStats]:
    """The dataset mask of one 2D sample, and its pixel counts.

    ``labels`` holds 0..``n_classes`` and ``input_ignore``; anything else is refused (a value
    painted beyond the class list has no name to train on).
    """
    labels = np.asarray(labels)
    ignored = labels == input_ignore
    bad = ((labels < 0) | (labels > n_classes)) & ~ignored
    if bad.any():
        values = np.unique(labels[bad])[:5].tolist()
        raise InvalidInputError(
            f"{name}: label value(s) {values} are not classes (0 = background, 1..{n_classes} = "
            f"the classes, {input_ignore} = ignore). Paint them with a listed class, or add "
            "classes to the class list."
        )
    dropped = np.zeros(labels.shape, dtype=bool)
    if min_confidence is not None:
        if probabilities is None:
            raise InvalidInputError("A confidence threshold needs the probability maps.")
        dropped = label_confidence(labels, probabilities) < min_confidence
        dropped &= ~ignored
        if edited is not None:
            dropped &= ~edited
        else:
            dropped &= labels == model_choice(probabilities)
    out_ignore = mapping.target.ignore_index
    mask = mapping.apply_labels(labels.astype(np.int64, copy=False), ignored | dropped, out_ignore)
    stats = PixelStats(
        total=int(labels.size),
        edited=None if edited is None else int(np.count_nonzero(edited)),
        ignored=int(np.count_nonzero(ignored | dropped)),
        ignored_low_confidence=int(np.count_nonzero(dropped)),
    )
    return mask, stats
