"""The outcome of one MaskCLIP query on one 2D image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..classes import ClassSpec, class_colors

__all__ = ["SegmentationResult"]


@dataclass
class SegmentationResult:
    """Labels, per-class probabilities and the provenance of one query.

    ``labels`` is ``H x W`` (uint8, or uint16 beyond 255 classes): 0 is background or unassigned,
    ``k`` is ``class_names[k - 1]``. ``probabilities`` is float32 ``C x H x W`` for the user's
    classes (named background classes are not included); a class removed by prompt denoising has
    an all-zero map.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    classes: list[ClassSpec]
    background: list[ClassSpec] = field(default_factory=list)
    removed_classes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def colors(self) -> list[tuple[float, float, float, float]]:
        return class_colors(self.class_names)

    def classes_table(self) -> dict[str, Any]:
        """The JSON-ready description of classes, colours and settings (``*_classes.json``)."""
        return {
            "classes": [
                {"index": i, "name": spec.name, "synonyms": list(spec.synonyms),
                 "color": list(color)}
                for i, (spec, color) in enumerate(zip(self.classes, self.colors), start=1)
            ],
            "background": {
                "index": 0,
                "names": [spec.text for spec in self.background],
                "threshold": self.settings.get("background_threshold"),
            },
            "removed_by_denoising": list(self.removed_classes),
            "settings": dict(self.settings),
        }
