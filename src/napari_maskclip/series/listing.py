"""Which images a series annotates, in which order, under which sample names.

A series is a folder of images (optionally with its sub-folders) or a text file listing one image
path per line (relative to the list file; blank lines and ``#`` comments are skipped). Images
are sorted naturally (``img2`` before ``img10``), so the order a person sees matches the file
browser's. Each image's sample name comes from its path relative to the series root
(``sub/a b.png`` -> ``sub__a_b``), so reopening the same folder gives the same names and the
session can tell which images the dataset already holds.

Nothing is read here but names: an unreadable file is listed like any other and the session
skips it when it fails to read.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from ..errors import InvalidInputError
from ..export.layout import DATASET_JSON, safe_sample_name

__all__ = ["IMAGE_SUFFIXES", "ImageList", "list_images", "natural_key", "sample_name", "sample_names"]

#: File suffixes listed from a folder (case-insensitive).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
#: Text files read as a list of image paths.
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list", ".csv"})
_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``img2`` < ``img10``; case-insensitive, then exact."""
    parts: list[tuple[int, object]] = []
    for chunk in _DIGITS.split(text.replace("\\", "/")):
        if not chunk:
            continue
        if chunk.isdigit():
            parts.append((0, int(chunk)))
        else:
            parts.append((1, chunk.casefold()))
    return (tuple(parts), text)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as POSIX text (``..`` parts for a list file's outside paths)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def sample_name(path: Union[str, os.PathLike], root: Union[str, os.PathLike]) -> str:
    """The dataset sample name of image ``path`` in a series rooted at ``root``: its relative path
    without suffix, folders joined by ``__``, other characters ``_`` (``sub/a b.png`` -> ``sub__a_b``).
    """
    rel = _relative(Path(path), Path(root))
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        return "image"
    parts[-1] = Path(parts[-1]).stem or parts[-1]
    safe = [("up" if p == ".." else safe_sample_name(p)) for p in parts]
    name = "__".join(safe)
    if len(name) > 200:  # the exporter's limit: keep the end (the file name) and a digest
        digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
        name = f"{digest}_{name[-190:].lstrip('_.-+')}"
    return name


def sample_names(paths: list[Path], root: Path) -> list[str]:
    """Unique sample names for ``paths``: :func:`sample_name`, and where two paths give the same name
    (or names that differ only in case, which collide on macOS and Windows), each of those gets
    ``_<8 hex digits of its relative path>`` appended (stable while the path is)."""
    names = [sample_name(p, root) for p in paths]
    seen: dict[str, int] = {}
    for n in names:
        seen[n.casefold()] = seen.get(n.casefold(), 0) + 1
    out = []
    for p, n in zip(paths, names):
        if seen[n.casefold()] > 1:
            digest = hashlib.sha1(_relative(p, root).encode("utf-8")).hexdigest()[:8]
            n = f"{n[:190]}_{digest}"
        out.append(n)
    return out


@dataclass
class ImageList:
    """The images of a series, naturally sorted, with the root their sample names are relative to."""

    paths: list[Path]
    root: Path
    #: The folder or list file the images came from.
    source: Path = field(default_factory=Path)
    recursive: bool = False

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        self.root = Path(self.root)
        self._names = sample_names(self.paths, self.root)

    @property
    def names(self) -> list[str]:
        """Sample name of each image (see :func:`sample_names`)."""
        return list(self._names)

    def relative(self, i: int) -> str:
        """Image ``i``'s path relative to the root (POSIX)."""
        return _relative(self.paths[i], self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    def __getitem__(self, i: int) -> Path:
        return self.paths[i]


def _is_dataset_folder(folder: Path) -> bool:
    return (folder / DATASET_JSON).is_file()


def _from_folder(folder: Path, recursive: bool) -> list[Path]:
    """Image files of ``folder`` (hidden files and dataset folders left out)."""
    found: list[Path] = []
    if recursive:
        for top, dirs, files in os.walk(folder, followlinks=False):
            here = Path(top)
            # A dataset inside the image folder holds saved copies: never annotate them again.
            dirs[:] = [d for d in dirs if not d.startswith(".") and not _is_dataset_folder(here / d)]
            found += [here / f for f in files
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    else:
        found = [p for p in folder.iterdir()
                 if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return found


def _from_list_file(path: Path) -> list[Path]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            f"Cannot read the image list {path} ({exc}); give a UTF-8 text file with one image "
            "path per line, or an image folder."
        ) from exc
    base = path.parent
    out: list[Path] = []
    seen: set[Path] = set()
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base / p
        p = Path(os.path.normpath(p))
        if p not in seen:  # listed twice: annotated once
            seen.add(p)
            out.append(p)
    return out


def list_images(source: Union[str, os.PathLike], *, recursive: bool = False) -> ImageList:
    """The images of a folder (png, jpg/jpeg, tif/tiff, bmp; ``recursive``: with its sub-folders,
    datasets inside it excluded) or of a list file (one path per line, relative to the file),
    naturally sorted. Listed files that cannot be read stay listed (the session skips them).

    Raises :class:`InvalidInputError` when ``source`` does not exist or lists no image.
    """
    src = Path(source).expanduser()
    if src.is_dir():
        root = src
        paths = _from_folder(src, recursive)
        where = f"the folder {src}" + (" or its sub-folders" if recursive else "")
    elif src.is_file():
        if src.suffix.lower() in IMAGE_SUFFIXES:
            raise InvalidInputError(
                f"{src} is an image; give the folder that holds the series (or a text file listing "
                "its images, one per line)."
            )
        root = src.parent
        paths = _from_list_file(src)
        where = f"the list {src}"
    else:
        raise InvalidInputError(f"Image folder or list file not found: {src}")
    if not paths:
        hint = "" if recursive or not src.is_dir() else " (sub-folders are searched only when recursive)"
        raise InvalidInputError(
            f"No images in {where}{hint}: give a folder of PNG, JPEG, TIFF or BMP files, or a text "
            "file listing them."
        )
    paths.sort(key=lambda p: natural_key(_relative(p, root)))
    return ImageList(paths=paths, root=root, source=src, recursive=recursive)
