"""The Train panel: train (or resume) a MaskCLIP+ student on exported datasets, in the background.

The Train page of the MaskCLIP dock, shown by the MaskCLIP widget's **Train a student...** button
or napari's Plugins menu. It gathers the choices into a :class:`..train_job.TrainRequest`, runs
:func:`..train_job.training_iter` (the core's ``train_iter``) through the job runner
(:mod:`.job_runner`: a napari worker and progress bar), and shows a live line (iteration, loss,
stage, learning rate, validation mIoU, speed) and a small text plot of the loss. **Cancel** stops after the current iteration and the
checkpoint keeps the last completed one (the core saves it), so ticking **resume** continues
exactly. When training ends, **Use this student** makes it the model of the MaskCLIP widget.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtCore import Signal
from qtpy.QtGui import QFontDatabase
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...errors import MaskClipError
from ...progress import Progress
from ...student.settings import BACKBONE_WEIGHTS, BACKBONES, TrainSettings
from ..jobs import JobOutcome, guarded_job
from ..control_messages import in_widget_terms
from ..notify import notify, show_exception
from ..preferences import WidgetPreferences, update_preferences
from ..train_job import TrainRequest, training_iter
from .controls import (
    WrapLabel,
    ask_clip_checkpoint,
    ask_model_config,
    fit_combo,
    page_layout,
    row,
    small_button,
)
from .docks import PAGE_SEGMENT, show_panel
from .job_runner import BarState, JobRunner, RunnerPanel
from .sections import DEVICES

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["TrainWidget", "loss_sparkline"]

_SPARKS = "▁▂▃▄▅▆▇█"
#: Losses shown in the text plot (the most recent ones).
SPARK_POINTS = 48
CANCEL_NOTE = ("Cancel stops after the current iteration; the checkpoint keeps the last completed "
               "one, and 'resume' continues from it.")


def loss_sparkline(losses: list[float], points: int = SPARK_POINTS) -> str:
    """The last ``points`` losses as a one-line bar plot (min..max of those shown)."""
    values = [v for v in losses[-points:] if math.isfinite(v)]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low or 1.0
    top = len(_SPARKS) - 1
    return "".join(_SPARKS[min(top, int((v - low) / span * len(_SPARKS)))] for v in values)


class TrainWidget(QWidget, RunnerPanel):
    """Dock widget: datasets + settings -> a trained student checkpoint."""

    #: Emitted when a run ends: "done", "cancelled" or "error".
    train_finished = Signal(str)

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.main: Any = None
        self.last_outcome: Optional[JobOutcome] = None
        self.last_request: Optional[TrainRequest] = None
        self.losses: list[float] = []
        self._val: Optional[float] = None
        prefs = WidgetPreferences.load()

        # Data and output.
        self.datasets = QPlainTextEdit()
        self.datasets.setPlaceholderText("dataset folders, one per line")
        self.datasets.setToolTip(
            "Folders made with Export (or 'napari-maskclip export'). Several combine by class name."
        )
        self.datasets.setFixedHeight(56)
        if prefs.last_dataset:
            self.datasets.setPlainText(prefs.last_dataset)
        self.add_dataset = QPushButton("Add folder...")
        self.output = QLineEdit()
        self.output.setPlaceholderText("student.safetensors")
        self.output.setToolTip(
            "The student checkpoint (saved during training, at the end and on Cancel)."
        )
        self.output_button = small_button("...", "Choose where to save the student.")
        self.resume = QCheckBox("resume (continue this checkpoint)")
        self.resume.setToolTip(
            "Continue a cancelled or finished run from its last saved iteration, with its own "
            "settings; only the number of iterations may change."
        )
        self.overwrite = QCheckBox("replace it if it exists")

        # Settings (the core's defaults: student.settings imports no torch).
        defaults = TrainSettings()
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 10_000_000)
        self.iterations.setValue(defaults.iterations)
        self.iterations.setToolTip(
            "Optimiser steps in the whole schedule (the learning rate decays over them)."
        )
        self.backbone = QComboBox()
        self.backbone.addItems(BACKBONES)
        self.backbone.setCurrentText(defaults.backbone)
        self.backbone.setToolTip(
            "mobilenet_v3_large: trainable on a CPU; resnet50/101: closer to the paper, use a GPU; "
            "tiny: quick trials."
        )
        self.backbone_weights = QComboBox()
        self.backbone_weights.setEditable(True)
        self.backbone_weights.addItems(BACKBONE_WEIGHTS)
        self.backbone_weights.setCurrentText(defaults.backbone_weights)
        self.backbone_weights.setToolTip(
            "auto: ImageNet weights if cached or downloadable, else random (the progress says "
            "which); imagenet: required; random: none; or the path of a state-dict file."
        )
        self.crop = QSpinBox()
        self.crop.setRange(32, 4096)
        self.crop.setValue(defaults.crop_size)
        self.crop.setSuffix(" px")
        self.batch = QSpinBox()
        self.batch.setRange(2, 1024)
        self.batch.setValue(defaults.batch_size)
        self.self_train = QDoubleSpinBox()
        self.self_train.setRange(0.0, 1.0)
        self.self_train.setSingleStep(0.05)
        self.self_train.setValue(defaults.self_train_fraction)
        self.self_train.setToolTip(
            "After this share of the schedule, the student's own predictions replace the "
            "teacher's for pixels nobody edited (1 = never)."
        )
        self.teacher = QLineEdit()
        self.teacher.setPlaceholderText("recorded in the dataset")
        self.teacher.setToolTip(
            "The MaskCLIP teacher that labels unedited pixels: empty = the model recorded in the "
            "dataset; or an open_clip name, 'demo', or a model-config JSON."
        )
        self.teacher_button = small_button("...", "Choose an open_clip model-config JSON.")
        self.teacher_weights = QLineEdit()
        self.teacher_weights.setPlaceholderText("default for the model")
        self.teacher_weights.setToolTip(
            "A pretrained tag or a checkpoint file (only with a teacher model)."
        )
        self.teacher_weights_button = small_button("...", "Choose a CLIP checkpoint file.")
        self.device = QComboBox()
        self.device.addItems(DEVICES)

        # Running.
        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip(CANCEL_NOTE)
        self.live = WrapLabel("")
        self.plot = QLabel("")
        self.plot.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
        self.plot.setToolTip(f"Training loss, the last {SPARK_POINTS} iterations (low to high).")
        self.status = WrapLabel(CANCEL_NOTE)
        # The loss plot is clipped on a narrow dock rather than widening it.
        self.plot.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        for combo in (self.backbone, self.backbone_weights, self.device):
            fit_combo(combo)
        self.use_button = QPushButton("Use this student")
        self.use_button.setToolTip("Make it the model of the Segment page.")
        self.use_button.setVisible(False)

        form = QFormLayout()
        form.addRow("datasets", self.datasets)
        form.addRow("", self.add_dataset)
        form.addRow("student file", row(self.output, self.output_button))
        form.addRow(self.resume)
        form.addRow(self.overwrite)
        form.addRow("iterations", self.iterations)
        form.addRow("backbone", self.backbone)
        form.addRow("backbone weights", self.backbone_weights)
        form.addRow("crop", self.crop)
        form.addRow("batch", self.batch)
        form.addRow("self-training after", self.self_train)
        form.addRow("teacher model", row(self.teacher, self.teacher_button))
        form.addRow("teacher weights", row(self.teacher_weights, self.teacher_weights_button))
        form.addRow("device", self.device)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        column = QVBoxLayout()
        column.addLayout(form)
        footer = QVBoxLayout()
        footer.addLayout(buttons)
        footer.addWidget(self.live)
        footer.addWidget(self.plot)
        footer.addWidget(self.status)
        footer.addWidget(self.use_button)
        page_layout(self, column, footer)

        self.add_dataset.clicked.connect(self._choose_dataset)
        self.output_button.clicked.connect(self._choose_output)
        self.teacher_button.clicked.connect(self._choose_teacher)
        self.teacher_weights_button.clicked.connect(self._choose_teacher_weights)
        self.resume.toggled.connect(self._on_resume)
        self.runner = JobRunner(
            self, title="MaskCLIP+ student", start_button=self.start_button,
            cancel_button=self.cancel_button, record=self._record_step,
            show=self._show_progress, finish=self._finish, on_error=self.status.setText,
        )
        footer.insertWidget(1, self.runner.bar)  # below the buttons, while a job runs
        self.runner.ended.connect(self.train_finished.emit)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(self.use_student)

    # ---- choices -------------------------------------------------------------------------------
    def attach(self, main: Any) -> None:
        """Link to the MaskCLIP widget, which receives the trained student; start from the
        dataset exported last if no folder is listed yet."""
        self.main = main
        if not self.dataset_folders():
            last = WidgetPreferences.load().last_dataset
            if last:
                self.set_datasets([last])

    def set_datasets(self, folders: list[str]) -> None:
        self.datasets.setPlainText("\n".join(str(f) for f in folders))

    def dataset_folders(self) -> list[str]:
        return [line.strip() for line in self.datasets.toPlainText().splitlines() if line.strip()]

    def _choose_dataset(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder")
        if path and path not in self.dataset_folders():
            self.set_datasets([*self.dataset_folders(), path])

    def _choose_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Student checkpoint", self.output.text() or "student.safetensors",
            "Student checkpoints (*.safetensors)", options=QFileDialog.DontConfirmOverwrite,
        )
        if path:
            self.output.setText(path)
            if Path(path).is_file() and not self.overwrite.isChecked():
                self.resume.setChecked(True)  # an existing checkpoint: continuing is the safe guess

    def _choose_teacher(self) -> None:
        path = ask_model_config(self)
        if path:
            self.teacher.setText(path)

    def _choose_teacher_weights(self) -> None:
        path = ask_clip_checkpoint(self)
        if path:
            self.teacher_weights.setText(path)

    def _on_resume(self, resume: bool) -> None:
        """A resumed run keeps its settings: only the iterations may change."""
        for control in (self.backbone, self.backbone_weights, self.crop, self.batch,
                        self.self_train, self.overwrite):
            control.setEnabled(not resume)

    def request(self) -> TrainRequest:
        """The panel's choices, checked (InvalidInputError says what to fix)."""
        settings = TrainSettings(iterations=int(self.iterations.value()))
        if not self.resume.isChecked():  # a resumed run keeps the checkpoint's settings
            settings = settings.replace(
                batch_size=int(self.batch.value()),
                crop_size=int(self.crop.value()),
                self_train_fraction=float(self.self_train.value()),
                backbone=self.backbone.currentText(),
                backbone_weights=(self.backbone_weights.currentText().strip()
                                  or settings.backbone_weights),
            )
        return TrainRequest(
            datasets=self.dataset_folders(),
            checkpoint=self.output.text().strip(),
            settings=settings,
            teacher=self.teacher.text().strip() or None,
            pretrained=self.teacher_weights.text().strip() or None,
            device=self.device.currentText(),
            resume=self.resume.isChecked(),
            overwrite=self.overwrite.isChecked() and not self.resume.isChecked(),
        ).check()

    # ---- running -------------------------------------------------------------------------------
    def start(self) -> Any:
        """Start training; returns the napari worker, or None (with a notification) if refused."""
        if self.running:
            notify("Training is in progress: wait for it or press Cancel.")
            return None
        try:
            request = self.request()
        except MaskClipError as exc:
            self.status.setText(show_exception(exc))
            self.train_finished.emit("error")
            return None
        self.last_request = request
        self.losses = []
        self._val = None
        self.use_button.setVisible(False)
        self.live.setText("")
        self.plot.setText("")
        verb = "Resuming" if request.resume else "Training"
        self.status.setText(f"{verb} {request.path.name}... {CANCEL_NOTE}")
        return self.runner.start(
            lambda control: guarded_job(lambda: training_iter(request), control)
        )

    def cancel(self) -> None:
        if self.runner.request_cancel():
            self.status.setText("Stopping after the current iteration (the checkpoint keeps it)...")

    def _record_step(self, step: Progress) -> None:
        """Every training step, as it arrives: the loss curve and the last validation score."""
        if step.stage != "train":
            return
        if step.info.get("val_miou") is not None:
            self._val = float(step.info["val_miou"])
        if "loss" in step.info:
            self.losses.append(float(step.info["loss"]))

    def _show_progress(self, step: Progress) -> Optional[BarState]:
        if step.stage != "train":
            if step.message:
                self.live.setText(step.message)
            return None
        self.live.setText(self.describe_step(step, self._val))
        self.plot.setText(loss_sparkline(self.losses))
        return BarState(done=step.done, total=step.total) if step.total > 0 else None

    @staticmethod
    def describe_step(step: Progress, val_miou: Optional[float] = None) -> str:
        """``iteration i/N, loss L (stage), lr X, val mIoU M, S it/s, ~T left``."""
        info = step.info
        text = f"iteration {step.done}/{step.total}"
        if "loss" in info:
            stage, lr = info.get("stage", "?"), info.get("lr", 0.0)
            text += f", loss {info['loss']:.4f} ({stage}), lr {lr:.2g}"
        elif info.get("stage"):
            text += f" ({info['stage']})"
        if val_miou is not None:
            text += f", val mIoU {val_miou:.3f}"
        rate = info.get("it_per_s")
        if rate:
            left = (step.total - step.done) / rate
            text += f", {rate:.2f} it/s, ~{_duration(left)} left"
        return text

    def _finish(self, outcome: JobOutcome) -> str:
        self.last_outcome = outcome
        request = self.last_request
        if outcome.cancelled:
            self.status.setText(self._cancelled_text(request))
            return "cancelled"
        if outcome.error is not None:  # a teacher offline: this page's teacher boxes
            self.status.setText(show_exception(in_widget_terms(
                outcome.error, model_box="teacher model box", weights_box="teacher weights box")))
            return "error"
        summary = outcome.result
        text = f"Trained to iteration {summary.iteration}: {summary.checkpoint}"
        details = []
        if summary.loss is not None:
            details.append(f"final loss {summary.loss:.4f}")
        if summary.val_miou is not None:
            details.append(f"validation mIoU {summary.val_miou:.3f}")
        self.status.setText(text + (f" ({', '.join(details)})." if details else ".")
                            + " Use it as the model of the MaskCLIP widget:")
        path = str(summary.checkpoint)
        update_preferences(lambda prefs: prefs.remember_student(path))
        self.use_button.setVisible(True)
        return "done"

    def _cancelled_text(self, request: Optional[TrainRequest]) -> str:
        if request is None or not request.path.is_file():
            return "Cancelled before the first iteration: nothing was saved."
        try:
            from ...student import read_checkpoint_meta  # torch is loaded by now

            iteration = read_checkpoint_meta(request.path)["iteration"]
        except Exception:  # noqa: BLE001 - the message below still holds
            return f"Cancelled. {request.path.name} holds the last saved iteration."
        return (f"Cancelled: {request.path.name} holds iteration {iteration}. Tick 'resume' and "
                "press Start to continue.")

    def use_student(self) -> Any:
        """Make the trained student the model of the MaskCLIP widget (opened if needed)."""
        outcome = self.last_outcome
        if outcome is None or outcome.result is None:
            notify("Train a student first.")
            return None
        main = self.main
        if main is None:
            try:
                main = show_panel(self.viewer, PAGE_SEGMENT)
            except Exception as exc:  # noqa: BLE001 - shown, never raised out
                self.status.setText(show_exception(exc))
                return None
            self.main = main
        if hasattr(main, "show_page"):
            main.show_page(PAGE_SEGMENT)
        if main.use_student(str(outcome.result.checkpoint)):
            self.status.setText(f"The MaskCLIP widget now uses {outcome.result.checkpoint.name}.")
        return main

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.cancel()  # the core saves the last completed iteration
        super().closeEvent(event)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
