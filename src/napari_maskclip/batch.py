"""The per-image work of a batch (``segment``, ``predict``, ``export``), free of any UI.

A batch checks its inputs, turns each one into a :class:`Task` (a name and a function that does
the work, reporting :class:`~napari_maskclip.progress.Progress`, and returns the line to print).
The command line runs tasks one after another (:func:`napari_maskclip.cli.batch.run_tasks`) or on
a dask cluster (:mod:`napari_maskclip.distributed`); both use the checks below.
Before any work, :func:`plan_results` checks every file a ``segment``/``predict`` run will write:
images whose results exist from the same request are skipped (a rerun after a failure redoes only
the failed ones), and files that are not ours, or belong to another request, are refused.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import InvalidInputError, MaskClipError
from .messages import one_line

__all__ = [
    "Task",
    "input_images",
    "result_task",
    "check_output_folder",
    "check_file_name",
    "plan_results",
    "skipped_line",
    "SetupFailed",
    "lazy",
]

Update = Callable[[Any], None]


@dataclass
class Task:
    """One input of a batch: ``run(update)`` does the work and returns the line to print."""

    name: str
    run: Callable[[Update], str]


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


def check_file_name(path: Path) -> None:
    """Refuse an output name the file system cannot hold (over 255 bytes), before any work."""
    limit = 255
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no pathconf: POSIX's 255
        limit = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    if len(os.fsencode(path.name)) > limit:
        raise InvalidInputError(
            f"The output name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes long; file "
            f"names hold at most {limit}. Rename the input file to a shorter name."
        )


def check_output_folder(out: Path) -> None:
    """The output folder exists or can be made, and files can be written into it.

    Checked before any work, so a read-only disk, a path that is a file or a folder without
    permission fails at once rather than after the work: an existing folder gets a probe file
    (written and removed); for a new one, its nearest existing parent must be a writable folder
    on a writable file system (nothing is created before the first result).
    """
    from .atomic import TEMP_PREFIX

    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file, not a folder; choose a folder.")
    try:
        if out.is_dir():
            fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".probe", dir=out)
            try:
                os.write(fd, b"napari-maskclip write test")
            finally:
                os.close(fd)
                os.unlink(probe)
            return
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise InvalidInputError(f"--out {out}: {parent} is a file, not a folder; choose another path.")
        read_only = bool(os.statvfs(parent).f_flag & getattr(os, "ST_RDONLY", 1))
        if read_only or not os.access(parent, os.W_OK | os.X_OK):
            reason = "the file system is read-only" if read_only else "permission denied"
            raise InvalidInputError(
                f"Cannot create the output folder {out} in {parent}: {reason}; choose a folder "
                "you can write to."
            )
    except OSError as exc:
        raise InvalidInputError(f"Cannot write into the output folder {out}: {one_line(exc)}") from exc


def plan_results(
    out: Path,
    images: Sequence[Path],
    *,
    command: str,
    request: dict[str, Any],
    n_classes: int,
    confidence: bool,
    overwrite: bool,
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
) -> tuple[list[tuple[Path, dict[str, Any]]], int]:
    """Which images still need a result, and how many are finished; refuse before any work.

    Returns ``[(image, run record)]`` to do and the count skipped. Raises when any output is a
    folder, a file napari-maskclip did not write, or (without ``overwrite``) the result of another
    request.
    """
    from .result_files import plan_result, request_digest, result_paths, source_fingerprint

    check_output_folder(out)
    digest = request_digest({"command": command, **request})
    todo: list[tuple[Path, dict[str, Any]]] = []
    refused: list[str] = []
    skipped = 0
    for path in images:
        files = result_paths(out, path.stem, n_classes=n_classes, confidence=confidence,
                             stack=_is_stack(path, channel_axis, channels))
        for target in files.paths:
            check_file_name(target)
        record = {"command": command, "request": digest, "source": source_fingerprint(path)}
        plan = plan_result(files, run_record=record, overwrite=overwrite)
        if plan.state == "refused":
            refused.append(plan.reason)
        elif plan.state == "finished":
            skipped += 1
        else:
            todo.append((path, record))
    if refused:
        more = f" ({len(refused) - 1} more image(s) likewise)" if len(refused) > 1 else ""
        raise InvalidInputError(f"Not starting: {refused[0]}{more}")
    return todo, skipped


def _is_stack(path: Path, channel_axis: Optional[int], channels: Any) -> bool:
    """Whether ``path`` is a stack or time series (its labels are a TIFF); an unreadable or
    refused file counts as 2D here: its task fails with the reason."""
    from .image_files import image_header
    from .stack_files import stack_input

    try:
        shape, _ = image_header(path)
        return stack_input(path, shape, channel_axis=channel_axis, channels=channels) is not None
    except MaskClipError:
        return False


def skipped_line(skipped: int, what: str = "image") -> Optional[str]:
    """The note for finished inputs that were skipped (None when there are none)."""
    if not skipped:
        return None
    return (f"skipped {skipped} finished {what}{'s' if skipped != 1 else ''} (results of the "
            "same command exist; --overwrite redoes them)")


@dataclass
class _Shape:
    shape: tuple[int, ...]


class SetupFailed(Exception):
    """Loading what every task needs (the model) failed: the batch stops with that error."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def lazy(factory: Callable[[], Any]) -> Callable[[], Any]:
    """``factory()`` run once, on first use: a batch whose inputs all fail early (bad files)
    never loads the model. Its errors stop the batch (:class:`SetupFailed`)."""
    state: dict[str, Any] = {}

    def get() -> Any:
        if "value" not in state:
            try:
                state["value"] = factory()
            except (MaskClipError, OSError, MemoryError) as exc:
                raise SetupFailed(exc) from exc
        return state["value"]

    return get


def check_2d(path: Path, image: Any, *, channel_axis: Optional[int], channels: Any) -> None:
    """Refuse a stack or time series with a message that says what to do instead."""
    shape = tuple(image.shape)
    multichannel = len(shape) == 3 and (
        channel_axis is not None or channels is not None or shape[-1] in (1, 3, 4))
    if len(shape) <= 2 or multichannel:
        return
    raise InvalidInputError(
        f"{path} has shape {shape}: its metadata names a channel axis but not which channels "
        "to use; give --channel-axis (and --channels) for a multichannel image."
    )


#: Confidence maps larger than this are not held in memory by ``segment``: they go to the TIFF
#: block of rows by block of rows, through a temporary file beside it (see FloatStackWriter).
CONFIDENCE_IN_MEMORY = 512 << 20


def _spatial(shape: Sequence[int], channel_axis: Optional[int]) -> tuple[int, int]:
    dims = list(shape)
    if len(dims) == 3:
        del dims[channel_axis if channel_axis is not None and -3 <= channel_axis < 3 else -1]
    return int(dims[0]), int(dims[1])


def result_task(
    path: Path,
    out: Path,
    make_run: Callable[[Any, Any], Any],
    *,
    confidence: bool,
    record: Optional[dict[str, Any]] = None,
    note: Optional[Callable[[Any], str]] = None,
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
    n_classes: Optional[int] = None,
    stack_classes: Optional[int] = None,
) -> Task:
    """A task that reads image ``path``, runs ``make_run(image, probabilities)`` (a progress
    generator that returns a segmentation result) and writes the three result files.

    ``probabilities`` is what the engine should do with the confidence maps (see
    :meth:`~napari_maskclip.engine.Segmenter.segment_iter`): False with ``--no-confidence`` (not
    computed), a streaming writer when ``n_classes`` maps of the image's size exceed
    :data:`CONFIDENCE_IN_MEMORY`, else True (held, then written).

    A stack or time series (:func:`~napari_maskclip.stack_files.stack_input`) is segmented slice
    by slice into one labels and one confidence TIFF (:mod:`napari_maskclip.stack_batch`), with
    ``make_run(plane, probabilities, stacked=True, plane_channel_axis=...)``; it needs the class
    count (``n_classes``, or ``stack_classes`` for a run that never streams its 2D maps).
    """

    def run(update: Update) -> str:
        from .image_files import FloatStackWriter, image_header, read_image
        from .progress import Progress, run_to_completion
        from .result_files import write_result
        from .stack_files import stack_input

        # The header first: a file that is not an image, too large or a bad stack fails here,
        # before the model is loaded or a pixel decoded.
        shape, _ = image_header(path)
        stack = stack_input(path, shape, channel_axis=channel_axis, channels=channels)
        if stack is not None:
            return _stack_line(stack, update)
        check_2d(path, _Shape(shape), channel_axis=channel_axis, channels=channels)
        update(Progress("read", 0, 1, f"reading {path.name}"))
        image = read_image(path)
        check_2d(path, image, channel_axis=channel_axis, channels=channels)
        update(Progress("read", 1, 1, f"read {path.name}"))
        probabilities: Any = confidence
        writer = None
        height, width = _spatial(image.shape, channel_axis)
        if confidence and n_classes is not None and n_classes * height * width * 4 > CONFIDENCE_IN_MEMORY:
            writer = probabilities = FloatStackWriter(out, n_classes, height, width)
        try:
            result = run_to_completion(make_run(image, probabilities), update)
            del image
            extra: dict[str, Any] = {"source_image": str(path)}
            if record is not None:
                extra["run"] = record
            files = write_result(result, out, path.stem, confidence=confidence, extra=extra,
                                 confidence_writer=writer, progress=lambda done, total: update(
                                     Progress("write", done, total, f"writing {done}/{total} rows")))
        except OSError as exc:  # name the output folder when the error does not (a full disk)
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc
            raise
        finally:
            if writer is not None:
                writer.discard()
        return f"{path.name}: {', '.join(p.name for p in files.paths)}" + (
            note(result) if note else "")

    def _stack_line(stack: Any, update: Update) -> str:
        from .stack_batch import run_stack

        classes = stack_classes if stack_classes is not None else n_classes
        if classes is None:
            raise InvalidInputError(f"{path.name} is a stack: give the classes to segment it.")
        extra: dict[str, Any] = {"source_image": str(path)}
        if record is not None:
            extra["run"] = record
        try:
            files = run_stack(stack, out, make_run, update, confidence=confidence,
                              n_classes=classes, in_memory=CONFIDENCE_IN_MEMORY, extra=extra)
        except OSError as exc:  # name the output folder when the error does not (a full disk)
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc
            raise
        shape = " x ".join(map(str, stack.lead_shape))
        plural = "s" if stack.layout.n_slices != 1 else ""
        return f"{path.name} ({shape} slice{plural}): {', '.join(p.name for p in files.paths)}"

    return Task(path.name, run)
