"""``classes.json``: what each label value of a dataset means.

Label 0 is background: a real class for training, described by the background prompts (default
``"background"``); label ``k`` is ``classes[k - 1]``. Each entry carries its index, display name,
synonyms (the prompts MaskCLIP used, so a student can embed the same text), colour and whether it
is the background. The same reader also understands the ``<stem>_classes.json`` files that
``napari-maskclip segment`` writes, so evaluation and export accept either.

Colours stored in a table win for its classes (``stored_colors``): appending to a dataset keeps
its colours, and only classes new to it get one (from :mod:`napari_maskclip.colors`, distinct
from the dataset's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..classes import ClassesLike, ClassSpec, class_colors, parse_classes
from ..colors import RGBA, color_key, to_rgba
from ..errors import DatasetError, InvalidInputError
from .layout import CLASSES_FORMAT, FORMAT_VERSION, ignore_index, mask_dtype

__all__ = ["DatasetClasses", "read_class_table", "DEFAULT_BACKGROUND", "BACKGROUND_COLOR"]

DEFAULT_BACKGROUND = "background"
BACKGROUND_COLOR = (0.0, 0.0, 0.0, 1.0)


@dataclass
class DatasetClasses:
    """The class list of a dataset: ``classes[k - 1]`` is label ``k``; ``background`` is label 0."""

    classes: list[ClassSpec]
    background: list[ClassSpec] = field(default_factory=lambda: parse_classes(DEFAULT_BACKGROUND))
    #: Colours read from the table, by :func:`~napari_maskclip.colors.color_key` of the name;
    #: they win over the user's remembered colours for this dataset.
    stored_colors: dict[str, RGBA] = field(default_factory=dict)

    @classmethod
    def from_user(
        cls, classes: ClassesLike, background: Optional[ClassesLike] = DEFAULT_BACKGROUND
    ) -> "DatasetClasses":
        """Parse user input; an empty background means the default ``"background"``."""
        specs = parse_classes(classes)
        bg = parse_classes(background, allow_empty=True) if background else []
        bg = bg or parse_classes(DEFAULT_BACKGROUND)
        parse_classes(specs + bg)  # one name may not be both a class and background
        return cls(specs, bg)

    # -- views ------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Display names of the named classes (label 1..n), without background."""
        return [c.name for c in self.classes]

    @property
    def background_name(self) -> str:
        return self.background[0].name if self.background else DEFAULT_BACKGROUND

    @property
    def all_names(self) -> list[str]:
        """Names by label value: ``all_names[0]`` is the background."""
        return [self.background_name, *self.names]

    @property
    def colors(self) -> list[tuple[float, float, float, float]]:
        """RGBA (0..1) by label value, background first: stored colours, else the user's."""
        return [BACKGROUND_COLOR, *class_colors(self.names, fixed=self.stored_colors)]

    def with_colors(self) -> "DatasetClasses":
        """A copy whose every class colour is fixed now (written files then all agree)."""
        colors = dict(zip((color_key(n) for n in self.names), self.colors[1:]))
        return DatasetClasses(list(self.classes), list(self.background), colors)

    @property
    def ignore_index(self) -> int:
        return ignore_index(len(self.classes))

    @property
    def mask_dtype(self) -> type:
        return mask_dtype(len(self.classes))

    def __len__(self) -> int:
        """Label values in use: background + named classes."""
        return len(self.classes) + 1

    # -- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        entries = [{
            "index": 0,
            "name": self.background_name,
            "synonyms": [s for spec in self.background for s in spec.synonyms],
            "color": list(BACKGROUND_COLOR),
            "background": True,
        }]
        for k, (spec, color) in enumerate(zip(self.classes, self.colors[1:]), start=1):
            entries.append({
                "index": k,
                "name": spec.name,
                "synonyms": list(spec.synonyms),
                "color": list(color),
                "background": False,
            })
        return {
            "format": CLASSES_FORMAT,
            "format_version": FORMAT_VERSION,
            "ignore_index": self.ignore_index,
            "background_prompts": [spec.text for spec in self.background],
            "classes": entries,
        }

    @classmethod
    def from_json(cls, table: dict[str, Any], *, source: str = "classes.json") -> "DatasetClasses":
        """Read a dataset ``classes.json`` or a ``segment`` ``<stem>_classes.json`` table."""
        try:
            _check_table_entries(table, source)
            entries = sorted(table["classes"], key=lambda e: int(e["index"]))
            fg = [e for e in entries if not e.get("background", False) and int(e["index"]) > 0]
            for k, entry in enumerate(fg, start=1):
                if int(entry["index"]) != k:
                    raise DatasetError(
                        f"{source}: class indices must run 1, 2, 3... without gaps; found "
                        f"{int(entry['index'])} where {k} was expected."
                    )
            specs = [ClassSpec(tuple(e.get("synonyms") or [e["name"]])) for e in fg]
            stored = _stored_colors(fg, specs)
            if "background_prompts" in table:
                bg_texts = list(table["background_prompts"])
            elif isinstance(table.get("background"), dict):  # segment's <stem>_classes.json
                bg_texts = list(table["background"].get("names") or [])
            else:
                zero = [e for e in entries if int(e["index"]) == 0]
                bg_texts = ["; ".join(zero[0].get("synonyms") or [zero[0]["name"]])] if zero else []
        except DatasetError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{source} is not a class table ({exc!r} is missing or wrong).") from exc
        try:
            table_classes = cls.from_user(specs, bg_texts or DEFAULT_BACKGROUND)
        except InvalidInputError as exc:
            raise DatasetError(f"{source}: {exc}") from exc
        table_classes.stored_colors = stored
        return table_classes

    def same_classes(self, other: "DatasetClasses") -> bool:
        """Same named classes in the same order (names compared case-insensitively)."""
        return [n.casefold() for n in self.names] == [n.casefold() for n in other.names]

    def merged_synonyms(self, other: "DatasetClasses") -> "DatasetClasses":
        """These classes (same names/order as ``other``) with ``other``'s new synonyms appended.

        Background prompts are merged the same way (a new background prompt is added, an existing
        one gains new synonyms). Synonyms that another class already uses are left out.
        """
        taken = {s.casefold() for spec in self.classes + self.background for s in spec.synonyms}

        def merge(mine: ClassSpec, theirs: ClassSpec) -> ClassSpec:
            extra = [s for s in theirs.synonyms if s.casefold() not in taken]
            taken.update(s.casefold() for s in extra)
            return ClassSpec(mine.synonyms + tuple(extra))

        classes = [merge(a, b) for a, b in zip(self.classes, other.classes)]
        background = list(self.background)
        for spec in other.background:
            match = [i for i, mine in enumerate(background) if mine.name.casefold() == spec.name.casefold()]
            if match:
                background[match[0]] = merge(background[match[0]], spec)
            else:
                extra = tuple(s for s in spec.synonyms if s.casefold() not in taken)
                taken.update(s.casefold() for s in extra)
                if extra:
                    background.append(ClassSpec(extra))
        return DatasetClasses(classes, background, dict(self.stored_colors))

    def extended(self, new: Sequence[ClassSpec]) -> "DatasetClasses":
        """These classes with ``new`` ones appended (existing label values keep their meaning)."""
        return DatasetClasses(parse_classes(list(self.classes) + list(new)), list(self.background),
                              dict(self.stored_colors))


def _stored_colors(entries: list[dict[str, Any]], specs: list[ClassSpec]) -> dict[str, RGBA]:
    """The valid ``color`` of each entry, by name key; a bad or missing one gets a new colour."""
    out: dict[str, RGBA] = {}
    for entry, spec in zip(entries, specs):
        try:
            out[color_key(spec.name)] = to_rgba(entry["color"])
        except (KeyError, InvalidInputError):
            continue
    return out


#: Label values fit uint16 with 65535 left for "ignore"; a class table is far below 64 MB.
MAX_TABLE_CLASSES = 65534
MAX_TABLE_BYTES = 64 << 20


def _check_table_entries(table: Any, source: str) -> None:
    """Types and bounds of a class table's entries (an edited file must not crash or hang us)."""
    entries = table.get("classes") if isinstance(table, dict) else None
    if not isinstance(entries, list) or len(entries) > MAX_TABLE_CLASSES + 1:
        raise DatasetError(f"{source}: 'classes' must be a list of at most {MAX_TABLE_CLASSES} entries.")
    for entry in entries:
        ok = isinstance(entry, dict) and isinstance(entry.get("index"), int) and not isinstance(
            entry.get("index"), bool) and 0 <= entry["index"] <= MAX_TABLE_CLASSES
        synonyms = entry.get("synonyms") if isinstance(entry, dict) else None
        ok = ok and isinstance(entry.get("name", ""), str) and (
            synonyms is None or (isinstance(synonyms, list) and len(synonyms) <= 1000
                                 and all(isinstance(s, str) and len(s) <= 1000 for s in synonyms)))
        if not ok:
            raise DatasetError(
                f"{source}: class entry {str(entry)[:80]!r} is malformed (index 0..{MAX_TABLE_CLASSES}, "
                "name text, synonyms a list of text). Restore the file or export again."
            )
    for key in ("background_prompts",):
        value = table.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DatasetError(f"{source}: {key!r} must be a list of text.")


def read_class_table(path: str | os.PathLike) -> DatasetClasses:
    """Read ``classes.json`` (a dataset's, or a ``segment`` ``<stem>_classes.json``)."""
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size > MAX_TABLE_BYTES:
            raise DatasetError(f"{p} is too large to be a class table ({p.stat().st_size} bytes).")
        table = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"Class table not found: {p}") from exc
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"Cannot read the class table {p}: {exc}") from exc
    if not isinstance(table, dict):
        raise DatasetError(f"{p} is not a class table (expected a JSON object).")
    return DatasetClasses.from_json(table, source=str(p))
