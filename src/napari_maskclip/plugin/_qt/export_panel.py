"""The Export panel: a Labels layer (with its image, confidence maps and edited pixels) -> dataset.

The Export page of the MaskCLIP dock, shown by the MaskCLIP widget's **Export to dataset...**
button or napari's Plugins menu. It gathers the choices (dataset folder, sample name, which slices, the
confidence threshold, overwrite, remap), plans the export on the main thread
(:func:`..export_plan.plan_layer_export`: metadata only, no pixels) and runs
:meth:`~..export_plan.ExportPlan.export_iter` through the job runner (:mod:`.job_runner`).
A refused export (other classes, an existing sample, no folder...) is a notification with the
exporter's message; nothing is written then. With "also write COCO instances", a finished export
is followed, in the same job, by the core COCO export of the whole dataset into
``<dataset>/instances.json`` (:func:`...export.coco.export_coco_iter`; it replaces only a file it
wrote).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...errors import InvalidInputError, MaskClipError
from ...export.coco import _check_target, export_coco_iter
from ...export.coco_masks import require_pycocotools
from ...progress import Progress
from ..export_plan import SLICES_LABELLED, ExportPlan, plan_layer_export
from ..jobs import JobOutcome, guarded_job
from ..notify import notify, show_exception
from ..preferences import WidgetPreferences, update_preferences
from ..records import LABELS, role_of
from .controls import (
    WrapLabel, class_remap_boxes, fit_combo, page_layout, row, set_items, small_button,
)
from .job_runner import BarState, JobRunner, RunnerPanel

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["ExportWidget"]

SLICE_CURRENT = "current slice"
SLICE_LABELLED = "all labelled slices"
#: The COCO file the panel writes into the dataset folder.
COCO_FILE = "instances.json"


class ExportWidget(QWidget, RunnerPanel):
    """Dock widget: export a Labels layer as samples of a training dataset."""

    #: Emitted when an export ends: "done", "cancelled" or "error".
    export_finished = Signal(str)

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.main: Any = None
        self.last_report: Any = None
        #: The COCO export's report of the last export (None when it wrote no COCO file).
        self.last_coco_report: Any = None
        self.last_plan: Optional[ExportPlan] = None
        self._folder: Optional[Path] = None
        self._layers: list[Any] = []
        prefs = WidgetPreferences.load()

        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip(
            "The Labels layer to export (MaskCLIP's, or any with class names)."
        )
        self.instances_button = QPushButton("Instances")
        self.instances_button.setToolTip(
            "Show this layer's instances (connected components of each class) as a "
            "new Labels layer '<name> [instances]' (a stack: the slice the viewer shows)."
        )
        self.folder = QLineEdit(prefs.last_dataset or "")
        self.folder.setPlaceholderText("dataset folder (new, empty, or an existing dataset)")
        self.folder.setToolTip(
            "A new or empty folder starts a dataset; an existing dataset is appended to (same "
            "classes, or tick 'remap')."
        )
        self.folder_button = small_button("...", "Choose the dataset folder.")
        self.name = QLineEdit()
        self.name.setToolTip(
            "The sample's name (default: the image layer's). Stacks give one sample per slice: "
            "<name>_z0003."
        )
        self.slices = QComboBox()
        self.slices.addItems([SLICE_CURRENT, SLICE_LABELLED])
        self.slices.setCurrentText(SLICE_LABELLED)
        self.slices.setToolTip(
            "Stacks: the slice the viewer shows, or every slice MaskCLIP wrote or you painted "
            "(one sample each)."
        )
        self.use_threshold = QCheckBox("ignore unsure pseudo-labels below")
        self.use_threshold.setToolTip(
            "Pixels you did not edit whose label has a confidence below this are exported as "
            "255 (ignored in training). Edited pixels are always kept."
        )
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.threshold.setEnabled(False)
        self.save_confidence = QCheckBox("save confidence maps")
        self.save_confidence.setChecked(True)
        self.overwrite = QCheckBox("overwrite a sample of the same name")
        self.overwrite.setToolTip("Without it, an existing sample is never replaced.")
        self.remap, self.add_classes = class_remap_boxes()
        self.write_coco = QCheckBox(f"also write COCO instances ({COCO_FILE})")
        self.write_coco.setToolTip(
            f"After the export, write the whole dataset as COCO instance segmentation into "
            f"<dataset>/{COCO_FILE} (one annotation per connected component of each class). "
            "Needs pycocotools."
        )
        self.info = WrapLabel()
        self.export_button = QPushButton("Export")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip(
            "Stop after the current slice; the slices already written stay."
        )
        self.status = WrapLabel("Ready.")
        fit_combo(self.layer_combo)
        fit_combo(self.slices)

        form = QFormLayout()
        form.addRow("labels", row(self.layer_combo, self.instances_button))
        form.addRow("dataset", row(self.folder, self.folder_button))
        form.addRow("sample name", self.name)
        form.addRow("slices", self.slices)
        form.addRow(row(self.use_threshold, self.threshold))
        form.addRow(self.save_confidence)
        form.addRow(self.overwrite)
        form.addRow(self.remap)
        form.addRow(self.add_classes)
        form.addRow(self.write_coco)
        form.addRow(self.info)
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.cancel_button)
        column = QVBoxLayout()
        column.addLayout(form)
        footer = QVBoxLayout()
        footer.addLayout(buttons)
        footer.addWidget(self.status)
        page_layout(self, column, footer)

        self.runner = JobRunner(
            self, title="MaskCLIP export", start_button=self.export_button,
            cancel_button=self.cancel_button, show=self._show_progress, finish=self._finish,
            on_error=self.status.setText,
        )
        footer.insertWidget(1, self.runner.bar)  # below the buttons, while a job runs
        self.runner.ended.connect(self.export_finished.emit)
        self.folder_button.clicked.connect(self._choose_folder)
        self.instances_button.clicked.connect(self.show_instances)
        self.use_threshold.toggled.connect(self.threshold.setEnabled)
        self.layer_combo.currentIndexChanged.connect(self._on_layer_changed)
        self.export_button.clicked.connect(self.export)
        self.cancel_button.clicked.connect(self.cancel)
        self._replan = QTimer(self)  # the summary, again, after a re-run (see _on_metadata)
        self._replan.setSingleShot(True)
        self._replan.timeout.connect(self._show_plan)
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ---- layers --------------------------------------------------------------------------------
    def attach(self, main: Any) -> None:
        """Link to the MaskCLIP widget: preselect its latest Labels layer."""
        self.main = main
        report = getattr(main, "last_report", None)
        layer = getattr(report, "labels_layer", None)
        if layer is not None:
            self.select(layer)

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Labels

        for layer in self.viewer.layers:  # follow renames, and re-runs (a new record)
            layer.events.name.disconnect(self._refresh_layers)  # no-op when not connected
            layer.events.name.connect(self._refresh_layers)
            layer.events.metadata.disconnect(self._on_metadata)
            layer.events.metadata.connect(self._on_metadata)
        current = self.current_layer()
        self._layers = [layer for layer in self.viewer.layers if isinstance(layer, Labels)]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        set_items(self.layer_combo, [layer.name for layer in self._layers])
        if current in self._layers:
            self.layer_combo.setCurrentIndex(self._layers.index(current))
        elif self._layers:
            plugin = [layer for layer in self._layers if role_of(layer) == LABELS]
            self.layer_combo.setCurrentIndex(self._layers.index((plugin or self._layers)[-1]))
        self.layer_combo.blockSignals(False)
        if self.current_layer() is not current:
            self._on_layer_changed()
        else:  # the same layer, but its run's other layers (confidence, image) may have changed
            self._replan.start(0)

    def _on_metadata(self, event: Any = None) -> None:
        """A re-run in place gives the Labels layer and its confidence layer new records: say
        what exporting it writes now, once the run's layers are all updated (next turn of the
        event loop; the several changes of one run give one new summary)."""
        self._replan.start(0)

    def current_layer(self) -> Any:
        i = self.layer_combo.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def select(self, layer: Any) -> None:
        if layer in self._layers:
            self.layer_combo.setCurrentIndex(self._layers.index(layer))

    def _plan(self, layer: Any) -> ExportPlan:
        data = layer.data[0] if layer.multiscale else layer.data
        return plan_layer_export(
            layer_name=layer.name, metadata=layer.metadata, features=layer.features, data=data,
            layers=list(self.viewer.layers),
        )

    def _on_layer_changed(self) -> None:
        plan = self._show_plan()
        if plan is not None:
            self.name.setText(plan.name)

    def _show_plan(self) -> Optional[ExportPlan]:
        """Say what exporting the chosen layer writes now (classes, slices, notes); returns the
        plan (None when it cannot be exported). The sample name is left as the user set it."""
        layer = self.current_layer()
        if layer is None:
            self.info.setText("No Labels layer: run MaskCLIP first (or open labels).")
            self.slices.setEnabled(False)
            return None
        try:
            plan = self._plan(layer)
        except MaskClipError as exc:
            self.info.setText(str(exc))
            self.slices.setEnabled(False)
            return None
        self.slices.setEnabled(plan.is_stack)
        parts = [f"classes: {', '.join(plan.display_names)}"]
        if plan.is_stack and plan.predicted is not None:
            parts.append(f"MaskCLIP wrote {len(plan.written_leads)} slice(s)")
        parts += plan.notes
        self.info.setText("; ".join(parts) + ".")
        return plan

    def show_instances(self) -> Any:
        """Add the chosen layer's instance layer (current slice of a stack); returns it."""
        from ..instances_command import add_instances_layer

        try:
            return add_instances_layer(self.viewer, self.current_layer(), current_slice=True)
        except MaskClipError as exc:
            self.status.setText(show_exception(exc))
            return None

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder", self.folder.text())
        if path:
            self.folder.setText(path)

    # ---- exporting -----------------------------------------------------------------------------
    def export(self) -> Any:
        """Start the export; returns the napari worker, or None (with a notification) if refused."""
        if self.running:
            notify("An export is in progress: wait for it or press Cancel.")
            return None
        try:
            layer = self.current_layer()
            if layer is None:
                raise InvalidInputError(
                    "No Labels layer to export: run MaskCLIP on an image first."
                )
            folder = self.folder.text().strip()
            if not folder:
                raise InvalidInputError(
                    "Choose a dataset folder to export into (the '...' button)."
                )
            plan = self._plan(layer)
            selection: Any = SLICES_LABELLED
            if plan.is_stack and self.slices.currentText() == SLICE_CURRENT:
                selection = plan.current_lead(layer.world_to_data(self.viewer.dims.point))
            threshold = self.use_threshold.isChecked()
            options = {
                "name": self.name.text().strip() or None,
                "selection": selection,
                "min_confidence": float(self.threshold.value()) if threshold else None,
                "save_confidence": self.save_confidence.isChecked(),
                "overwrite": self.overwrite.isChecked(),
                "remap": self.remap.isChecked(),
                "add_classes": self.remap.isChecked() and self.add_classes.isChecked(),
            }
            coco = None
            if self.write_coco.isChecked():  # refused now rather than after the export
                require_pycocotools()
                coco = Path(folder).expanduser() / COCO_FILE
                _check_target(coco, overwrite=True)
        except MaskClipError as exc:
            self.status.setText(show_exception(exc))
            self.export_finished.emit("error")
            return None
        return self._start(plan, Path(folder).expanduser(), options, coco)

    def _start(
        self, plan: ExportPlan, folder: Path, options: dict[str, Any], coco: Optional[Path] = None
    ) -> Any:
        self.last_plan = plan
        self._folder = folder
        self.status.setText(f"Exporting to {folder}...")

        def job():
            report = yield from plan.export_iter(folder, **options)
            coco_report = None
            if coco is not None:  # only after an export that went through
                coco_report = yield from export_coco_iter(folder, coco, overwrite=True)
            return report, coco_report

        return self.runner.start(lambda control: guarded_job(job, control))

    def cancel(self) -> None:
        if self.runner.request_cancel():
            self.status.setText("Stopping after the current slice...")

    def _show_progress(self, step: Progress) -> Optional[BarState]:
        if step.stage not in ("export", "export-coco") or step.total <= 0:
            return None
        what = "Exporting" if step.stage == "export" else "Writing COCO"
        self.status.setText(f"{what} {step.done}/{step.total}: {step.message}")
        return BarState(done=step.done, total=step.total)

    def _finish(self, outcome: JobOutcome) -> str:
        if outcome.cancelled:
            self.status.setText(
                "Export stopped: the samples written so far are complete and listed in the "
                "dataset; the rest were not exported."
            )
            return "cancelled"
        if outcome.error is not None:
            self.status.setText(show_exception(outcome.error))
            return "error"
        report, coco_report = outcome.result
        self.last_report, self.last_coco_report = report, coco_report
        notes = self.last_plan.notes if self.last_plan is not None else []
        text = f"Exported {report.summary()}."
        if coco_report is not None:
            text += f" COCO: {coco_report.summary()}."
        if notes:
            text += " Note: " + "; ".join(notes) + "."
        self.status.setText(text)
        folder = str(self._folder)
        update_preferences(lambda prefs: setattr(prefs, "last_dataset", folder))
        return "done"

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.cancel()
        super().closeEvent(event)
