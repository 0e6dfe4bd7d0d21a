"""Files an import reads must lie inside the folder the user gave (after following links).

A COCO ``file_name``, a VOC split list entry or a link inside an images folder is text that came
with the data, not a choice the user made: ``../../home/me/photo.jpg``, ``/etc/x.png`` or a
symlink to either would otherwise be copied into the dataset. :class:`Confinement` resolves each
name against its folder (symlinks followed, ``..`` applied) and keeps only those that stay
inside; the others are collected, and :meth:`Confinement.check` refuses the whole import naming
the first one.

Why refuse the whole import rather than skip those images: a name that leaves its folder is not a
flaw of one image (as a truncated file is) but a sign that the file and the folder do not belong
together, or that the file was made to read elsewhere. Importing the rest would build a dataset
from it and bury the warning among the skip notes; refusing before anything is written leaves the
user to pass the right ``--images`` folder (one that holds every file the names point to).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..errors import InvalidInputError

__all__ = ["Confinement"]


class Confinement:
    """Resolves names inside ``root``; remembers those that leave it (see the module docstring).

    ``what`` names the folder in the refusal (e.g. ``"images folder"``), ``hint`` what to do.
    """

    def __init__(self, root: Union[str, os.PathLike], what: str = "images folder",
                 hint: str = "pass the folder that holds every file (--images DIR), or fix the "
                 "names") -> None:
        self.root = Path(root)
        self.real_root = Path(os.path.realpath(self.root))
        self.what, self.hint = what, hint
        #: (name as written, where it leads) of every name that left the folder.
        self.escapes: list[tuple[str, str]] = []

    def resolve(self, name: Union[str, os.PathLike]) -> Optional[Path]:
        """``root / name`` when it (links followed) lies inside the folder, else None (recorded)."""
        text = os.fspath(name)
        path = self.root / text
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):  # a NUL byte, a link loop: not a usable name either way
            self.escapes.append((text, "an unusable path"))
            return None
        if os.path.isabs(text) or not self._inside(real):
            self.escapes.append((text, str(real)))
            return None
        return path

    def check_file(self, path: Path) -> bool:
        """Whether the listed file ``path`` (inside ``root`` by name) stays inside once its links
        are followed; a file that does not is recorded."""
        if self._inside(Path(os.path.realpath(path))):
            return True
        self.escapes.append((str(path), os.path.realpath(path)))
        return False

    def _inside(self, real: Path) -> bool:
        return real != self.real_root and real.is_relative_to(self.real_root)

    def check(self, source: Union[str, os.PathLike]) -> None:
        """Refuse the import (one line) when any name left the folder."""
        if not self.escapes:
            return
        name, where = self.escapes[0]
        count = len(self.escapes)
        raise InvalidInputError(
            f"{source}: {count} file name(s) point outside the {self.what} {self.root} "
            f"(e.g. {name!r} -> {where}); an import reads files only from inside that folder, "
            f"links followed. Nothing was imported: {self.hint}."
        )
