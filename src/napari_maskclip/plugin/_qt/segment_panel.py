"""The MaskCLIP dock widget: type class names, get editable labels and per-class confidence maps.

A thin layer over the engine. It gathers the choices of its sections (:mod:`.sections`), runs
:func:`..jobs.segmentation_job` through the panels' job runner (:mod:`.job_runner`: a napari
worker and progress bar), and turns the result into layers with :func:`..layers.apply_result`,
which never overwrites labels the user edited. Models stay loaded in a
:class:`..models.SegmenterPool`, so asking the same image for other class names reuses the cached
image features and text embeddings: the status line says whether the image encoder ran.

A trained MaskCLIP+ student can be the model (``student...``): the run goes through the same
job and gives the same layers. The widget is the plugin's one dock: its pages (tabs) are Segment
(this), Export (:mod:`.export_panel`), Train (:mod:`.train_panel`) and Series
(:mod:`.series_panel`, a folder one image at a time); **Export to dataset...**
and **Train a student...** switch to them, and so do napari's menu entries (:mod:`.docks`).

Errors the user can fix (no weights offline, empty class list, unsupported image...) become a
napari notification with the engine's message; anything else is a bug and is shown with its
traceback (:mod:`..notify`). Importing this module imports no torch; once the dock shows, torch and
open_clip are imported in a background thread (:func:`..models.preload_engine`), so the first run
does not wait for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QDockWidget,
    QHBoxLayout,
    QPushButton,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ...classes import parse_classes
from ...engine.names import DEMO_MODEL
from ...errors import InvalidInputError, MaskClipError
from ...progress import Progress
from ..jobs import JobOutcome, segmentation_job
from ..layers import EDIT_POLICY, Geometry, apply_result
from ..models import ModelChoice, SegmenterPool
from ..control_messages import in_widget_terms
from ..notify import notify, show_exception
from ..preferences import WidgetPreferences, update_preferences
from ..records import RunRecord, SampleSuggestion, SourceLayout
from ..stack_run import StackRequest
from .class_view import ClassView
from .controls import WrapLabel, page_layout
from .docks import PAGE_EXPORT, PAGE_TRAIN, PAGES
from .job_runner import BarState, JobRunner, RunnerPanel
from .sections import (
    ClassesSection,
    ImageSection,
    ModelSection,
    SettingsSection,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["MaskClipWidget"]

_BAR_STEPS = 1000


@dataclass
class _Run:
    """Everything a run needs, read from the controls on the main thread before it starts."""

    layer: Any
    choice: ModelChoice
    request: StackRequest  # with the MaskCLIP settings, built and checked (None for a student)
    geometry: Geometry
    what: str  # "the image", "slice 3", "12 slices"
    classes: str
    background: str
    #: Entries the Labels layer's record adds to the engine's settings record (preset changes,
    #: the Labels layer used as regions).
    record_extra: dict[str, Any]


class MaskClipWidget(QWidget, RunnerPanel):
    """Dock widget: image + class names -> Labels layer and confidence maps."""

    #: Emitted when a run ends: "done", "cancelled" or "error" (for scripts, tests, next panels).
    run_finished = Signal(str)

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.pool = SegmenterPool()
        self.prefs = WidgetPreferences.load()
        self.last_outcome: Optional[JobOutcome] = None
        self.last_report: Any = None
        self._pending: Optional[_Run] = None
        self._fitted = False  # the camera is reset once the dock first shows
        self._model_picked = False  # the user chose a model in this session (samples keep it)
        self._presetting = False

        self.image = ImageSection()
        self.classes = ClassesSection(self.prefs)
        self.model = ModelSection(self.prefs)
        self.settings = SettingsSection()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip(
            "Segment the image into the class names. Re-running with other names reuses the "
            "encoded image (instant).\n" + EDIT_POLICY
        )
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current window; nothing is changed.")
        self.cancel_button.setEnabled(False)
        self.status = WrapLabel("Ready.")
        self.class_view = ClassView(self.viewer)
        self.export_button = QPushButton("Export to dataset...")
        self.export_button.setToolTip(
            "Save the labels (with the image, confidence maps and which pixels you edited) as "
            "training data: opens the Export panel."
        )
        self.train_button = QPushButton("Train a student...")
        self.train_button.setToolTip(
            "Train a MaskCLIP+ student on exported datasets: opens the Train panel."
        )

        column = QVBoxLayout()
        for section in (self.image, self.classes, self.model, self.settings):
            column.addWidget(section)
        footer = QVBoxLayout()
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        footer.addLayout(buttons)
        footer.addWidget(self.status)
        footer.addWidget(self.class_view)
        more = QHBoxLayout()
        more.addWidget(self.export_button)
        more.addWidget(self.train_button)
        footer.addLayout(more)
        segment = QWidget()
        page_layout(segment, column, footer)

        from .export_panel import ExportWidget
        from .train_panel import TrainWidget

        from .series_panel import SeriesPanel

        self.export_page = ExportWidget(self.viewer)
        self.train_page = TrainWidget(self.viewer)
        self.series_page = SeriesPanel(self.viewer)
        self.pages = QTabWidget()
        self.pages.setDocumentMode(True)
        for page, title in zip((segment, self.export_page, self.train_page, self.series_page),
                               PAGES):
            self.pages.addTab(page, title)
        self.pages.setTabToolTip(0, "Class names -> labels and confidence maps.")
        self.pages.setTabToolTip(1, "Save labels as training data (image, mask, confidence).")
        self.pages.setTabToolTip(2, "Train a MaskCLIP+ student on exported datasets.")
        self.pages.setTabToolTip(3, "Annotate a folder, one image at a time, into a dataset.")
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.pages)
        # Fill the dock's height (napari adds a stretch below widgets that do not).
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        self.export_page.attach(self)
        self.train_page.attach(self)
        self.series_page.attach(self)
        self.pages.currentChanged.connect(self._on_page_changed)

        self.runner = JobRunner(
            self, title="MaskCLIP", start_button=self.run_button,
            cancel_button=self.cancel_button, show=self._show_progress, finish=self._finish,
            on_error=self._set_status,
        )
        footer.insertWidget(1, self.runner.bar)  # below the buttons, while a job runs
        self.runner.ended.connect(self.run_finished.emit)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_button.clicked.connect(self.open_export)
        self.train_button.clicked.connect(self.open_train)
        self.image.layer_changed.connect(self._on_layer_changed)
        self.image.layer_changed.connect(self._check_region_layer)
        self.settings.regions_changed.connect(self._check_region_layer)
        self.model.model.currentTextChanged.connect(self._on_model_changed)
        self.model.student_changed.connect(self._on_student_changed)
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ---- layers --------------------------------------------------------------------------
    def _refresh_layers(self, event: Any = None) -> None:
        inserted = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        sample = SampleSuggestion.from_metadata(getattr(inserted, "metadata", None)) is not None
        if sample:
            QTimer.singleShot(0, self.fit_view)  # a sample (or the demo scene) opened: show it all
        for layer in self.viewer.layers:
            name_event = layer.events.name
            name_event.disconnect(self._refresh_layers)  # no-op when not connected
            name_event.connect(self._refresh_layers)
        self.image.refresh(self.viewer.layers)
        if sample:  # File > Open Sample: segment it, with its names (see _on_layer_changed)
            self.image.select(inserted)
        self.settings.set_region_layers(self.viewer.layers)

    def _region_problem(self) -> Optional[str]:
        """Why the Labels layer chosen as regions cannot serve the current image, or None."""
        from ..stack_run import check_region_data

        layer = self.settings.region_layer()
        if layer is None or self.image.current_layer() is None:
            return None
        try:
            check_region_data(self.image.layer_data(layer), self.image.layout(),
                              f"The Labels layer '{layer.name}'")
        except MaskClipError as exc:
            return str(exc)
        return None

    def _check_region_layer(self) -> None:
        """Say at once (status line) when the chosen regions layer does not fit the image."""
        problem = self._region_problem()
        if problem is not None:
            self._set_status(problem)

    def _on_layer_changed(self) -> None:
        """A sample image chosen (File > Open Sample makes it the image): its class names fill
        the class box unless the user typed some (:meth:`.ClassesSection.suggest`), and when
        they do, the model it asks for is chosen with its preset (the Shapes scene: demo), unless
        the user picked a model in this session (the remembered one is replaced)."""
        layer = self.image.current_layer()
        if layer is None:
            return
        used = self.classes.suggest(layer)
        suggestion = SampleSuggestion.from_metadata(getattr(layer, "metadata", None))
        if used and suggestion is not None and suggestion.model and not self._model_picked:
            self.use_model(suggestion.model)  # e.g. the demo scene asks for the demo model

    def use_model(self, model: str) -> None:
        """Choose ``model`` with its preset (the demo model: one template, windows of its
        training size), whatever was chosen or remembered before: a preset applies whenever a
        sample or the demo asks for it, not only when the model's name changes."""
        self._presetting = True
        try:
            self.model.model.setCurrentText(model)
        finally:
            self._presetting = False
        self._apply_preset(model)

    def _on_model_changed(self, text: str) -> None:
        if not self._presetting:
            self._model_picked = True
        self._apply_preset(text.strip())  # the user picked another model

    def _apply_preset(self, model: str) -> None:
        if model == DEMO_MODEL:
            from ...demo import recommended_settings

            self.settings.apply_preset(**recommended_settings())

    def _on_student_changed(self, meta: Optional[dict[str, Any]]) -> None:
        if meta is None:
            self.classes.show_student(None)
        else:
            names = [c["name"] for c in meta.get("classes", [])]
            self.classes.show_student(names, ", ".join(meta.get("background") or []))
        self.settings.set_student_mode(meta is not None)

    # ---- students and the other panels ---------------------------------------------------------
    def use_student(self, checkpoint: str) -> bool:
        """Make the trained student ``checkpoint`` the model; False (with a notification) if the
        file is not a readable student checkpoint."""
        try:
            self.model.use_student(str(checkpoint))
        except Exception as exc:  # noqa: BLE001 - shown to the user, never raised out
            self._show_error(exc)
            return False
        self._set_status(f"Model: {self.model.choice().describe()}. Press Run to use it.")
        return True

    def show_page(self, page: str) -> Any:
        """Switch to the page ``page`` (one of :data:`.docks.PAGES`), show and raise this dock;
        returns the page's panel (this widget for Segment)."""
        index = PAGES.index(page)
        self.pages.setCurrentIndex(index)
        dock = self.parentWidget()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
        if dock is not None:
            dock.show()
            dock.raise_()
        return (self, self.export_page, self.train_page, self.series_page)[index]

    def current_page(self) -> str:
        return PAGES[self.pages.currentIndex()]

    def _on_page_changed(self, index: int) -> None:
        """A page reached by its tab is set up as its button sets it up: the Train page lists
        the dataset exported last (when it lists none), Series says what Open will use."""
        if index == PAGES.index(PAGE_TRAIN):
            self.train_page.attach(self)
        self.series_page.refresh_model_info()

    def open_export(self) -> Any:
        """Show the Export page, set to this widget's latest Labels layer."""
        self.export_page.attach(self)
        return self.show_page(PAGE_EXPORT)

    def open_train(self) -> Any:
        """Show the Train page; it offers its student back to this widget."""
        self.train_page.attach(self)
        return self.show_page(PAGE_TRAIN)

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        """The first time the dock shows, fit the image to the canvas the dock just narrowed
        (napari fitted it to the wider canvas before: the scene was cut at both sides)."""
        super().showEvent(event)
        if not self._fitted:
            self._fitted = True
            QTimer.singleShot(0, self.fit_view)
            from ..models import preload_engine

            preload_engine()  # torch and open_clip load while the user types the class names

    def fit_view(self) -> None:
        """Reset napari's camera so every layer is in view (public ``Viewer.reset_view``)."""
        if len(self.viewer.layers):
            self.viewer.reset_view()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.cancel()  # a closed widget must not receive the result of a run
        self.export_page.cancel()
        self.train_page.cancel()  # the core saves the last completed iteration
        self.series_page.runner.request_cancel()
        self.series_page.close_series()  # saves an edited image, stops the prefetcher
        self.class_view.detach()
        super().closeEvent(event)

    # ---- running -------------------------------------------------------------------------
    def run(self) -> Any:
        """Start a run; returns the napari worker, or None (with a notification) if refused."""
        if self.running:
            self._notify("A run is in progress: wait for it or press Cancel.", error=False)
            return None
        try:
            job = self._prepare()
        except MaskClipError as exc:
            self._show_error(exc)
            self.run_finished.emit("error")
            return None
        return self._start(job)

    def _prepare(self) -> _Run:
        """Read every choice on the main thread; raise MaskClipError on anything unusable."""
        layer = self.image.current_layer()
        layout = self.image.layout()
        classes = self.classes.classes_text()
        background = self.classes.background_text()
        choice = self.model.choice()
        settings = None
        if choice.is_student:  # its own classes (empty = all) and background; no MaskCLIP settings
            if classes:
                parse_classes(classes)
            background = ""
        else:
            fg = parse_classes(classes)  # instant message on an empty or duplicated list
            if background:
                parse_classes(fg + parse_classes(background, allow_empty=True))
            settings = self.settings.segment_settings()  # checked now, not in the worker
            if choice.model == DEMO_MODEL and settings.window_batch == 1:
                from ...demo import WINDOW_BATCH

                settings = settings.replace(window_batch=WINDOW_BATCH)  # its tiny windows
        region_layer = None if choice.is_student else self.settings.region_layer()
        record_extra: dict[str, Any] = {} if choice.is_student else self.settings.provenance()
        if region_layer is not None:
            problem = self._region_problem()
            if problem is not None:
                raise InvalidInputError(problem)
            record_extra["regions_layer"] = {
                "name": region_layer.name,
                "layer_id": str(region_layer.unique_id),
                "shape": [int(n) for n in self.image.layer_data(region_layer).shape],
                "replayable": False,
                "note": "regions from a napari Labels layer: not stored with these settings, so "
                        "they cannot be replayed; a student's teacher reads random crops "
                        "without region voting",
            }
        if self.image.all_slices() or not layout.loop_axes:
            slices = layout.all_slices()
        else:
            slices = [layout.slice_at(layer.world_to_data(self.viewer.dims.point))]
        scale, translate = layout.output_scale_translate(layer.scale, layer.translate)
        geometry = Geometry(
            scale=tuple(scale),
            translate=tuple(translate),
            axis_labels=tuple(layout.output_values(layer.axis_labels)),
            units=tuple(layout.output_values(layer.units)),
        )
        request = StackRequest(
            data=self.image.layer_data(layer),
            layout=layout,
            slices=slices,
            classes=classes,
            background=background,
            channels=self.image.channel_indices(),
            settings=settings,
            keep_confidence=self.settings.keep_confidence(),
            regions=None if region_layer is None else self.image.layer_data(region_layer),
        )
        what = layout.describe_slice(slices[0]) if len(slices) == 1 else f"{len(slices)} slices"
        return _Run(
            layer=layer,
            choice=choice,
            request=request,
            geometry=geometry,
            what=what,
            classes=classes,
            background=background,
            record_extra=record_extra,
        )

    def _start(self, job: _Run) -> Any:
        self._pending = job
        self._set_status(f"Segmenting {job.what} of '{job.layer.name}'...")
        return self.runner.start(
            lambda control: segmentation_job(self.pool, job.choice, job.request, control)
        )

    def cancel(self) -> None:
        """Stop the run after the current window; no layer is added or changed."""
        if self.runner.request_cancel():
            self._set_status("Cancelling...")

    # ---- the run's progress and outcome (main thread, see JobRunner) ----------------------------
    def _show_progress(self, step: Progress) -> Optional[BarState]:
        if step.message:
            self._set_status(step.message)
        fraction = step.info.get("fraction") if step.stage != "load" else None
        return BarState(
            done=None if fraction is None else int(round(float(fraction) * _BAR_STEPS)),
            total=None if fraction is None else _BAR_STEPS,
            description=f"MaskCLIP: {step.message}" if step.message else None,
        )

    def _finish(self, outcome: JobOutcome) -> str:
        self.last_outcome = outcome
        job = self._pending
        if outcome.cancelled:
            self._set_status("Cancelled: no layer was added or changed.")
            return "cancelled"
        if outcome.error is not None:
            self._show_error(outcome.error)
            return "error"
        result = outcome.result
        layer = job.layer
        report = apply_result(
            self.viewer,
            result,
            source_id=str(layer.unique_id),
            source_name=layer.name,
            geometry=job.geometry,
            run=self._run_record(job, result),
        )
        self.last_report = report
        self.class_view.attach(report.labels_layer)
        self._set_status(self._summary(outcome, job, report))
        model_text, weights = self.model.model.currentText(), self.model.pretrained.currentText()

        def remember(prefs: WidgetPreferences) -> None:
            if job.choice.is_student:
                prefs.remember_student(job.choice.model)
            else:
                prefs.remember_run(job.classes, job.background, model_text, weights)

        self.prefs = update_preferences(remember)
        self.classes.set_recent(self.prefs)
        return "done"

    def _run_record(self, job: _Run, result: Any) -> RunRecord:
        """What the Labels layer keeps about the run, for exports (provenance, image layout)."""
        layout = job.request.layout
        record = RunRecord(
            class_names=list(result.class_names),
            class_texts=list(result.class_texts),
            background=result.background,
            settings={**result.settings, **job.record_extra} if result.settings else result.settings,
            source_layout=SourceLayout(layout.data_shape, layout.rgb, layout.channel_axis,
                                       job.request.channels or None),
        )
        if job.choice.is_student:
            # A dataset labelled by a student names the student's teacher as its model, so a
            # student trained on it gets the same teacher by default.
            teacher = (self.model.student_meta() or {}).get("teacher") or {}
            return record.replace(labelled_by="student", student_checkpoint=job.choice.model,
                                  model=teacher.get("model"), pretrained=teacher.get("pretrained"))
        # The model as chosen (a config JSON's path, not just its name), so it can be loaded
        # again as the teacher of a student trained on the export.
        return record.replace(model=job.choice.model, pretrained=job.choice.pretrained)

    # ---- messages ------------------------------------------------------------------------
    @staticmethod
    def _summary(outcome: JobOutcome, job: _Run, report: Any) -> str:
        result = outcome.result
        if outcome.student:
            return (f"Done in {outcome.seconds:.2f} s ({job.what}, {outcome.model}): predicted by "
                    f"the student. {_capitalised(report.describe())}.")
        n = len(result.slices)
        if result.encoded_slices == 0:
            encoder = "re-query: cached image features (no image-encoder pass)"
        elif n > 1:
            encoder = f"image encoder ran on {result.encoded_slices} of {n} slices"
        else:
            encoder = "image encoded"
        text = "cached class embeddings" if outcome.text_calls == 0 else "class names encoded"
        parts = [
            f"Done in {outcome.seconds:.2f} s ({job.what}, {outcome.model}): {encoder}; {text}.",
            _capitalised(report.describe()) + ".",
        ]
        if result.removed_classes:
            parts.append(
                "Not found (prompt denoising): " + ", ".join(result.removed_classes) + "."
            )
        return " ".join(parts)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    def _show_error(self, exc: BaseException) -> None:
        self._set_status(show_exception(in_widget_terms(exc)))  # this page's boxes, not CLI flags

    @staticmethod
    def _notify(message: str, *, error: bool) -> None:
        notify(message, error=error)


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]
