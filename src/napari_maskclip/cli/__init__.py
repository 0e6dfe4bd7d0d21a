"""The ``napari-maskclip`` command line: thin subcommands over the UI-free core.

Each subcommand lives in its own module of this package and registers itself with
:func:`add_subcommand`-style ``register(subparsers)`` functions listed in ``_SUBCOMMANDS``. The
entry point turns every expected error (the project's :class:`~napari_maskclip.errors.MaskClipError`,
file-system errors such as a full disk or a read-only folder, running out of memory) into one line
on stderr and a non-zero exit code (see :mod:`.messages`); unexpected errors keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

from .. import __version__
from ..errors import MaskClipError
from .messages import one_line

__all__ = ["main", "build_parser", "EXIT_USAGE", "EXIT_ERROR", "EXIT_CANCELLED"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130

# Subcommand modules, each with ``register(subparsers) -> None`` that sets ``func`` on its parser.
_SUBCOMMANDS = ("segment", "demo", "export", "train", "predict", "evaluate", "coco", "import_",
                "status", "annotate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-maskclip",
        description="Open-vocabulary dense labels from CLIP (MaskCLIP) and a self-trained "
        "student (MaskCLIP+), for batches of images.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # subcommand not part of this build yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("napari-maskclip: cancelled; nothing partial was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except (MaskClipError, OSError, MemoryError) as exc:
        print(f"napari-maskclip {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
