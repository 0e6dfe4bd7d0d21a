"""The Series page of the plugin's dock: annotate a whole folder, one image at a time.

Choose an image folder (or a list file) and a dataset folder, press **Open**: the viewer shows
the first image not saved yet, already labelled by the model of the Segment page (MaskCLIP with
its classes and settings, or its student), with the Labels layer ready to paint. **Next** and
**Previous** save the image through the project's exporter (:class:`~..series.SeriesSession`:
atomic, locked, edited-pixel provenance, Export's class rules) and move on; **Mark reviewed**
saves it as checked by a person (every pixel a human label) and moves on. Saved images come back
with their saved labels, never a new prediction. Keyboard (bound on the viewer while a series is
open, and on this page so they work after a click on one of its buttons): Shift+Right /
Ctrl+Right = Next, Shift+Left / Ctrl+Left = Previous, Shift+Enter = Mark reviewed.

No waiting: as soon as image k is on screen, image k+1 is read and labelled on the
:class:`~..series.prefetch.Prefetcher`'s background thread; its "ready" callback reaches this page
through a Qt signal (queued to the main thread), so Next usually shows labels at once. Jumping
elsewhere cancels what is queued; closing the series, the dock or the viewer stops the thread.
Opening (listing, checking the dataset's classes, loading the model) runs in the panels' job
runner (:mod:`.job_runner`), so the UI never freezes.

The layers are the :class:`~..series_view.SeriesView`'s (Qt-free).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Optional

from qtpy.QtCore import QEvent, Qt, QTimer, Signal
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...errors import Cancelled, MaskClipError
from ...progress import Progress
from ..jobs import JobOutcome, guarded_job
from ..models import ModelChoice
from ..control_messages import in_widget_terms
from ..notify import show_exception
from ..series_view import SeriesView, ShownImage
from .controls import WrapLabel, class_remap_boxes, page_layout, row, small_button
from .job_runner import BarState, JobRunner, RunnerPanel

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SHORTCUTS", "SeriesPanel"]

#: Viewer key bindings while a series is open: napari key -> what it does (README lists them).
SHORTCUTS = {
    "Shift-Right": "next",
    "Control-Right": "next",
    "Shift-Left": "previous",
    "Control-Left": "previous",
    "Shift-Enter": "mark_reviewed",
}


@dataclass
class _OpenRequest:
    """What Open needs, read from the controls on the main thread."""

    source: str
    recursive: bool
    dataset: str
    classes: str
    background: str
    choice: ModelChoice
    settings: Any  # the engine's checked SegmentSettings (None for a student)
    remap: bool = False  # a dataset with other classes: fit ours to its list by name (as Export)
    add_classes: bool = False  # with remap: append the classes it lacks


@dataclass
class _Save:
    """One image's save, taken when the person moved on."""

    shown: ShownImage
    labels: Any
    edited: Any
    reviewed: bool


def _open_iter(request: _OpenRequest) -> Generator[Progress, None, tuple[Any, Any]]:
    """List the images, pair them with the dataset (Export's class checks), load the model.
    Runs in the worker thread; torch loads here, the safe way (see ``..models``)."""
    from ...series import SeriesSession, list_images
    from ..models import import_student

    yield Progress("load", 0, 0, f"listing {request.source}...")
    images = list_images(request.source, recursive=request.recursive)
    session = SeriesSession.open(images, request.dataset, request.classes,
                                 background=request.background or None, remap=request.remap,
                                 add_classes=request.add_classes)
    yield Progress("load", 0, 0, f"{len(images)} images; loading {request.choice.describe()}...")
    import_student()  # engine and student, loaded the safe way inside napari (Triton hidden)
    from ... import engine
    from ...series.predictor import SeriesPredictor

    choice = request.choice
    if choice.is_student:
        predictor = SeriesPredictor.student(choice.model, request.classes or None,
                                            device=choice.device)
    else:
        # Its own model (not the Segment page's): one image at a time on another thread; the
        # features of the image on screen and of the next one are kept.
        segmenter = engine.Segmenter(choice.model, choice.pretrained, device=choice.device,
                                     settings=request.settings, feature_cache_items=2)
        predictor = SeriesPredictor.teacher(
            segmenter, request.classes, background=request.background or None,
            label="MaskCLIP demo" if choice.model == "demo" else None,
        )
    yield Progress("load", 1, 1, f"loaded {predictor.label}")
    return session, predictor


@dataclass
class _RetrainRequest:
    """One retrain round, read on the main thread."""

    dataset: Path
    checkpoint: Optional[Path]  # the student in use, continued from (None: MaskCLIP in use)
    output: Path
    iterations: int
    settings: Any  # TrainSettings of a new student (None: the checkpoint's or the defaults)
    teacher: Optional[str]
    pretrained: Optional[str]
    current: Optional[Callable[[Any], Any]]  # the model in use now, when it is not a student
    classes: list[str]
    device: str


def _retrain_iter(request: _RetrainRequest) -> Generator[Progress, None, tuple[Any, Any]]:
    """Continue (or start) the student on the dataset so far; load it when it is promoted.
    Runs in the worker thread."""
    from ...series.predictor import SeriesPredictor
    from ...series.retrain import retrain_iter

    outcome = yield from retrain_iter(
        request.dataset, request.checkpoint, request.output, iterations=request.iterations,
        settings=request.settings, teacher=request.teacher, pretrained=request.pretrained,
        current=request.current, device=request.device,
    )
    predictor = None
    if outcome.promoted:
        yield Progress("load", 0, 0, "loading the new student")
        predictor = SeriesPredictor.student(outcome.checkpoint, request.classes,
                                            device=request.device)
    return outcome, predictor


def _ready_relay(page: "SeriesPanel") -> Callable[[int], None]:
    """The prefetcher's ``on_ready`` (worker thread): emit the page's signal, which Qt queues to
    the main thread. It holds the page weakly (the prefetcher must not keep a closed viewer
    alive); a page already gone is ignored."""
    ref = weakref.ref(page)

    def relay(index: int) -> None:
        owner = ref()
        if owner is None:
            return
        try:
            owner.prediction_ready.emit(int(index))
        except RuntimeError:  # the page's C++ object is gone (viewer closed)
            pass

    return relay


def _shutdown(prefetcher: Any) -> None:
    """Stop a prefetcher (connected to the page's ``destroyed``: must not touch the page)."""
    try:
        prefetcher.close()
    except Exception:  # noqa: BLE001 - closing on teardown must never raise
        pass


class SeriesPanel(QWidget, RunnerPanel):
    """The Series page (see the module doc)."""

    #: An image is on screen ready to edit (its index); for scripts and tests.
    image_shown = Signal(int)
    #: Open or the hardest-first scoring ended: "done", "cancelled" or "error".
    job_finished = Signal(str)
    #: Image i was written into the dataset.
    saved = Signal(int)
    #: The prefetcher has image i's prediction (emitted from its thread, handled on the main one).
    prediction_ready = Signal(int)

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.main: Any = None  # the Segment page (classes, model, settings)
        self.session: Any = None
        self.predictor: Any = None
        self.prefetcher: Any = None
        self.view = SeriesView(napari_viewer)
        #: The image on screen (None while waiting for one or when closed).
        self.index: Optional[int] = None
        #: The image asked for whose prediction is not in yet.
        self.waiting: Optional[int] = None
        self._bound: list[str] = []
        #: The save Next left for after the next image is on screen (see :meth:`_move`).
        self.pending: Optional[_Save] = None
        self._watching = False  # napari's main window is watched for Close

        # ---- images, dataset, model ----
        self.source = QLineEdit()
        self.source.setPlaceholderText("folder of images, or a text file listing them")
        self.source.setToolTip("PNG, JPEG, TIFF or BMP files (gray, RGB, 16-bit), sorted "
                               "naturally (img2 before img10); or a .txt file, one path a line.")
        self.source_folder = small_button("...", "Choose the image folder.")
        self.source_list = small_button("list", "Choose a text file listing the images.")
        self.source_list.setFixedWidth(40)
        self.recursive = QCheckBox("include sub-folders")
        self.dataset = QLineEdit()
        self.dataset.setPlaceholderText("dataset folder (created on the first save)")
        self.dataset.setToolTip("Every saved image goes into this dataset, as Export writes it. "
                                "Reopening the same folder and dataset resumes where you left.")
        self.dataset_pick = small_button("...", "Choose the dataset folder.")
        images = QGroupBox("Images")
        form = QFormLayout(images)
        form.addRow("images", row(self.source, self.source_folder, self.source_list))
        form.addRow("", self.recursive)
        form.addRow("dataset", row(self.dataset, self.dataset_pick))
        self.remap, self.add_classes = class_remap_boxes()  # as Export
        form.addRow("", self.remap)
        form.addRow("", self.add_classes)
        self.hardest = QCheckBox("hardest first")
        self.hardest.setToolTip(
            "Visit the images not saved yet in order of the model's uncertainty, most uncertain "
            "first (mean over pixels of 1 - (p1 - p2), the margin between the two most likely "
            "classes, background included). Scored in the background after Open; Cancel stops "
            "it. Unchecked: folder order."
        )
        form.addRow("order", self.hardest)
        self.retrain_every = QSpinBox()
        self.retrain_every.setRange(0, 9_999)
        self.retrain_every.setSpecialValueText("never")
        self.retrain_every.setSuffix(" images")
        self.retrain_every.setToolTip(
            "Retrain as you go: after every K saved images the student continues training in "
            "the background on the dataset so far (teacher labels + your pixels, as 'train' "
            "does); the page switches to it only when its mIoU on held-out human pixels beats "
            "the model in use. 'never': off."
        )
        self.retrain_iterations = QSpinBox()
        self.retrain_iterations.setRange(1, 99_999)
        self.retrain_iterations.setValue(300)
        self.retrain_iterations.setSuffix(" iterations")
        self.retrain_iterations.setToolTip("Student iterations per retrain round.")
        form.addRow("retrain every", self.retrain_every)
        form.addRow("retrain for", self.retrain_iterations)
        model_box = QGroupBox("Model")
        self.model_info = WrapLabel("The Segment page's model, classes and settings.")
        self.model_info.setToolTip("Change the classes, model or settings (or pick a trained "
                                   "student) on the Segment page, then Open again.")
        QVBoxLayout(model_box).addWidget(self.model_info)
        self.help = WrapLabel(
            "Keys: Shift+\u2192 next, Shift+\u2190 previous (Ctrl works too), Shift+Enter mark "
            "reviewed. Next and Previous save the image."
        )
        column = QVBoxLayout()
        column.addWidget(images)
        column.addWidget(model_box)
        column.addWidget(self.help)
        self.image_list = QListWidget()
        self.image_list.setToolTip("The series in the order it is visited: \u25cb not saved, "
                                   "\u2713 saved, "
                                   "\u270e saved with edits, \u2605 reviewed, \u2717 "
                                   "unreadable. Click an image to save this one and go there.")
        self.image_list.setMinimumHeight(120)
        self.image_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.image_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        column.addWidget(self.image_list, 1)

        # ---- footer: open/close, navigation, progress ----
        self.open_button = QPushButton("Open")
        self.open_button.setToolTip("Open the folder: continues at the first image not saved.")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop opening (listing or loading the model).")
        self.close_button = QPushButton("Close")
        self.close_button.setToolTip("Close the series (an edited image is saved first).")
        self.previous_button = QPushButton("Previous")
        self.previous_button.setToolTip("Save this image and show the one before (Shift+\u2190).")
        self.next_button = QPushButton("Next")
        self.next_button.setToolTip("Save this image and show the next one (Shift+\u2192).")
        self.reviewed_button = QPushButton("Mark reviewed")
        self.reviewed_button.setToolTip(
            "Save this image as checked by a person: every pixel counts as a human label for "
            "training and validation; then show the next one (Shift+Enter)."
        )
        self.progress = WrapLabel("No series open.")
        self.status = WrapLabel("")
        footer = QVBoxLayout()
        top = QHBoxLayout()
        for button in (self.open_button, self.cancel_button, self.close_button):
            top.addWidget(button)
        nav = QHBoxLayout()
        for button in (self.previous_button, self.next_button, self.reviewed_button):
            nav.addWidget(button)
        footer.addLayout(top)
        footer.addLayout(nav)
        footer.addWidget(self.progress)
        footer.addWidget(self.status)
        page_layout(self, column, footer)

        self.runner = JobRunner(
            self, title="MaskCLIP series", start_button=self.open_button,
            cancel_button=self.cancel_button, show=self._show_progress, finish=self._job_done,
            on_error=self.status.setText,
        )
        footer.insertWidget(1, self.runner.bar)  # below Open/Cancel/Close, while a job runs
        self._job = "open"  # what the runner runs: "open", "score" or "retrain"
        #: TrainSettings for a new student's retrain rounds (None: the checkpoint's or defaults).
        self.retrain_settings: Any = None
        #: The last retrain round's outcome (a RetrainOutcome), and the saved count it ran at.
        self.last_retrain: Any = None
        self._retrained_at = 0
        self._opened_with: Optional[_OpenRequest] = None
        self._student: Optional[Path] = None  # the student checkpoint in use
        self.runner.ended.connect(self._after_job)
        self.runner.ended.connect(self.job_finished.emit)
        self.open_button.clicked.connect(self.open_series)
        self.cancel_button.clicked.connect(self.runner.request_cancel)
        self.close_button.clicked.connect(lambda: self.close_series(keep_unsaved=True))
        self.previous_button.clicked.connect(self.previous)
        self.next_button.clicked.connect(self.next)
        self.reviewed_button.clicked.connect(self.mark_reviewed)
        self.hardest.toggled.connect(self._on_hardest_toggled)
        self.source_folder.clicked.connect(self._pick_folder)
        self.source_list.clicked.connect(self._pick_list)
        self.dataset_pick.clicked.connect(self._pick_dataset)
        self.prediction_ready.connect(self._on_prediction_ready)
        self.image_list.itemClicked.connect(
            lambda item: self.jump(int(item.data(Qt.ItemDataRole.UserRole)))
        )
        self._shortcuts = self._dock_shortcuts()
        self._update_buttons()

    # ---- the Segment page ------------------------------------------------------------------------
    def attach(self, main: Any) -> None:
        """Take classes, model and settings from the Segment page ``main``."""
        self.main = main
        self.refresh_model_info()

    def refresh_model_info(self) -> None:
        """Say which model and classes Open will use (the Segment page's, as they are now)."""
        if self.predictor is not None:
            return  # the open series says its own (progress line)
        main = self.main
        if main is None:
            return
        try:
            choice = main.model.choice()
        except MaskClipError as exc:
            self.model_info.setText(f"Segment page: {exc}")
            return
        if choice.is_student:
            text = f"{choice.describe()} (its own classes)"
        else:
            classes = main.classes.classes_text() or "(no classes typed on the Segment page)"
            text = f"MaskCLIP, {choice.describe()}; classes: {classes}"
        self.model_info.setText(text)

    # ---- opening --------------------------------------------------------------------------------
    def _request(self) -> _OpenRequest:
        from ...errors import InvalidInputError

        source, dataset = self.source.text().strip(), self.dataset.text().strip()
        if not source:
            raise InvalidInputError("Choose an image folder (or a list file) first.")
        if not dataset:
            raise InvalidInputError("Choose a dataset folder to save the labels into.")
        main = self.main
        if main is None:
            raise InvalidInputError("The Series page needs the Segment page (open the MaskCLIP "
                                    "dock from napari's Plugins menu).")
        choice = main.model.choice()
        classes, background, settings = main.classes.classes_text(), "", None
        if choice.is_student:
            classes = classes or ""
        else:
            if not classes:
                raise InvalidInputError("Type the class names on the Segment page first.")
            background = main.classes.background_text()
            settings = main.settings.segment_settings()
        remap = self.remap.isChecked()
        return _OpenRequest(source, self.recursive.isChecked(), dataset, classes, background,
                            choice, settings, remap=remap,
                            add_classes=remap and self.add_classes.isChecked())

    def open_series(self) -> Any:
        """Open the folder and dataset in the fields (in the background); returns the worker, or
        None (with the reason in the status line) if refused."""
        if self.running:
            self.status.setText("Busy (opening or scoring): wait for it or press Cancel.")
            return None
        try:
            request = self._request()
        except MaskClipError as exc:
            self.status.setText(show_exception(exc))
            self.job_finished.emit("error")
            return None
        if not self.close_series(keep_unsaved=True):  # the open image could not be saved
            self.job_finished.emit("error")
            return None
        self.status.setText(f"Opening {request.source}...")
        self._job = "open"
        self._opened_with = request
        self._student = Path(request.choice.model) if request.choice.is_student else None
        self._retrained_at = 0
        return self.runner.start(lambda control: guarded_job(lambda: _open_iter(request), control))

    def _job_done(self, outcome: JobOutcome) -> str:
        if self._job == "retrain":
            return self._retrained(outcome)
        return self._scored(outcome) if self._job == "score" else self._opened(outcome)

    # ---- retrain as you go -----------------------------------------------------------------------
    def _maybe_retrain(self) -> None:
        """After a save: start a retrain round when K more images were saved since the last."""
        from ...series.retrain import RetrainPolicy

        session, every = self.session, self.retrain_every.value()
        if session is None or not every or self.running:
            return
        policy = RetrainPolicy(every_k=every, iterations=self.retrain_iterations.value())
        if policy.due(session.saved_count(), self._retrained_at):
            self.retrain()

    def retrain(self) -> Any:
        """Start a retrain round now (in the background); returns the worker (None if busy)."""
        session, request = self.session, self._opened_with
        if session is None or request is None or self.running:
            return None
        dataset = Path(session.dataset_dir)
        output = self._student or dataset.parent / f"{dataset.name}-student.safetensors"
        predictor = self.predictor
        job = _RetrainRequest(
            dataset=dataset, checkpoint=self._student, output=output,
            iterations=self.retrain_iterations.value(), settings=self.retrain_settings,
            teacher=None if request.choice.is_student else request.choice.model,
            pretrained=None if request.choice.is_student else request.choice.pretrained,
            current=None if self._student else (lambda image: predictor.predict(image).labels),
            classes=list(session.classes.names), device=request.choice.device,
        )
        self._retrained_at = session.saved_count()
        self._job = "retrain"
        self.status.setText(f"Retraining the student on {self._retrained_at} saved images "
                            "(in the background; keep going)...")
        return self.runner.start(lambda control: guarded_job(lambda: _retrain_iter(job), control))

    def _retrained(self, outcome: JobOutcome) -> str:
        if outcome.cancelled:
            self.status.setText("Retrain cancelled: the model in use is unchanged.")
            return "cancelled"
        if outcome.error is not None:
            self.status.setText("Retrain failed: " + show_exception(outcome.error))
            return "error"
        result, predictor = outcome.result
        self.last_retrain = result
        if self.session is None:
            return "cancelled"
        if predictor is None:
            self.status.setText(f"Retrained; kept {self.predictor.label} ({result.reason}).")
            return "done"
        self._student = Path(result.checkpoint)
        self.predictor = predictor
        self.prefetcher.predictor = predictor  # what it prepared with the old model is dropped
        self.status.setText(f"Retrained: the next images are labelled by {predictor.label} "
                            f"({result.reason}).")
        self._update_progress()
        if self.index is not None:
            self._prefetch_after(self.index)
        return "done"

    # ---- hardest first ---------------------------------------------------------------------------
    def _on_hardest_toggled(self, on: bool) -> None:
        if self.session is None:
            return
        if on:
            self.score()
        else:
            if self.running and self._job == "score":
                self.runner.request_cancel()
            self.session.set_order(list(range(len(self.session))))
            self._order_changed("Folder order.")

    def score(self) -> Any:
        """Score the images not saved yet by the model's uncertainty, in the background; when
        done they are visited most uncertain first. Returns the worker (None if busy)."""
        session, predictor = self.session, self.predictor
        if session is None or self.running:
            return None
        from ...series.uncertainty import score_iter

        todo = [i for i in session.order if not session.is_saved(i) and i not in
                session.unreadable and i != self.index]
        self._job = "score"
        self.status.setText(f"Scoring {len(todo)} images by uncertainty (hardest first)...")
        return self.runner.start(
            lambda control: guarded_job(lambda: score_iter(session, predictor, todo), control)
        )

    def _scored(self, outcome: JobOutcome) -> str:
        if outcome.cancelled:
            self.status.setText("Hardest first cancelled: the order is unchanged.")
            return "cancelled"
        if outcome.error is not None:
            self.status.setText(show_exception(outcome.error))
            return "error"
        session = self.session
        if session is None or not self.hardest.isChecked():
            return "cancelled"
        from ...series.uncertainty import hardest_first

        scores = outcome.result
        done = [i for i in range(len(session)) if session.is_saved(i)]
        here = [self.index] if self.index is not None and self.index not in done else []
        rest = [i for i in range(len(session)) if i not in done and i not in here]
        session.set_order(done + here + hardest_first(rest, scores))
        self._order_changed(f"Hardest first: {len(scores)} images ordered by uncertainty.")
        return "done"

    def _order_changed(self, message: str) -> None:
        self.status.setText(message)
        self._update_progress()
        if self.index is not None:
            self._prefetch_after(self.index)

    def _show_progress(self, step: Progress) -> Optional[BarState]:
        if self._job in ("score", "retrain"):  # the person works: napari's bar says it
            what = "scoring (hardest first)" if self._job == "score" else f"retrain: {step.message}"
            return BarState(done=step.done if step.total else None,
                            total=step.total or None, description=f"MaskCLIP series: {what}")
        if step.message:
            self.status.setText(step.message)
        return BarState(description=step.message or None)

    def _after_job(self, state: str) -> None:
        """Once Open has ended (the runner is free): score for hardest first if asked."""
        if state == "done" and self._job == "open" and self.hardest.isChecked():
            self.score()

    def _opened(self, outcome: JobOutcome) -> str:
        if outcome.cancelled:
            self.status.setText("Cancelled: no series opened.")
            return "cancelled"
        if outcome.error is not None:
            self.status.setText(show_exception(in_widget_terms(
                outcome.error, model_box="Segment page's model box",
                weights_box="Segment page's weights box")))
            return "error"
        session, predictor = outcome.result
        self.start(session, predictor)
        return "done"

    def start(self, session: Any, predictor: Any) -> None:
        """Annotate ``session`` with ``predictor`` (what Open does once they are ready; scripts
        and tests may call it directly)."""
        from ...series.prefetch import Prefetcher

        self.close_series()
        self.session, self.predictor = session, predictor
        self.prefetcher = Prefetcher(session, predictor, on_ready=_ready_relay(self))
        self.destroyed.connect(functools.partial(_shutdown, self.prefetcher))
        self._watch_window()
        self._bind_keys()
        first = session.first_unsaved()
        if first >= len(session):
            first = session.next_index(None, +1)
            self.status.setText("Every image of this series is saved; showing the first.")
        self.model_info.setText(f"{predictor.label}; classes: "
                                f"{', '.join(session.classes.names)}")
        if first is None:
            self._update_progress()
            self.status.setText("No readable image in this series.")
            return
        self.go_to(first)

    # ---- moving ---------------------------------------------------------------------------------
    def go_to(self, i: int) -> None:
        """Show image ``i`` (saved: its saved labels; else the model's, at once if prefetched).
        An unreadable image is listed and the next readable one is shown instead."""
        session = self.session
        if session is None:
            return
        while True:
            if session.is_saved(i):
                if self._show_saved(i):
                    return
            else:
                if not self.prefetcher.started(i):
                    self.prefetcher.cancel_all()  # a jump: what was queued is not needed
                self.prefetcher.request(i)
                self.index, self.waiting = None, i
                self._update_buttons()
                self._update_progress()  # the series' line, not "No series open."
                self.status.setText(f"Labelling {session.names[i]}...")
                if self._try_show_predicted(i):
                    return
                return  # shown when prediction_ready arrives
            nxt = session.next_index(i, +1)
            if nxt is None:
                self._update_progress()
                return
            i = nxt

    def _show_saved(self, i: int) -> bool:
        session = self.session
        try:
            image = session.read_image(i)
        except MaskClipError:
            self._unreadable_changed()
            return False
        shown = ShownImage(
            index=i, name=session.names[i], image=image, shown=session.saved_labels(i),
            predicted=False, saved_edited=session.saved_edited(i),
            model_label=_labelled_by(session.saved_sample(i)) or self.predictor.label,
        )
        self._put(shown, "saved labels" + (", reviewed" if session.is_reviewed(i) else ""))
        return True

    def _on_prediction_ready(self, i: int) -> None:
        if self.waiting == i:
            self._try_show_predicted(i)

    def _try_show_predicted(self, i: int) -> bool:
        """Show image ``i``'s prediction if it is ready; True when the image is dealt with."""
        session = self.session
        if not self.prefetcher.ready(i):
            return False
        try:
            prediction = self.prefetcher.result(i)
            image = prediction.image if prediction.image is not None else session.read_image(i)
        except Cancelled:  # dropped meanwhile (another request): ask again
            self.prefetcher.request(i)
            return False
        except MaskClipError as exc:  # unreadable (recorded by the session) or failed
            session.unreadable.setdefault(i, str(exc))
            self.waiting = None
            self._unreadable_changed()
            nxt = session.next_index(i, +1)
            if nxt is not None:
                self.go_to(nxt)
            else:
                self._update_progress()
            return True
        shown = ShownImage(
            index=i, name=session.names[i], image=image, shown=prediction.labels,
            predicted=True, probabilities=prediction.probabilities,
            model_label=prediction.model_label, provenance=dict(prediction.provenance or {}),
        )
        self._put(shown, f"labelled by {prediction.model_label}")
        return True

    def _put(self, shown: ShownImage, how: str, labels: Any = None) -> None:
        session = self.session
        colors = session.classes.colors[1:]
        self.view.show(shown, class_names=session.classes.names, colors=colors,
                       source_path=str(session.images[shown.index]), labels=labels)
        self.index, self.waiting = shown.index, None
        position = session.order.index(shown.index) + 1
        self.status.setText(f"Image {position} of {len(session)}: {shown.name} ({how})."
                            + self._unreadable_text())
        self._update_progress()
        self._update_buttons()
        self._prefetch_after(shown.index)
        self.image_shown.emit(shown.index)

    def _prefetch_after(self, i: int) -> None:
        """Start labelling the next image not saved yet, right away."""
        session = self.session
        nxt = session.next_index(i, +1)
        if nxt is not None and not session.is_saved(nxt):
            self.prefetcher.request(nxt)

    def _unreadable_text(self) -> str:
        """`` Skipped (unreadable): name: reason; ...`` ("" when every image read)."""
        session = self.session
        if session is None or not session.unreadable:
            return ""
        listed = "; ".join(f"{session.names[k]}: {why}" for k, why in
                           sorted(session.unreadable.items()))
        return f" Skipped (unreadable): {listed}"

    def _unreadable_changed(self) -> None:
        if self._unreadable_text():
            self.status.setText(self._unreadable_text().strip())
            self._update_progress()

    def _take(self, *, reviewed: bool = False) -> Optional[_Save]:
        """A snapshot of what saving the image on screen writes (None: nothing to save, it is
        saved and unchanged, unless ``reviewed``). Painting after this does not change it."""
        shown = self.view.current
        if self.session is None or shown is None or self.index is None:
            return None
        labels = self.view.labels()
        if self.session.is_saved(shown.index) and not reviewed and not self.view.changed(labels):
            return None
        return _Save(shown, labels, self.view.edited(labels), reviewed)

    def _write(self, job: _Save) -> bool:
        """Save ``job`` through the session; on failure say so, and put the image back on screen
        with the person's labels if the page has moved on (nothing painted is lost)."""
        shown = job.shown
        try:
            self.session.save(
                shown.index, shown.image, job.labels,
                probabilities=shown.probabilities if shown.predicted else None,
                edited=job.edited, reviewed=job.reviewed, provenance=shown.provenance,
            )
        except (MaskClipError, OSError) as exc:
            message = show_exception(exc)
            if self.index != shown.index:
                self._put(shown, "not saved", labels=job.labels)
            self.status.setText(f"{shown.name} was NOT saved: {message}")
            return False
        if self.prefetcher is not None:
            self.prefetcher.invalidate(shown.index)  # its saved labels count from now on
        self._update_progress()
        self.saved.emit(shown.index)
        self._maybe_retrain()
        return True

    def flush_saves(self) -> bool:
        """Write the save that Next left for after the next image was shown; False if it failed."""
        job, self.pending = self.pending, None
        return job is None or self._write(job)

    def save_current(self, *, reviewed: bool = False) -> bool:
        """Save the image on screen now (see :meth:`_take`); False (with the reason shown) when
        saving failed."""
        if not self.flush_saves():
            return False
        job = self._take(reviewed=reviewed)
        return job is None or self._write(job)

    def jump(self, i: int) -> None:
        """Save this image and show image ``i`` (a click in the list)."""
        if self.session is not None and i != self.index:
            self._move(0, target=i)

    def _move(self, step: int, *, reviewed: bool = False, target: Optional[int] = None) -> None:
        """Save and move. The next image is put on screen first and the save written right after
        (on the next turn of the event loop), so the labels appear without waiting for the
        files; any other action writes a pending save first."""
        if self.session is None or self.index is None or not self.flush_saves():
            return
        job = self._take(reviewed=reviewed)
        nxt = target if target is not None else self.session.next_index(self.index, step)
        if nxt is None:
            if job is None or self._write(job):
                where = "last" if step > 0 else "first"
                self.status.setText(f"Saved. This is the {where} image of the series.")
            return
        self.pending = job
        self.go_to(nxt)
        if job is not None:
            QTimer.singleShot(0, self.flush_saves)

    def next(self) -> None:
        """Save this image and show the next one."""
        self._move(+1)

    def previous(self) -> None:
        """Save this image and show the one before."""
        self._move(-1)

    def mark_reviewed(self) -> None:
        """Save this image as reviewed by a person (every pixel a human label) and move on."""
        self._move(+1, reviewed=True)

    def close_series(self, *, keep_unsaved: bool = False) -> bool:
        """Save an edited image, stop the background work, unbind the keys, remove the layers
        (the viewer's other layers are shown again) and say what was saved. With
        ``keep_unsaved`` (the Close button, Open) a save that fails keeps the series open, with
        the person's labels on screen and the reason in the status line: returns False."""
        session = self.session
        saved = self.flush_saves()
        if self.session is not None and self.index is not None and self.view.current is not None:
            if self.view.changed():
                saved = self.save_current() and saved
        if not saved and keep_unsaved:
            return False
        if self.running and self._job in ("score", "retrain"):
            self.runner.request_cancel()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self._unbind_keys()
        self.view.clear()
        self.session = self.predictor = self.prefetcher = None
        self.index = self.waiting = None
        self.progress.setText("No series open.")
        if session is not None and saved:  # a failed save's reason stays in the status line
            self.status.setText(f"Closed: {session.saved_count()} of {len(session)} images saved "
                                f"in {session.dataset_dir}.")
        self.image_list.clear()
        self._update_buttons()
        self.refresh_model_info()
        return True

    def _watch_window(self) -> None:
        """Close the series when napari's window closes (Qt sends child widgets no close event):
        an edited image is saved and the background thread stops."""
        window = self.window()
        if window is not self and not self._watching:
            window.installEventFilter(self)  # no Python reference kept: no cycle
            self._watching = True

    def eventFilter(self, watched: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Close and watched is self.window() and watched is not self:
            self.runner.request_cancel()
            self.close_series()
        return False

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.runner.request_cancel()
        self.close_series()
        super().closeEvent(event)

    # ---- keys -----------------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        actions = {"next": self.next, "previous": self.previous,
                   "mark_reviewed": self.mark_reviewed}
        for key, action in SHORTCUTS.items():
            self.viewer.bind_key(key, _key_handler(actions[action]), overwrite=True)
            self._bound.append(key)

    def _dock_shortcuts(self) -> list[QShortcut]:
        """The same keys while the focus is on this page (a button just clicked, the list):
        napari's key bindings reach the canvas only. A text field keeps its own Shift+arrows."""
        actions = {"next": self.next, "previous": self.previous,
                   "mark_reviewed": self.mark_reviewed}
        shortcuts = []
        for key, action in SHORTCUTS.items():
            qt_key = key.replace("Control-", "Ctrl+").replace("-", "+")
            for sequence in {qt_key.replace("Enter", "Return"), qt_key}:
                shortcut = QShortcut(QKeySequence(sequence), self)
                shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
                shortcut.activated.connect(actions[action])
                shortcuts.append(shortcut)
        return shortcuts

    def _unbind_keys(self) -> None:
        for key in self._bound:
            try:
                self.viewer.bind_key(key, None)
            except (KeyError, ValueError):
                pass
        self._bound = []

    # ---- lines and buttons ----------------------------------------------------------------------
    def progress_line(self) -> str:
        if self.session is None:
            return "No series open."
        shown = self.view.current  # the model that labelled the image on screen
        label = shown.model_label if shown is not None and shown.model_label else None
        return self.session.status().line(label or self.predictor.label)

    def _update_progress(self) -> None:
        self.progress.setText(self.progress_line())
        self._update_list()

    def _update_list(self) -> None:
        """One line per image, in visiting order, marked saved / edited / reviewed / unreadable;
        the image on screen selected."""
        session, listing = self.session, self.image_list
        if session is None:
            listing.clear()
            return
        order = session.order
        if listing.count() != len(order):
            listing.clear()
            for _ in order:
                listing.addItem(QListWidgetItem())
        for row_index, i in enumerate(order):
            item = listing.item(row_index)
            if i in session.unreadable:
                mark = "\u2717"
            elif session.is_reviewed(i):
                mark = "\u2605"
            elif session.is_saved(i):
                sample = session.saved_sample(i)
                edited = ((sample.info.get("pixels") or {}).get("edited") or 0) if sample else 0
                mark = "\u270e" if edited else "\u2713"
            else:
                mark = "\u25cb"
            item.setText(f"{mark} {session.names[i]}")
            item.setToolTip(str(session.images[i]))
            item.setData(Qt.ItemDataRole.UserRole, i)
            if i == self.index:
                listing.setCurrentRow(row_index)

    def _update_buttons(self) -> None:
        on_image = self.session is not None and self.index is not None
        navigation = (self.previous_button, self.next_button, self.reviewed_button)
        clicked = any(button.hasFocus() for button in navigation)
        for button in navigation:
            button.setEnabled(on_image)
        if clicked and not on_image:
            self.setFocus()  # a disabled button hands the focus on, maybe out of the dock
        for shortcut in self._shortcuts:
            shortcut.setEnabled(on_image)
        self.close_button.setEnabled(self.session is not None)

    # ---- file choosers --------------------------------------------------------------------------
    def _pick_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Image folder", self.source.text())
        if path:
            self.source.setText(path)

    def _pick_list(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "List of images", self.source.text(),
                                              "Text files (*.txt *.lst *.csv);;All files (*)")
        if path:
            self.source.setText(path)

    def _pick_dataset(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder", self.dataset.text())
        if path:
            self.dataset.setText(path)

    def set_folders(self, source: str, dataset: str, *, recursive: bool = False,
                    remap: bool = False, add_classes: bool = False) -> None:
        """Fill the fields (the ``annotate`` command, scripts)."""
        self.source.setText(str(Path(source)))
        self.dataset.setText(str(Path(dataset)))
        self.recursive.setChecked(recursive)
        self.remap.setChecked(remap)
        self.add_classes.setChecked(remap and add_classes)


def _labelled_by(sample: Any) -> Optional[str]:
    """Which model labelled a saved sample (its provenance), if recorded."""
    provenance = getattr(sample, "provenance", None) or {}
    value = provenance.get("labelled_by")
    return value if isinstance(value, str) and value else None


def _key_handler(action: Callable[[], None]) -> Callable[[Any], None]:
    def handler(viewer: Any) -> None:  # napari passes the viewer
        action()

    return handler
