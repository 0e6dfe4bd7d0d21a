"""One job runner for every panel: a progress generator in a napari worker, with a progress bar in
the panel (:attr:`JobRunner.bar`, next to its Start/Cancel buttons), cancel and teardown.

**Why the panel's own bar, not napari's** ``progress``: while a napari progress runs, napari's
status bar animates an activity indicator many times a second, and a window holding an OpenGL
canvas is recomposed through OpenGL on every repaint. With software OpenGL (no GPU driver: remote
desktops, VMs, CI) that cost more CPU than the segmentation itself: measured with
``benchmarks/bench_widget.py`` (128 px, 2 busy cores) the process used 45-95 s of CPU for a first
run with napari's bar and 23 s without it, against 19-21 s for the engine alone. The panel's bar
repaints only when its value changes (reports are coalesced, see below) and never animates.

A panel hands :meth:`JobRunner.start` a *job*: a function that takes the run's
:class:`~napari_maskclip.plugin.jobs.JobControl` and returns a generator yielding
:class:`~napari_maskclip.progress.Progress` and returning a
:class:`~napari_maskclip.plugin.jobs.JobOutcome` without raising (see :mod:`..jobs`). It is
called in the worker thread. The panel gives three callbacks, all called on the main thread:

* ``record(step)``: every step, in order, as it arrives (keep a loss curve); it must not touch
  the event loop;
* ``show(step)``: update the panel's labels for the *latest* step and say what the bar shows
  (a :class:`BarState`, or None to leave it);
* ``finish(outcome)``: turn the outcome into results and messages; returns how the run ended
  (``"done"``, ``"cancelled"`` or ``"error"``), which :attr:`JobRunner.ended` then carries, once
  the bar is closed and the buttons are back.

**Never re-entrant.** A progress display may pump the Qt event loop when it changes (napari's
bar calls ``QApplication.processEvents`` in ``setValue`` / ``setDescription``), which delivers the
worker's next queued signals *inside* the current handler: a flood of progress reports then
nests handlers until Python's recursion limit, and a result can be turned into layers in the
middle of a bar update. So every worker signal goes into one queue and a single dispatcher
handles it: a signal that arrives while the dispatcher works is queued, not handled, and waits
for the next turn of the event loop; consecutive progress reports are coalesced (the latest wins;
``record`` still sees every one); the outcome and the teardown are handled after the progress
that came before them, in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional

from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QAbstractButton, QProgressBar

from ...progress import Progress
from ..jobs import JobControl, JobOutcome
from ..notify import show_exception

__all__ = ["BarState", "Job", "JobRunner"]

#: A job: called with the run's control in the worker thread, returns the progress generator.
Job = Callable[[JobControl], Generator[Progress, None, JobOutcome]]


@dataclass(frozen=True)
class BarState:
    """What the progress bar shows: ``done`` of ``total`` (None: leave the count alone) and a
    description (None: leave it; shown as the bar's tooltip, the panel's status line says it)."""

    done: Optional[int] = None
    total: Optional[int] = None
    description: Optional[str] = None


def _run_job(job: Job, control: JobControl) -> Generator[Progress, None, JobOutcome]:
    """The worker's generator function (napari needs one to make a generator worker)."""
    return (yield from job(control))


class JobRunner(QObject):
    """Runs one job at a time for a panel (see the module doc)."""

    #: How the last run ended: "done", "cancelled" or "error" (after the teardown).
    ended = Signal(str)

    def __init__(
        self,
        parent: QObject,
        *,
        title: str,
        start_button: QAbstractButton,
        cancel_button: QAbstractButton,
        show: Callable[[Progress], Optional[BarState]],
        finish: Callable[[JobOutcome], str],
        record: Optional[Callable[[Progress], None]] = None,
        on_error: Optional[Callable[[str], None]] = None,
    ) -> None:
        super().__init__(parent)
        self.title = title
        self._start_button = start_button
        self._cancel_button = cancel_button
        self._show = show
        self._finish = finish
        self._record = record
        self._on_error = on_error
        self.worker: Any = None
        self._control: Optional[JobControl] = None
        self._pbar: Optional[QProgressBar] = None
        #: The panel puts it in its footer; shown only while a job runs.
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.setVisible(False)
        self._description: Optional[str] = None
        self._queue: deque[tuple[str, Any]] = deque()
        self._dispatching = False
        self._later = QTimer(self)  # the next batch, on the next turn of the event loop
        self._later.setSingleShot(True)
        self._later.timeout.connect(self._dispatch)
        self._state = "error"
        cancel_button.setEnabled(False)

    # ---- control -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from :meth:`start` until the teardown (the buttons are back)."""
        return self.worker is not None

    def start(self, job: Job) -> Any:
        """Start ``job`` in a napari worker; returns the worker (not yet running a step)."""
        from napari.qt.threading import create_worker

        if self.running:
            raise RuntimeError("a job is running")  # panels check `running` first
        control = JobControl()
        worker = create_worker(_run_job, job, control, _start_thread=False)
        worker.yielded.connect(lambda step: self._post("progress", step))
        worker.returned.connect(lambda outcome: self._post("returned", outcome))
        worker.errored.connect(lambda exc: self._post("errored", exc))
        worker.aborted.connect(lambda: self._post("aborted", None))
        worker.finished.connect(lambda: self._post("finished", None))
        self.worker, self._control, self._state = worker, control, "error"
        self._start_button.setEnabled(False)
        self._cancel_button.setEnabled(True)
        self._description = None
        self._pbar = self.bar
        self.bar.setRange(0, 1)  # determinate from the start: a busy bar would animate
        self.bar.setValue(0)
        self.bar.setToolTip(self.title)
        self.bar.setVisible(True)
        worker.start()
        return worker

    def request_cancel(self) -> bool:
        """Ask the running job to stop at its next step (safe from any thread); False if none."""
        control = self._control
        if control is None:
            return False
        control.cancel.set()
        return True

    # ---- the dispatcher (main thread) ------------------------------------------------------------
    def _post(self, kind: str, payload: Any) -> None:
        if kind == "progress":
            if self._record is not None:
                self._record(payload)
            if self._queue and self._queue[-1][0] == "progress":
                self._queue[-1] = (kind, payload)  # coalesce: the latest report wins
            else:
                self._queue.append((kind, payload))
        else:
            self._queue.append((kind, payload))
        self._dispatch()

    def _dispatch(self) -> None:
        """Handle what is queued now, one item at a time; what arrives meanwhile (delivered by a
        bar update that pumped events) waits for the next turn of the event loop, so a flood
        never keeps the loop, or the user's Cancel, waiting."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            for _ in range(len(self._queue)):
                if not self._queue:
                    break
                self._handle(*self._queue.popleft())
        finally:
            self._dispatching = False
        if self._queue:
            self._later.start(0)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "progress":
            if self.worker is not None:
                self._update_bar(self._show(payload))
        elif kind == "returned":
            self._state = self._finish(payload)
        elif kind == "aborted":  # napari's task manager can abort a worker too
            self._state = self._finish(JobOutcome(cancelled=True))
        elif kind == "errored":  # only bugs: jobs return their errors (see ..jobs)
            text = show_exception(payload)
            if self._on_error is not None:
                self._on_error(text)
            self._state = "error"
        elif kind == "finished":
            self._teardown()

    def _update_bar(self, state: Optional[BarState]) -> None:
        pbar = self._pbar
        if state is None or pbar is None:
            return
        if state.description is not None and state.description != self._description:
            self._description = state.description
            pbar.setToolTip(state.description)
        if state.total is not None and state.total > 0 and pbar.maximum() != state.total:
            pbar.setRange(0, state.total)
        if state.done is not None and state.done > pbar.value():
            pbar.setValue(min(state.done, pbar.maximum()))

    def _teardown(self) -> None:
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            pbar.setVisible(False)
        self.worker = None
        self._control = None
        self._start_button.setEnabled(True)
        self._cancel_button.setEnabled(False)
        self.ended.emit(self._state)


class RunnerPanel:
    """What every panel reads off its :class:`JobRunner` (``self.runner``): mixed into the
    Segment, Export and Train pages so they answer ``running`` and ``worker`` the same way."""

    runner: JobRunner

    @property
    def running(self) -> bool:
        return self.runner.running

    @property
    def worker(self) -> Any:
        """The napari worker of the job in progress (None when idle)."""
        return self.runner.worker
