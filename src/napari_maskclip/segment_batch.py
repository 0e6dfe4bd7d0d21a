"""``segment`` on a batch of image files, as tasks that run in this process or on dask workers.

:func:`segment_tasks` checks everything up front (classes, settings, inputs, every output file)
and returns one :class:`~napari_maskclip.batch.Task` per image still to do; each task reads its
image, segments it with a model loaded once per process (:class:`SegmentRun`, cached by its
spec) and writes the three result files atomically. The command line and :func:`segment_folder`
(the Python API) both build their batches here.
"""

from __future__ import annotations

import dataclasses

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .batch import SetupFailed, Task, input_images, plan_results, result_task
from .errors import InvalidInputError, MaskClipError, ModelLoadError

__all__ = ["SegmentRun", "SegmentBatch", "BatchSummary", "segment_tasks", "segment_folder"]


@dataclass
class SegmentRun:
    """``make_run`` for :func:`~napari_maskclip.batch.result_task`: small to send to a worker
    (names and settings, no weights); the model is loaded on first use in each process and kept
    (:func:`~napari_maskclip.distributed.worker_cached`)."""

    model: str
    pretrained: Optional[str]
    device: str
    precision: str
    settings: Any
    classes: list
    background: list
    channel_axis: Optional[int] = None
    channels: Optional[Sequence[int]] = None
    #: Region voting's label image for this image (``--regions FILE``), read where the run runs.
    region_file: Optional[str] = None
    #: Called with the loaded model where it loads (in this process only: not sent to workers).
    on_load: Optional[Callable[[Any], None]] = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_load": None}

    def key(self) -> str:
        return json.dumps([self.model, self.pretrained, self.device, self.precision,
                           self.settings.to_dict()], sort_keys=True, default=str)

    def segmenter(self):
        from .distributed import worker_cached

        def load():
            from .engine import Segmenter, load_clip

            try:
                loaded = load_clip(self.model, self.pretrained, device=self.device,
                                   precision=self.precision)
            except (MaskClipError, OSError, MemoryError) as exc:
                raise SetupFailed(exc) from exc
            if self.on_load is not None:
                self.on_load(loaded)
            return Segmenter(loaded, settings=self.settings)

        return worker_cached(("segment", self.key()), load)

    def __call__(self, image, probabilities, *, stacked: bool = False,
                 plane_channel_axis: Optional[int] = None):
        """The run on ``image``; a ``stacked`` plane (a stack's slice) has its channel axis at
        ``plane_channel_axis`` (first, or none)."""
        regions = None
        if self.region_file is not None:
            from .image_files import read_label_image

            regions = read_label_image(Path(self.region_file))
        return self.segmenter().run_iter(
            image, self.classes, background=self.background or None,
            channel_axis=plane_channel_axis if stacked else self.channel_axis,
            channels=self.channels,
            regions=regions, probabilities=probabilities)


@dataclass
class SegmentBatch:
    """The tasks still to do and how many finished images were skipped."""

    tasks: list[Task]
    skipped: int


def segment_tasks(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    classes: Any,
    background: Any = None,
    model: str = "ViT-B-16",
    pretrained: Optional[str] = None,
    device: str = "auto",
    precision: str = "auto",
    settings: Any = None,
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
    confidence: bool = True,
    overwrite: bool = False,
    regions_file: Optional[str] = None,
    on_load: Optional[Callable[[Any], None]] = None,
) -> SegmentBatch:
    """Check everything cheap and every file the batch will write, before loading a model.

    ``regions_file``: region voting's label image per input, ``{stem}`` replaced by the input's
    stem (settings ``regions="labels"``); every such file must exist before any work."""
    from .classes import parse_classes
    from .engine.names import default_pretrained
    from .engine.settings import SegmentSettings

    fg = parse_classes(classes)
    bg = parse_classes(background, allow_empty=True) if background else []
    parse_classes(fg + bg)
    settings = (settings or SegmentSettings()).validate()
    images = input_images([str(p) for p in inputs])
    region_files: dict[str, str] = {}
    if regions_file is not None:
        for path in images:
            region = Path(regions_file.replace("{stem}", Path(path).stem))
            if not region.is_file():
                raise InvalidInputError(f"--regions {regions_file!r}: no label image {region} "
                                        "(use slic, felzenszwalb or a file).")
            region_files[str(path)] = str(region)
    out = Path(out)
    pretrained = default_pretrained(model, pretrained)
    request = {
        "model": model, "pretrained": pretrained, "precision": precision,
        "classes": [c.text for c in fg], "background": [c.text for c in bg],
        "settings": settings.request_dict(), "channel_axis": channel_axis,
        "channels": list(channels) if channels is not None else None, "confidence": confidence,
    }
    todo, skipped = plan_results(out, images, command="segment", request=request,
                                 n_classes=len(fg), confidence=confidence, overwrite=overwrite,
                                 channel_axis=channel_axis, channels=channels)
    make_run = SegmentRun(model, pretrained, device, precision, settings, fg, bg,
                          channel_axis, channels, on_load=on_load)
    def run_for(path) -> SegmentRun:
        region = region_files.get(str(path))
        return make_run if region is None else dataclasses.replace(make_run, region_file=region)

    tasks = [result_task(path, out, run_for(path), confidence=confidence, record=record,
                         channel_axis=channel_axis, channels=channels, n_classes=len(fg),
                         note=_removed_note)
             for path, record in todo]
    return SegmentBatch(tasks, skipped)


def _removed_note(result) -> str:
    removed = result.removed_classes
    return f", removed by denoising: {', '.join(removed)}" if removed else ""


@dataclass
class BatchSummary:
    """What a batch did: ``done`` (image names), ``skipped`` (finished before), ``failed``
    (name -> one-line reason) and ``not_run`` (left after a file-system error stopped it)."""

    done: list[str] = field(default_factory=list)
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_run


def segment_folder(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    classes: Any,
    client: Any = None,
    workers: Optional[int] = None,
    scheduler: Optional[str] = None,
    window: Optional[int] = None,
    **options: Any,
) -> BatchSummary:
    """Segment image files into ``out`` (three files each), on a dask ``client``, a new local
    cluster of ``workers`` processes, the cluster at ``scheduler``, or (none given) here.

    ``options`` are those of :func:`segment_tasks` (model, pretrained, settings, background...).
    A bad image fails alone (in ``failed``); finished images of the same request are skipped.
    Raises the project's errors for bad requests and when the model cannot be loaded.
    """
    import contextlib

    from .distributed import map_tasks, open_client, run_task

    batch = segment_tasks(inputs, out, classes=classes, **options)
    summary = BatchSummary(skipped=batch.skipped)
    if not batch.tasks:
        return summary
    with contextlib.ExitStack() as stack:
        if client is None and (workers is not None or scheduler is not None):
            client = stack.enter_context(open_client(scheduler, workers))
        outcomes = (map_tasks(client, batch.tasks, window=window) if client is not None
                    else ((task, run_task(task)) for task in batch.tasks))
        stack.callback(outcomes.close)  # cancels what is still in flight when it stops early
        finished: set[str] = set()
        for task, outcome in outcomes:
            finished.add(task.name)
            if outcome.kind == "ok":
                summary.done.append(task.name)
                continue
            if outcome.kind == "setup":
                raise ModelLoadError(outcome.text)
            summary.failed[task.name] = outcome.text
            if outcome.kind == "stop":
                summary.not_run = [t.name for t in batch.tasks if t.name not in finished]
                break
    return summary


@dataclass
class PredictRun:
    """``make_run`` of ``predict`` for dask workers: the checkpoint's path, loaded once per
    worker (:func:`~napari_maskclip.distributed.worker_cached`), not its weights."""

    student: str
    device: str
    window: Optional[int]
    classes: Any
    channel_axis: Optional[int] = None
    channels: Optional[Sequence[int]] = None
    precision: str = "auto"

    def segmenter(self):
        from .distributed import worker_cached

        def load():
            from .student.predict import StudentSegmenter

            try:
                return StudentSegmenter(self.student, device=self.device, window=self.window,
                                        precision=self.precision)
            except (MaskClipError, OSError, MemoryError) as exc:
                raise SetupFailed(exc) from exc

        key = json.dumps([str(Path(self.student).resolve()), self.device, self.window,
                          self.precision])
        return worker_cached(("predict", key), load)

    def __call__(self, image, probabilities, *, stacked: bool = False,
                 plane_channel_axis: Optional[int] = None):  # the student returns its maps
        return self.segmenter().run_iter(
            image, self.classes,
            channel_axis=plane_channel_axis if stacked else self.channel_axis,
            channels=self.channels)
