"""One widget run as a Qt-free generator: load the model, segment the slices, report the outcome.

The widget runs :func:`segmentation_job` in a napari worker thread. It yields
:class:`~napari_maskclip.progress.Progress` for the progress bar and status line and returns a
:class:`JobOutcome`: the result, or the reason there is none (cancelled, an expected error with
the engine's message, or an unexpected exception). Errors are *returned*, not raised, so the
widget alone decides how each kind reaches the user (a plain notification for expected problems,
napari's traceback notification for bugs) and no exception type can slip through the worker
machinery unnoticed.

Cancelling sets :attr:`JobControl.cancel`; the job checks it after every progress step (each
window of each slice) and stops there, closing the engine generators so nothing partial is kept.
A trained student goes through the same job (:func:`.stack_run.predict_stack_iter`).

:func:`guarded_job` is the same contract for any other progress generator (the Export and Train
panels): its result, or the reason there is none.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional

from ..errors import Cancelled, MaskClipError
from ..progress import Progress
from .models import ModelChoice, SegmenterPool
from .stack_run import StackRequest, predict_stack_iter, segment_stack_iter

__all__ = ["JobControl", "JobOutcome", "guarded_job", "segmentation_job"]


@dataclass
class JobControl:
    """Shared between the widget (main thread) and the job (worker thread)."""

    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class JobOutcome:
    """How a run ended. Exactly one of ``result``, ``cancelled``, ``error`` is set."""

    result: Optional[Any] = None  # a StackResult for segmentation jobs
    cancelled: bool = False
    error: Optional[BaseException] = None
    model: str = ""
    #: True when a trained student made the result (no image encoder, no text encoder).
    student: bool = False
    #: Text-encoder forward passes during the run (0 = every class embedding came from cache).
    text_calls: int = 0
    seconds: float = 0.0

    @property
    def expected_error(self) -> bool:
        return isinstance(self.error, MaskClipError)


def _cancellable(gen: Generator[Progress, None, Any], control: JobControl):
    """``yield from gen``, stopping with :class:`Cancelled` as soon as cancel is requested."""
    try:
        while True:
            if control.cancel.is_set():
                raise Cancelled("Cancelled; nothing was changed.")
            try:
                step = next(gen)
            except StopIteration as stop:
                return stop.value
            yield step
    finally:
        gen.close()


def segmentation_job(
    pool: SegmenterPool,
    choice: ModelChoice,
    request: StackRequest,
    control: JobControl,
) -> Generator[Progress, None, JobOutcome]:
    """Load (or reuse) the model and segment ``request`` (its settings built and checked on the
    main thread: ``request.settings``); never raises (see :class:`JobOutcome`)."""
    started = time.perf_counter()
    outcome = JobOutcome(model=choice.describe())
    try:
        segmenter = yield from _cancellable(pool.get_iter(choice), control)
        if choice.is_student:
            outcome.student = True
            outcome.model = f"{choice.describe()} on {segmenter.device.type}"
            predict = predict_stack_iter(segmenter, request)
            outcome.result = yield from _cancellable(predict, control)
            outcome.seconds = time.perf_counter() - started
            return outcome
        from ..engine.threads import small_model_threads

        text_before = segmenter.text.forward_calls
        outcome.model = f"{choice.describe()} on {segmenter.loaded.device.type}"
        with small_model_threads(segmenter.loaded.model):  # the demo's: one thread is faster
            outcome.result = yield from _cancellable(segment_stack_iter(segmenter, request),
                                                     control)
        outcome.text_calls = segmenter.text.forward_calls - text_before
    except Cancelled:
        outcome.result, outcome.cancelled = None, True
    except Exception as exc:  # returned to the widget, which shows it (see module doc)
        outcome.result, outcome.error = None, exc
    outcome.seconds = time.perf_counter() - started
    return outcome


def guarded_job(
    make: Callable[[], Generator[Progress, None, Any]], control: JobControl
) -> Generator[Progress, None, JobOutcome]:
    """Run the generator ``make()`` (called in the worker thread) to its end; never raises.

    Cancel closes it at its next step (a training run then saves its last completed iteration;
    an export keeps the samples already written).
    """
    started = time.perf_counter()
    outcome = JobOutcome()
    try:
        outcome.result = yield from _cancellable(make(), control)
    except Cancelled:
        outcome.cancelled = True
    except Exception as exc:  # returned to the widget, which shows it
        outcome.error = exc
    outcome.seconds = time.perf_counter() - started
    return outcome
