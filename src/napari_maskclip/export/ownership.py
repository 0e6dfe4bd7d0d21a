"""Which files in a dataset folder an export may create, replace or delete.

Only the files the dataset's own ``dataset.json`` lists (a sample's files, or the ``"pending"``
files an export journals there before it renames them into place), its own temporary files
(``.tmp-<pid>-...``, see :mod:`napari_maskclip.atomic`) and its lock file. Anything else belongs to
somebody else and is never touched:

* a folder that is not a dataset and holds anything besides those (and OS clutter such as
  ``.DS_Store``) is refused;
* a file at a path a new sample may use that the index does not list is refused, also with
  overwrite (which replaces listed samples only);
* links (symlinks) among the dataset's own entries (``images/`` -> elsewhere, a sample file,
  ``dataset.json``) are refused, so no write or delete can land outside the folder;
* a path read from ``dataset.json`` is deleted only when it names a plain file in one of the
  dataset's own sub-folders (a hand-edited ``../x`` is ignored).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterable, Optional

from ..atomic import is_stale_temp, is_temp_name
from ..errors import DatasetError
from .layout import (
    CLASSES_JSON,
    CONFIDENCE_DIR,
    DATASET_JSON,
    EDITED_DIR,
    IMAGES_DIR,
    MASKS_DIR,
    sample_file_slots,
)

__all__ = [
    "LOCK_NAME",
    "OWN_DIRS",
    "check_dataset_folder",
    "files_in_the_way",
    "own_file",
    "remove_own_files",
    "remove_stale_temps",
]

OWN_DIRS = (IMAGES_DIR, MASKS_DIR, CONFIDENCE_DIR, EDITED_DIR)
#: The exporters' lock file, in the dataset folder.
LOCK_NAME = ".napari-maskclip.lock"
#: Files operating systems drop into any folder: not content, never touched.
_OS_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".directory"})
_OWN_FILE = re.compile(rf"^({'|'.join(OWN_DIRS)})/([^/\\]+)$")


def _link_error(root: Path, entry: Path) -> DatasetError:
    return DatasetError(
        f"{entry} is a link; napari-maskclip writes only inside the dataset folder {root}, so it "
        "refuses links among the dataset's files. Replace the link with the real folder or file, "
        "or export into another folder."
    )


def check_dataset_folder(root: Path) -> bool:
    """Refuse a folder the exporter must not write into; True when it is a dataset already."""
    if root.is_symlink() and not root.exists():
        raise DatasetError(f"{root} is a broken link; give a folder for the dataset.")
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file; give a folder for the dataset.")
    if not root.exists():
        return False
    if (root / LOCK_NAME).is_symlink():
        raise _link_error(root, root / LOCK_NAME)
    index = root / DATASET_JSON
    if index.is_symlink():
        raise _link_error(root, index)
    if not index.exists():
        ours = _OS_CLUTTER | {LOCK_NAME}
        foreign = sorted(p.name for p in root.iterdir()
                         if p.name not in ours and not is_temp_name(p.name))
        if foreign:
            raise DatasetError(
                f"{root} is not empty and not a dataset (it holds {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); napari-maskclip never writes among files "
                "it did not make. Choose a new or empty folder, or an existing dataset to add to."
            )
        return False
    if not index.is_file():
        raise DatasetError(f"{index} is not a file; move it away, or export into another folder.")
    for name in (CLASSES_JSON, *OWN_DIRS):
        entry = root / name
        if entry.is_symlink():
            raise _link_error(root, entry)
        if name in OWN_DIRS and entry.exists() and not entry.is_dir():
            raise DatasetError(
                f"{entry} is not a folder; move it away, or export into another folder."
            )
    return True


def files_in_the_way(root: Path, names: Iterable[str], owned: set[str]) -> list[str]:
    """Paths that new samples ``names`` may use and that hold something not in ``owned``.

    ``owned``: relative paths the exporter may replace (the files of the samples it replaces).
    A link or a folder is always in the way (the exporter never makes either).
    """
    blocked = []
    for name in names:
        for rel in sample_file_slots(name):
            path = root / rel
            if not (path.is_symlink() or path.exists()):
                continue
            if rel in owned and path.is_file() and not path.is_symlink():
                continue
            blocked.append(rel)
    return blocked


def own_file(root: Path, rel: object) -> Optional[Path]:
    """``root / rel`` when ``rel`` (read from ``dataset.json``) names a plain file in an own
    sub-folder; None for anything else (never to be deleted)."""
    if not isinstance(rel, str):
        return None
    match = _OWN_FILE.match(rel)
    if match is None or match.group(2).startswith("."):
        return None
    if (root / match.group(1)).is_symlink():
        return None
    path = root / rel
    if path.is_symlink() or not path.is_file():
        return None
    return path


def remove_own_files(root: Path, rels: Iterable[str]) -> list[str]:
    """Delete the listed own files that exist; return those that could not be deleted."""
    kept = []
    for rel in rels:
        path = own_file(root, rel)
        if path is None:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(rel)
    return kept


def remove_stale_temps(root: Path) -> None:
    """Delete temporary files that dead exports left (a live writer's are kept)."""
    for folder in (root, *(root / d for d in OWN_DIRS)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in folder.iterdir():
            if is_stale_temp(path) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()
