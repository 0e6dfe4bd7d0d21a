"""Class lists as users type them, and the stable colour of each class.

A class list is text such as ``"cat, dog; puppy"``: classes are separated by commas or new lines,
and ``;`` separates synonyms of one class (``dog; puppy`` is one class whose prompts are both
"dog" and "puppy"; the first synonym is its display name). The same parsing serves the widget,
the CLI and the Python API, so a list means the same everywhere.

Colours belong to the class *name* (not its index), so "cat" has the same colour in every run,
layer and exported dataset: :func:`class_colors` asks :mod:`napari_maskclip.colors` (a Glasbey
palette, distinct within each list, remembered per name). This module imports neither torch nor Qt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

from .colors import assign_colors
from .errors import InvalidInputError

__all__ = [
    "ClassSpec",
    "ClassesLike",
    "parse_classes",
    "class_color",
    "class_colors",
]

_SPLIT_CLASSES = re.compile(r"[,\n\r]+")


@dataclass(frozen=True)
class ClassSpec:
    """One class: its display name and the prompts (synonyms) that describe it."""

    synonyms: tuple[str, ...]

    @property
    def name(self) -> str:
        """The display name: the first synonym."""
        return self.synonyms[0]

    @property
    def text(self) -> str:
        """The class as the user would type it (``"dog; puppy"``)."""
        return "; ".join(self.synonyms)

    @classmethod
    def from_text(cls, text: str) -> "ClassSpec":
        synonyms = tuple(_normalise_space(s) for s in text.split(";"))
        synonyms = tuple(s for s in synonyms if s)
        if not synonyms:
            raise InvalidInputError(f"Empty class name in {text!r}: type a name before or after ';'.")
        if len({s.casefold() for s in synonyms}) != len(synonyms):
            raise InvalidInputError(f"Class {text!r} repeats a synonym; list each synonym once.")
        return cls(synonyms)


ClassesLike = Union[str, Sequence[Union[str, ClassSpec]]]


def _normalise_space(text: str) -> str:
    return " ".join(text.split())


def parse_classes(classes: ClassesLike | None, *, allow_empty: bool = False) -> list[ClassSpec]:
    """Turn user input into class specs, rejecting empty and duplicate names.

    ``classes`` is either one string (``"cat, dog; puppy"`` or one class per line) or a sequence
    whose items are each one class (``["cat", "dog; puppy"]``) or :class:`ClassSpec`.
    Duplicates are compared case-insensitively across all synonyms of all classes, since the same
    word in two classes makes the result depend on list order.
    """
    if classes is None:
        items: list[str | ClassSpec] = []
    elif isinstance(classes, str):
        items = [part for part in _SPLIT_CLASSES.split(classes)]
        # A trailing or doubled separator is harmless; an empty *named* class is not.
        items = [part for part in items if part.strip()]
    else:
        items = list(classes)
    specs: list[ClassSpec] = []
    for item in items:
        if isinstance(item, ClassSpec):
            specs.append(item)
        elif isinstance(item, str):
            if not item.strip():
                raise InvalidInputError("A class name is empty: remove it or type a name.")
            specs.append(ClassSpec.from_text(item))
        else:
            raise InvalidInputError(f"A class must be text, got {type(item).__name__}.")
    if not specs and not allow_empty:
        raise InvalidInputError(
            "No class names given: type at least one, e.g. 'cat, dog; puppy' "
            "(commas or new lines separate classes, ';' separates synonyms)."
        )
    seen: dict[str, str] = {}
    for spec in specs:
        for synonym in spec.synonyms:
            key = synonym.casefold()
            if key in seen:
                raise InvalidInputError(
                    f"Duplicate class name {synonym!r} (also in {seen[key]!r}); each name may "
                    "appear once."
                )
            seen[key] = spec.text
    return specs


def class_color(name: str) -> tuple[float, float, float, float]:
    """The RGBA colour (0..1) of one class name: remembered, else a new distinct palette colour.

    For several classes shown together use :func:`class_colors`, which keeps them distinct.
    """
    return class_colors([name])[0]


def class_colors(
    names: Iterable[str], *, fixed: Optional[Mapping[str, Sequence[float]]] = None
) -> list[tuple[float, float, float, float]]:
    """Colours for the classes of one list: stable per name and distinct from each other.

    ``fixed`` (a dataset's stored colours, by name) wins; see :func:`.colors.assign_colors`.
    """
    return assign_colors(list(names), fixed=fixed)
