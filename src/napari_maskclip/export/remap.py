"""Fitting a new sample's classes to an existing dataset's class list.

Appending to a dataset requires the same named classes in the same order (names compared
case-insensitively; new synonyms are merged into ``classes.json``, so prompts only accumulate).
A different list is refused, unless the user asks to *remap*: each new class is then matched to a
dataset class by name, or failing that by a shared synonym (``puppy`` -> ``dog; puppy``); classes
the dataset lacks are appended to its list only when the user also allows adding classes.
Existing samples never change: label values only ever gain meanings at the end of the list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..classes import ClassSpec
from ..errors import DatasetError
from .class_table import DatasetClasses

__all__ = ["ClassMapping", "match_class", "plan_class_mapping"]


@dataclass
class ClassMapping:
    """How a sample's label values become the dataset's, and the dataset's resulting class list."""

    #: The dataset's class list after this export (may have new synonyms or new classes).
    target: DatasetClasses
    #: ``lut[k]`` = dataset label of the sample's label ``k`` (``lut[0] == 0``).
    lut: np.ndarray
    #: Names of classes appended to the dataset's list by this export.
    added: list[str] = field(default_factory=list)

    @property
    def identity(self) -> bool:
        return bool(np.array_equal(self.lut, np.arange(self.lut.size)))

    def as_dict(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in enumerate(self.lut)}

    def apply_labels(self, labels: np.ndarray, ignored: np.ndarray, out_ignore: int) -> np.ndarray:
        """Sample labels (0..m, valid where not ``ignored``) -> dataset mask values."""
        dtype = self.target.mask_dtype
        safe = np.where(ignored, 0, labels)
        out = self.lut.astype(dtype)[safe]
        out[ignored] = out_ignore
        return out

    def apply_confidence(self, probabilities: np.ndarray) -> np.ndarray:
        """``m x H x W`` -> ``n x H x W`` in dataset order; NaN for classes the sample lacks.

        Two sample classes mapped onto one dataset class merge by maximum (like synonyms).
        """
        n = len(self.target.classes)
        if self.identity and probabilities.shape[0] == n:
            return probabilities
        out = np.full((n,) + probabilities.shape[1:], np.nan, dtype=np.float32)
        for k in range(1, self.lut.size):
            j = int(self.lut[k]) - 1
            out[j] = np.fmax(out[j], probabilities[k - 1])
        return out


def _describe(names: list[str]) -> str:
    return "[" + ", ".join(names) + "]" if names else "[] (background only)"


def match_class(spec: ClassSpec, target: list[ClassSpec]) -> Optional[int]:
    """Index in ``target`` of the class ``spec`` means: same name first, then a shared synonym."""
    name = spec.name.casefold()
    for i, t in enumerate(target):
        if t.name.casefold() == name:
            return i
    mine = {s.casefold() for s in spec.synonyms}
    hits = [i for i, t in enumerate(target) if mine & {s.casefold() for s in t.synonyms}]
    if len(hits) > 1:
        raise DatasetError(
            f"Class {spec.text!r} shares synonyms with several dataset classes "
            f"({', '.join(target[i].name for i in hits)}); give it one name to remap it."
        )
    return hits[0] if hits else None


def plan_class_mapping(
    existing: Optional[DatasetClasses],
    new: DatasetClasses,
    *,
    remap: bool = False,
    add_classes: bool = False,
) -> ClassMapping:
    """How to store a sample whose classes are ``new`` in a dataset whose classes are ``existing``.

    ``existing`` None (an empty dataset) adopts ``new``. Raises :class:`DatasetError` with what to
    do when the lists differ and ``remap`` is off, or when classes are unknown and
    ``add_classes`` is off.
    """
    identity = np.arange(len(new.classes) + 1, dtype=np.int64)
    if existing is None:
        return ClassMapping(target=new, lut=identity)
    if existing.same_classes(new):
        return ClassMapping(target=existing.merged_synonyms(new), lut=identity)
    if not remap:
        raise DatasetError(
            f"The dataset's classes are {_describe(existing.names)} but this export's are "
            f"{_describe(new.names)} (names and order must match). Export with the dataset's "
            "class list, or remap by name (Python: remap=True; CLI: --remap; widget: the Export "
            "remap option), adding classes the dataset lacks only if you also allow it "
            "(add_classes=True / --add-classes)."
        )
    targets = list(existing.classes)
    lut = np.zeros(len(new.classes) + 1, dtype=np.int64)
    unknown: list[ClassSpec] = []
    for k, spec in enumerate(new.classes, start=1):
        i = match_class(spec, targets)
        if i is None:
            unknown.append(spec)
            continue
        lut[k] = i + 1
    if unknown and not add_classes:
        raise DatasetError(
            f"The dataset has no class {', '.join(repr(s.name) for s in unknown)} (its classes: "
            f"{_describe(existing.names)}). Allow adding classes (Python: add_classes=True; "
            "CLI: --add-classes) to append them to the dataset's list, or rename them."
        )
    target = existing.extended(unknown) if unknown else DatasetClasses(
        targets, list(existing.background), dict(existing.stored_colors))
    for spec in unknown:
        lut[new.classes.index(spec) + 1] = target.classes.index(spec) + 1
    # Background prompts merge as on a plain append; remapped classes keep the dataset's synonyms.
    target = target.merged_synonyms(DatasetClasses(list(target.classes), list(new.background)))
    return ClassMapping(target=target, lut=lut, added=[s.name for s in unknown])
