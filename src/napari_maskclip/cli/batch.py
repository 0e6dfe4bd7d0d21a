"""The per-image batch loop of ``segment``, ``predict`` and ``export``, written once.

A command checks its inputs, turns each one into a :class:`Task` (a name and a function that does
the work, reporting :class:`~napari_maskclip.progress.Progress`, and returns the line to print),
and hands the list to :func:`run_tasks`, which drives a progress bar per task and prints each
task's line on stdout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..errors import InvalidInputError

__all__ = ["Task", "run_tasks", "progress_bar", "input_images", "result_task"]

Update = Callable[[Any], None]


def progress_bar(desc: str, disable: bool = False, unit: str = "win"):
    """A tqdm bar on stderr, fed by :class:`~napari_maskclip.progress.Progress` reports."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False)
    shown = {"stage": None}

    def update(step) -> None:
        if disable:
            return
        if shown["stage"] != step.stage:
            shown["stage"] = step.stage
            bar.set_description(f"{desc} {step.stage}")
            bar.reset(total=step.total)
        bar.n = step.done
        bar.refresh()

    return bar, update


@dataclass
class Task:
    """One input of a batch: ``run(update)`` does the work and returns the line to print."""

    name: str
    run: Callable[[Update], str]


def run_tasks(tasks: Sequence[Task], *, quiet: bool = False, unit: str = "win") -> int:
    """Run every task in order with a progress bar each; print each task's line. Exit code."""
    for task in tasks:
        bar, update = progress_bar(task.name, disable=quiet, unit=unit)
        try:
            line = task.run(update)
        finally:
            bar.close()
        print(line)
    return 0


def input_images(paths: Sequence[str]) -> list[Path]:
    """The image paths of a batch: each must exist, and their stems (output names) must differ."""
    images = [Path(p) for p in paths]
    for path in images:
        if not path.is_file():
            raise InvalidInputError(f"Image file not found: {path}")
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise InvalidInputError("Two input images share a file name stem; outputs would collide.")
    return images


def check_outputs(out: Path, images: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse before any work when an image's result exists already (unless ``overwrite``)."""
    from ..result_files import result_paths

    if overwrite:
        return
    existing = [str(result_paths(out, p.stem).classes_path) for p in images
                if result_paths(out, p.stem).classes_path.exists()]
    if existing:
        raise InvalidInputError(
            f"Outputs exist already (e.g. {existing[0]}); pass --overwrite to replace them."
        )


def result_task(
    path: Path,
    out: Path,
    make_run: Callable[[Any], Any],
    *,
    confidence: bool,
    note: Optional[Callable[[Any], str]] = None,
) -> Task:
    """A task that reads image ``path``, runs ``make_run(image)`` (a progress generator that
    returns a segmentation result) and writes the three result files of ``path.stem``."""

    def run(update: Update) -> str:
        from ..image_files import read_image
        from ..progress import run_to_completion
        from ..result_files import write_result

        image = read_image(path)
        result = run_to_completion(make_run(image), update)
        files = write_result(result, out, path.stem, confidence=confidence,
                             extra={"source_image": str(path)})
        return f"{path.name}: {files.labels_path.name}, {files.classes_path.name}" + (
            note(result) if note else "")

    return Task(path.name, run)
