"""The per-image batch loop of ``segment``, ``predict`` and ``export``, written once.

A command checks its inputs, turns each one into a :class:`Task` (a name and a function that does
the work, reporting :class:`~napari_maskclip.progress.Progress`, and returns the line to print),
and hands the list to :func:`run_tasks`, which drives a progress bar per task and prints each
task's line on stdout.

Batches survive bad inputs: an input that fails prints one line on stderr and the batch goes on
with the next; at the end the failed ones are listed and the exit code is 1. A file-system error
(full disk, read-only folder) stops the batch, since every later input would fail the same way.
The checks before any work and each input's work are in the core (:mod:`napari_maskclip.batch`);
with ``--workers``/``--scheduler`` the same tasks run on dask (:func:`run_tasks_on_cluster`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

from ..batch import (  # noqa: F401  (the per-input work lives in the core; re-exported here)
    CONFIDENCE_IN_MEMORY, SetupFailed, Task, check_2d, check_file_name, check_output_folder,
    input_images, lazy, plan_results, result_task, skipped_line,
)
from ..errors import MaskClipError, ModelLoadError
from .messages import one_line

__all__ = [
    "Task",
    "run_tasks",
    "run_tasks_on_cluster",
    "progress_bar",
    "input_images",
    "result_task",
    "check_output_folder",
    "check_file_name",
    "plan_results",
]

Update = Callable[[Any], None]


#: The bar's unit in stages that do not count ``unit`` (the caller's: windows, tiles...).
STAGE_UNITS = {"read": "file", "write": "row"}


def progress_bar(desc: str, disable: bool = False, unit: str = "win"):
    """A tqdm bar on stderr, fed by :class:`~napari_maskclip.progress.Progress` reports: each
    stage restarts it with the stage's total, so tqdm shows that stage's rate and remaining time."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False)
    shown = {"stage": None}

    def update(step) -> None:
        if disable:
            return
        if shown["stage"] != step.stage:
            shown["stage"] = step.stage
            bar.set_description(f"{desc} {step.stage}", refresh=False)
            bar.unit = STAGE_UNITS.get(step.stage, unit)
            bar.reset(total=step.total)
        bar.n = step.done
        bar.refresh()

    return bar, update


def run_tasks(
    tasks: Sequence[Task],
    *,
    command: str,
    quiet: bool = False,
    unit: str = "win",
    what: str = "image",
) -> int:
    """Run every task in order with a progress bar each; print each task's line. Exit code.

    A task that raises one of the project's errors is reported in one line on stderr and the
    batch goes on; a file-system error stops it. With failures, the exit code is 1 and (for more
    than one task) a last line lists them.
    """
    failed: list[str] = []
    stopped: Optional[int] = None
    for i, task in enumerate(tasks):
        bar, update = progress_bar(task.name, disable=quiet, unit=unit)
        try:
            line = task.run(update)
        except SetupFailed as exc:
            bar.close()
            raise exc.error from None
        except (MaskClipError, OSError, MemoryError) as exc:
            bar.close()
            message = one_line(exc)
            print(f"napari-maskclip {command}: error: {task.name}: {message}", file=sys.stderr)
            failed.append(task.name)
            if isinstance(exc, OSError):
                stopped = i
                break
            continue
        finally:
            bar.close()
        print(line, flush=True)
    not_run = [t.name for t in tasks[stopped + 1:]] if stopped is not None else []
    return _summary(command, failed, not_run, len(tasks), what)


def _summary(command: str, failed: Sequence[str], not_run: Sequence[str], total: int,
             what: str) -> int:
    """The last line of a batch with failures (listing them) and its exit code."""
    if not failed:
        return 0
    if total > 1:
        parts = [f"{len(failed)} of {total} {what}(s) failed: {_names(failed)}"]
        if not_run:
            parts.append(f"stopped before {len(not_run)} more: {_names(not_run)}")
        parts.append("finished ones are kept; run the same command again to do only the rest")
        print(f"napari-maskclip {command}: " + "; ".join(parts) + ".", file=sys.stderr)
    return 1


def run_tasks_on_cluster(
    tasks: Sequence[Task],
    *,
    command: str,
    scheduler: Optional[str] = None,
    workers: Optional[int] = None,
    quiet: bool = False,
    what: str = "image",
) -> int:
    """:func:`run_tasks` on dask workers (``--scheduler`` or ``--workers``): one progress bar
    over the inputs, each finished input's line as it comes, the same failure rules and summary.
    """
    from tqdm import tqdm

    from ..distributed import map_tasks, open_client

    failed: list[str] = []
    finished: set[str] = set()
    with open_client(scheduler, workers) as client:
        if not quiet:
            where = scheduler or f"{workers} local worker(s)"
            print(f"dask: {len(tasks)} {what}(s) on {where}", file=sys.stderr)
        bar = tqdm(total=len(tasks), desc=command, unit=what, file=sys.stderr, disable=quiet,
                   leave=False)
        outcomes = map_tasks(client, tasks)
        try:
            for task, outcome in outcomes:
                finished.add(task.name)
                bar.update(1)
                if outcome.kind == "ok":
                    bar.write(outcome.text, file=sys.stdout)
                    continue
                if outcome.kind == "setup":
                    raise ModelLoadError(outcome.text)
                print(f"napari-maskclip {command}: error: {task.name}: {outcome.text}",
                      file=sys.stderr)
                failed.append(task.name)
                if outcome.kind == "stop":
                    break
        finally:
            outcomes.close()
            bar.close()
    not_run = [t.name for t in tasks if t.name not in finished]
    return _summary(command, failed, not_run, len(tasks), what)


def _names(names: Sequence[str], shown: int = 5) -> str:
    extra = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + extra


