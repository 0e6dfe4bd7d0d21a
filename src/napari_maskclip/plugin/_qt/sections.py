"""The sections of the MaskCLIP dock widget: image, classes, model, settings.

Each section is a small Qt group box that owns its controls and turns them into plain values
(a :class:`StackLayout`, class-list text, a :class:`ModelChoice`, the engine's checked
:class:`~napari_maskclip.engine.settings.SegmentSettings`). The Segment panel
(:mod:`.segment_panel`) assembles them and runs the work. Imports no torch (the engine's settings
and modes modules are torch-free; choosing a trained student reads its checkpoint's description,
which loads torch once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ...engine.modes import MODE_HELP, MODES
from ...engine.names import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEMO_MODEL, RANDOM_WEIGHTS
from ...engine.settings import SegmentSettings
from ...engine.templates import TEMPLATE_SETS
from ...engine.precision import PRECISIONS
from ...engine.presets import PRESET_SOURCES, PRESETS, REFERENCE_CONVENTIONS
from ...errors import InvalidInputError
from ...stacks import StackLayout
from ..models import ModelChoice, import_student
from ..preferences import WidgetPreferences
from ..records import SampleSuggestion, role_of
from .controls import (
    WrapLabel,
    ask_clip_checkpoint,
    ask_model_config,
    fit_combo,
    row,
    set_items,
    small_button,
)

__all__ = ["ClassesSection", "ImageSection", "ModelSection", "SettingsSection"]

SLICE_CURRENT = "current slice"
SLICE_ALL = "all slices"
CHANNEL_NONE = "none"
INFERENCE_AUTO = "auto"
INFERENCE_WHOLE = "whole image"
INFERENCE_SLIDING = "sliding window"
KNOWN_MODELS = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "RN50", "RN101", DEMO_MODEL)
KNOWN_TAGS = (DEFAULT_PRETRAINED, "laion2b_s34b_b88k", "laion400m_e32", RANDOM_WEIGHTS)
DEVICES = ("auto", "cpu", "cuda", "mps")
#: How a trained student is listed in the model box.
STUDENT_PREFIX = "student: "


def _is_plugin_output(layer: Any) -> bool:
    return role_of(layer) is not None


class ImageSection(QGroupBox):
    """Which image layer, which channels, which slices."""

    layer_changed = Signal()

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__("Image", parent)
        self._layers: list[Any] = []
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The image layer to segment (2D, RGB(A), stacks, time series).")
        self.channel_axis = QComboBox()
        self.channel_axis.setToolTip(
            "The axis holding channels in a multichannel layer ('none' for gray and RGB images).\n"
            "With 1 or 3 channels all are used; otherwise pick 1 or 3 below."
        )
        self.channels = QLineEdit()
        self.channels.setPlaceholderText("all, or 1 or 3 indices: 0  or  0,1,2")
        self.channels.setToolTip("Channels shown to CLIP: one (as gray) or three (as RGB).")
        self.slices = QComboBox()
        self.slices.addItems([SLICE_CURRENT, SLICE_ALL])
        self.slices.setToolTip(
            "Stacks and time series are segmented slice by slice: the slice the viewer shows, "
            "or every slice (with per-slice progress)."
        )
        self.info = WrapLabel()
        for combo in (self.layer_combo, self.channel_axis, self.slices):
            fit_combo(combo)
        form = QFormLayout(self)
        form.addRow("layer", self.layer_combo)
        form.addRow("channel axis", self.channel_axis)
        form.addRow("channels", self.channels)
        form.addRow("slices", self.slices)
        form.addRow(self.info)
        self.layer_combo.currentIndexChanged.connect(self._on_layer_changed)
        self.channel_axis.currentIndexChanged.connect(self._update_info)

    # ---- layers ----------------------------------------------------------------------------
    def refresh(self, layers: Any) -> None:
        """Re-list the viewer's image layers, keeping the current choice if it still exists."""
        from napari.layers import Image

        current = self.current_layer()
        self._layers = [
            layer for layer in layers if isinstance(layer, Image) and not _is_plugin_output(layer)
        ]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        set_items(self.layer_combo, [layer.name for layer in self._layers])
        if current in self._layers:
            self.layer_combo.setCurrentIndex(self._layers.index(current))
        elif self._layers:
            self.layer_combo.setCurrentIndex(len(self._layers) - 1)  # the top-most image
        self.layer_combo.blockSignals(False)
        if self.current_layer() is not current:
            self._on_layer_changed()
        else:
            self._update_info()

    def current_layer(self) -> Any:
        i = self.layer_combo.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def select(self, layer: Any) -> None:
        """Choose ``layer`` (matched by ``unique_id``: napari may hand out proxies of it)."""
        uid = getattr(layer, "unique_id", None)
        for i, listed in enumerate(self._layers):
            if listed is layer or (uid is not None and listed.unique_id == uid):
                self.layer_combo.setCurrentIndex(i)
                return

    def _on_layer_changed(self) -> None:
        layer = self.current_layer()
        self.channel_axis.blockSignals(True)
        self.channel_axis.clear()
        self.channel_axis.addItem(CHANNEL_NONE)
        if layer is not None and not layer.rgb:
            self.channel_axis.addItems([str(ax) for ax in range(max(0, layer.ndim - 2))])
        self.channel_axis.blockSignals(False)
        self._update_info()
        self.layer_changed.emit()

    # ---- values ----------------------------------------------------------------------------
    @staticmethod
    def layer_data(layer: Any) -> Any:
        """The full-resolution data of a layer (level 0 of a multiscale one); not loaded."""
        return layer.data[0] if layer.multiscale else layer.data

    def layout(self) -> StackLayout:
        layer = self.current_layer()
        if layer is None:
            raise InvalidInputError("No image layer: open an image (File > Open, or a sample).")
        axis_text = self.channel_axis.currentText()
        axis = None if axis_text in ("", CHANNEL_NONE) else int(axis_text)
        shape = tuple(int(s) for s in self.layer_data(layer).shape)
        return StackLayout(shape, rgb=bool(layer.rgb), channel_axis=axis)

    def channel_indices(self) -> Optional[tuple[int, ...]]:
        text = self.channels.text().replace(";", ",").strip()
        if not text or text.lower() == "all":
            return None
        try:
            picks = tuple(int(part) for part in text.replace(" ", ",").split(",") if part.strip())
        except ValueError as exc:
            raise InvalidInputError(
                f"Channels {text!r}: type one or three channel numbers, e.g. 0 or 0,1,2."
            ) from exc
        return picks or None

    def all_slices(self) -> bool:
        return self.slices.currentText() == SLICE_ALL

    def _update_info(self) -> None:
        layer = self.current_layer()
        if layer is None:
            self.info.setText("No image layer yet.")
            self.slices.setEnabled(False)
            return
        try:
            layout = self.layout()
        except InvalidInputError as exc:
            self.info.setText(str(exc))
            return
        kind = "RGB" if layer.rgb else "gray"
        if layout.channel_axis is not None:
            kind = f"{layout.n_channels} channels"
        h, w = layout.plane_shape
        lazy = "" if type(self.layer_data(layer)).__module__.startswith("numpy") else ", lazy"
        text = f"{w}x{h} px, {kind}{lazy}"
        if layout.loop_axes:
            text += f", {layout.n_slices} slices"
        self.info.setText(text)
        self.slices.setEnabled(bool(layout.loop_axes))
        self.channels.setEnabled(layout.channel_axis is not None)


class ClassesSection(QGroupBox):
    """Class names (with synonyms), background names, and recently used lists."""

    def __init__(self, prefs: WidgetPreferences, parent: Optional[QWidget] = None) -> None:
        super().__init__("Classes", parent)
        self.text = QPlainTextEdit()
        self.text.setPlaceholderText("cat, dog; puppy, sofa")
        self.text.setToolTip(
            "Class names, separated by commas or new lines. ';' separates synonyms of one class "
            "('dog; puppy'): the first is the name shown on the labels."
        )
        self.text.setFixedHeight(64)
        self._tooltip = self.text.toolTip()
        self._typed: Optional[tuple[str, str]] = None  # what was typed before a student's list
        self._student_text = ""
        self._suggested: tuple[str, str] = ("", "")  # what a sample filled in (classes, background)
        self.recent = QComboBox()
        self.recent.setToolTip("Class lists you used recently (remembered between sessions).")
        self.background = QComboBox()
        self.background.setEditable(True)
        self.background.lineEdit().setPlaceholderText("optional: background; wall, floor")
        self.background.setToolTip(
            "Optional background names: they compete with your classes, and pixels they win are "
            "label 0 (unlabelled). Same syntax as the classes."
        )
        fit_combo(self.recent)
        fit_combo(self.background)
        form = QFormLayout(self)
        form.addRow("names", self.text)
        form.addRow("recent", self.recent)
        form.addRow("background", self.background)
        self.recent.activated.connect(self._use_recent)
        self.set_recent(prefs)

    def set_recent(self, prefs: WidgetPreferences) -> None:
        self.recent.blockSignals(True)
        self.recent.clear()
        self.recent.addItem("recent lists..." if prefs.recent_classes else "(none yet)")
        set_items(self.recent, prefs.recent_classes)
        self.recent.blockSignals(False)
        current = self.background.currentText()
        self.background.blockSignals(True)
        self.background.clear()
        set_items(self.background, ["", *prefs.recent_background])
        self.background.setEditText(current)
        self.background.blockSignals(False)

    def _use_recent(self, index: int) -> None:
        if index > 0:
            self.text.setPlainText(self.recent.itemText(index))
        self.recent.setCurrentIndex(0)

    def show_student(self, names: Optional[list[str]], background: str = "") -> None:
        """Show a student's classes (``names``; the user may delete some to use a subset), or,
        with None, go back to the class list typed before. The background is the student's."""
        if names is not None:
            if self._typed is None:
                self._typed = (self.classes_text(), self.background_text())
            self._student_text = ", ".join(names)
            self.text.setPlainText(self._student_text)
            self.text.setToolTip(
                "The student's classes. Delete some to keep only those (their pixels then go to "
                "the closest remaining class or background); names it was not trained on are "
                "refused. Empty = all of them."
            )
            self.background.setEditText(background)
            self.background.setEnabled(False)
            return
        if self._typed is not None:
            typed, background_typed = self._typed
            if self.classes_text() == self._student_text:
                self.text.setPlainText(typed)
            self.background.setEditText(background_typed)
            self._typed = None
        self.text.setToolTip(self._tooltip)
        self.background.setEnabled(True)

    def classes_text(self) -> str:
        return self.text.toPlainText().strip()

    def background_text(self) -> str:
        return self.background.currentText().strip()

    def suggest(self, layer: Any) -> bool:
        """Fill in the class names (and background names) a sample image suggests, unless the
        user typed some: an empty box, or one still holding what a sample filled in, takes the
        sample's; names typed or picked from the recent lists stay. True when they were used."""
        suggestion = SampleSuggestion.from_metadata(getattr(layer, "metadata", None))
        suggested_classes, suggested_background = self._suggested
        if suggestion is None or self.classes_text() not in ("", suggested_classes):
            return False
        background = suggestion.background or ""
        self.text.setPlainText(suggestion.classes)
        if self.background_text() in ("", suggested_background):
            self.background.setEditText(background)
        self._suggested = (self.classes_text(), background.strip())
        return True


class ModelSection(QGroupBox):
    """open_clip model + pretrained tag, or local config/checkpoint files, or a trained MaskCLIP+
    student checkpoint; device.

    A student is listed in the model box as ``student: <file name>`` once chosen (with the
    ``student...`` button, from the Train panel, or by typing the checkpoint's path);
    :attr:`student_changed` carries its description (or None when a CLIP model is chosen).
    """

    #: The checkpoint description of the student now chosen, or None (a CLIP model).
    student_changed = Signal(object)

    def __init__(self, prefs: WidgetPreferences, parent: Optional[QWidget] = None) -> None:
        super().__init__("Model", parent)
        self._students: dict[str, str] = {}  # label -> checkpoint path
        self._student_meta: dict[str, dict[str, Any]] = {}  # path -> description
        self._shown_student: Optional[str] = None
        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.addItems(KNOWN_MODELS)
        self.model.setItemData(
            KNOWN_MODELS.index(DEMO_MODEL),
            "Demo model: tiny, shipped with the plugin, runs offline; trained on synthetic "
            "coloured shapes only (try File > Open Sample > Shapes scene).",
            Qt.ToolTipRole,
        )
        self.model.setToolTip(
            "An open_clip model name (ViT-B-16, ViT-L-14, RN50, ...), the path of an open_clip "
            "model-config JSON (button), or 'demo': the tiny demo model shipped with the plugin, "
            "which runs offline (trained on synthetic shapes, for trying the plugin only)."
        )
        self.model_file = small_button("...", "Choose an open_clip model-config JSON.")
        self.pretrained = QComboBox()
        self.pretrained.setEditable(True)
        self.pretrained.addItems(KNOWN_TAGS)
        self.pretrained.setToolTip(
            "An open_clip pretrained tag (downloaded once into open_clip's cache on first use), "
            "or a local checkpoint file (button): .safetensors, .pt, .pth, .bin. Offline, pick a "
            "file. 'random' = random weights, for testing only."
        )
        self.pretrained_file = small_button("...", "Choose a checkpoint file.")
        self.student_file = QPushButton("student...")
        self.student_file.setToolTip(
            "Use a trained MaskCLIP+ student (a .safetensors checkpoint from the Train panel or "
            "'napari-maskclip train') as the model: same layers, its own classes, faster."
        )
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device.setToolTip("auto = CUDA, then Apple MPS, then the CPU.")
        self.hint = WrapLabel()
        for combo in (self.model, self.pretrained, self.device):
            fit_combo(combo)
        form = QFormLayout(self)
        form.addRow("model", row(self.model, self.model_file, self.student_file))
        form.addRow("weights", row(self.pretrained, self.pretrained_file))
        form.addRow("device", self.device)
        form.addRow(self.hint)
        for path in prefs.recent_students:  # listed, not chosen: reading one loads torch
            if Path(path).is_file():
                self._list_student(path)
        remembered = prefs.model or DEFAULT_MODEL
        if remembered.startswith(STUDENT_PREFIX):
            remembered = DEFAULT_MODEL
        self.model.setCurrentText(remembered)
        self.pretrained.setCurrentText(prefs.pretrained or DEFAULT_PRETRAINED)
        self.model.currentTextChanged.connect(self._update_hint)
        self.model.currentTextChanged.connect(self._show_label_start)
        self.model.lineEdit().editingFinished.connect(self._show_label_start)
        self.model_file.clicked.connect(self._choose_model_file)
        self.pretrained_file.clicked.connect(self._choose_checkpoint)
        self.student_file.clicked.connect(self._choose_student)
        self._update_hint()

    # ---- students ---------------------------------------------------------------------------
    def _list_student(self, path: str) -> str:
        """The model-box label of a student checkpoint, adding it to the list if new."""
        path = str(Path(path).expanduser().resolve())
        for label, known in self._students.items():
            if known == path:
                return label
        label = STUDENT_PREFIX + Path(path).name
        if label in self._students:
            label = f"{label} ({Path(path).parent.name})"
        self._students[label] = path
        set_items(self.model, [label])
        self.model.setItemData(self.model.count() - 1, path, Qt.ToolTipRole)
        return label

    def _show_label_start(self, *_: Any) -> None:
        """A student's label is shown from its start ("student: <file>"): the box's line edit
        shows the end of a text too long for it, which cut "student" off. Not while typing."""
        line = self.model.lineEdit()
        if self.model.currentText() in self._students and not line.hasFocus():
            line.home(False)

    def use_student(self, path: str) -> None:
        """Choose the student checkpoint ``path`` as the model (ModelLoadError if it is none)."""
        meta = import_student().read_checkpoint_meta(path)  # clear message for other files
        label = self._list_student(path)
        self._student_meta[self._students[label]] = meta
        self._shown_student = None  # re-announce: a retrained file may know other classes
        self.model.setCurrentText(label)
        self._update_hint()

    def student_path(self) -> Optional[str]:
        """The checkpoint of the chosen student, or None when a CLIP model is chosen."""
        text = self.model.currentText().strip()
        if text in self._students:
            return self._students[text]
        if text.lower().endswith(".safetensors") and Path(text).expanduser().is_file():
            if import_student().is_student_checkpoint(text):  # a student's path, typed
                return str(Path(text).expanduser().resolve())
        return None

    def student_meta(self) -> Optional[dict[str, Any]]:
        path = self.student_path()
        if path is None:
            return None
        if path not in self._student_meta:
            self._student_meta[path] = import_student().read_checkpoint_meta(path)
        return self._student_meta[path]

    def _choose_student(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "MaskCLIP+ student checkpoint", "",
            "Student checkpoints (*.safetensors);;All files (*)",
        )
        if path:
            try:
                self.use_student(path)
            except Exception as exc:  # noqa: BLE001 - a bad file is the user's to fix
                from ..notify import show_exception

                show_exception(exc)

    def _student_hint(self, meta: dict[str, Any]) -> str:
        settings = meta.get("settings") or {}
        teacher = (meta.get("teacher") or {}).get("model")
        done = "" if meta.get("complete") else " (not finished: resume it in the Train panel)"
        return (
            f"MaskCLIP+ student: {settings.get('backbone', '?')}, {len(meta.get('classes', []))} "
            f"classes, {meta.get('iteration', '?')} iterations{done}"
            + (f", taught by {Path(str(teacher)).name}" if teacher else "")
            + ". The classes are its own (delete some to use a subset); MaskCLIP's settings do "
            "not apply."
        )

    def _update_hint(self) -> None:
        text = self.model.currentText().strip()
        demo = text == DEMO_MODEL
        student = self._students.get(text)
        meta = self._student_meta.get(student) if student else None
        if student and meta is None:
            try:
                meta = self.student_meta()
            except Exception:  # noqa: BLE001 - the file changed or vanished: run will say why
                meta = None
        self.pretrained.setEnabled(not demo and not student)
        self.pretrained_file.setEnabled(not demo and not student)
        if demo:
            hint = ("Demo model: tiny, offline, trained on synthetic coloured shapes; it knows "
                    "only those (e.g. 'red circle, blue square'). Use a real CLIP for real images.")
        elif meta is not None:
            hint = self._student_hint(meta)
        else:
            hint = ""
        self.hint.setText(hint)
        self.hint.setVisible(bool(hint))
        shown = student if meta is not None else None
        if shown != self._shown_student:
            self._shown_student = shown
            self.student_changed.emit(meta)

    def _choose_model_file(self) -> None:
        path = ask_model_config(self)
        if path:
            self.model.setCurrentText(path)

    def _choose_checkpoint(self) -> None:
        path = ask_clip_checkpoint(self)
        if path:
            self.pretrained.setCurrentText(path)

    def choice(self) -> ModelChoice:
        student = self.student_path()
        if student is not None:
            return ModelChoice.student(student, self.device.currentText())
        return ModelChoice.from_fields(
            self.model.currentText(), self.pretrained.currentText(), self.device.currentText()
        )


#: The regions combo's first entries; Labels layers follow as ``layer: <name>``.
NO_REGIONS = "no regions"
REGION_METHOD_ITEMS = ("felzenszwalb", "slic")
LAYER_PREFIX = "layer: "
#: The preset combo's entry for "no paper preset".
NO_PRESET = "no preset"
#: How the widget labels the settings a preset sets (for the "changed" note).
_FIELD_LABELS = {"logit_scale": "temperature", "short_side": "short side",
                 "key_smoothing": "key smoothing", "denoise": "prompt denoising", "pamr": "PAMR",
                 "tlp": "TLP", "window": "window", "stride": "stride"}
#: Settings a preset sets that have no control of their own (kept while its values stay chosen).
_HIDDEN_PRESET_FIELDS = ("pamr_iterations", "pamr_dilations", "pos_embed_resize",
                         "partial_patches", "resize_antialias", "refine_guide", "rfclip_global",
                         "rfclip_global_weight", "rfclip_text_weight", "rfclip_cluster_threshold",
                         "resclip_base", "resclip_rcs_weights", "resclip_sfr_weights",
                         "resclip_temp_threshold", "resclip_delete_same_entity")


class SettingsSection(QGroupBox):
    """MaskCLIP's settings: paper preset, read-out mode, refinements, windows, prompts.

    A paper preset (:mod:`napari_maskclip.engine.presets`) sets the fields to that paper's values;
    while they stay so the run records the preset, and once one is changed the preset box reads
    ``<name>, changed`` and the run records ``preset_base`` and ``preset_changed`` instead.
    Region voting's regions can be superpixels or any Labels layer of the viewer
    (:meth:`set_region_layers`; the widget keeps the list up to date).
    """

    #: Emitted when the regions choice changes (the widget checks a layer's shape).
    regions_changed = Signal()

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__("Settings", parent)
        defaults = SegmentSettings()  # the engine's (the paper's) defaults
        self._preset: Optional[str] = None  # the preset whose values were last applied
        self._applying = False
        self._region_layers: list[Any] = []  # the Labels layers listed in the regions box
        self._all_labels: list[Any] = []  # every Labels layer of the viewer
        self._plugin_layers: list[Any] = []  # this plugin's result layers (offered on request)
        self.preset = QComboBox()
        self.preset.addItem(NO_PRESET)
        for name in PRESETS:
            self.preset.addItem(name)
            self.preset.setItemData(self.preset.count() - 1, PRESET_SOURCES[name], Qt.ToolTipRole)
        self.preset.setToolTip(
            "A paper's evaluation settings (its official code's defaults): sets mode, templates, "
            "temperature, windows, short side, PAMR and denoising below, and the reference code's "
            "conventions. Changing a field afterwards makes the run 'changed' (recorded)."
        )
        self.preset_info = WrapLabel()
        self.preset_info.setVisible(False)
        self.mode = QComboBox()
        for i, mode in enumerate(MODES):
            self.mode.addItem(mode)
            self.mode.setItemData(i, MODE_HELP[mode], Qt.ToolTipRole)
        self.mode.setCurrentText(defaults.mode)
        self.mode.setToolTip("How the last attention layer is read out into dense features.")
        self.denoise = QCheckBox("prompt denoising")
        self.denoise.setChecked(defaults.denoise)
        self.denoise.setToolTip(
            "Drop classes whose best pixel stays below the threshold (paper section 3.3), so "
            "absent classes do not take pixels."
        )
        self.denoise_threshold = self._unit_spin(defaults.denoise_threshold)
        self.key_smoothing = QCheckBox("key smoothing")
        self.key_smoothing.setChecked(defaults.key_smoothing)
        self.key_smoothing.setToolTip(
            "Smooth class probabilities between patches with similar attention keys (paper eq. 5). "
            "Changing it re-encodes the image."
        )
        self.ks_threshold = self._unit_spin(defaults.ks_threshold)
        self.ks_threshold.setToolTip("Only pixels whose confidence is below this are smoothed.")
        self.inference = QComboBox()
        self.inference.addItems([INFERENCE_AUTO, INFERENCE_WHOLE, INFERENCE_SLIDING])
        self.inference.setToolTip(
            "auto: the whole image, or sliding windows when it exceeds about 1 megapixel "
            "(bounded memory). Changing it re-encodes the image."
        )
        self.window = QSpinBox()
        self.window.setRange(16, 8192)
        self.window.setValue(448)
        self.window.setSuffix(" px")
        self.stride = QSpinBox()
        self.stride.setRange(8, 8192)
        self.stride.setValue(224)
        self.stride.setSuffix(" px")
        self.short_side = QSpinBox()
        self.short_side.setRange(0, 8192)
        self.short_side.setValue(defaults.short_side or 0)
        self.short_side.setSpecialValueText("as is")
        self.short_side.setSuffix(" px")
        self.short_side.setToolTip(
            "Resize so the short side has this many pixels before inference (the papers: 336, "
            "448 or 512); labels keep the image's size. 'as is': no resize. Re-encodes."
        )
        self.templates = QComboBox()
        self.templates.addItems(TEMPLATE_SETS)
        self.templates.setCurrentText(str(defaults.templates))
        self.templates.setToolTip(
            "maskclip85: the 85 prompt templates of the paper (better); openai80: CLIP's 80 (the "
            "successors'); single: 'a photo of a {}.'"
        )
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(1.0, 1000.0)
        self.temperature.setDecimals(1)
        self.temperature.setValue(defaults.logit_scale)
        self.temperature.setToolTip(
            "Softmax scale on the cosines: 100 as CLIP and MaskCLIP; the successors use 40-50 "
            "(softer maps). Query-time: no re-encode."
        )
        self.min_confidence = self._unit_spin(defaults.background_threshold or 0.0)
        self.min_confidence.setToolTip(
            "Pixels whose best class is less confident than this stay unlabelled (0 = off)."
        )
        self.pamr = QCheckBox("PAMR")
        self.pamr.setChecked(defaults.pamr)
        self.pamr.setToolTip(
            "Pixel-adaptive mask refinement: scores refined by local colour affinity (10 "
            "iterations, dilations 8 and 16 px). Query-time: no re-encode; seconds on large images."
        )
        self.tlp = QCheckBox("TLP")
        self.tlp.setChecked(defaults.tlp)
        self.tlp.setToolTip(
            "PEARL's text-aware Laplacian propagation: scores smoothed on a grid of about 80 cells "
            "a side, along edges the image and the class names agree on (after PAMR). Query-time."
        )
        self.regions = QComboBox()
        self.regions.addItems([NO_REGIONS, *REGION_METHOD_ITEMS])
        self.regions.setToolTip(
            "Region voting: every region gets its mean class probabilities (query-time: no "
            "re-encode). Superpixels of the image, or a Labels layer of the image's size (e.g. "
            "SAM, micro-sam or Cellpose output; 0 = no region)."
        )
        self.region_results = QCheckBox("offer MaskCLIP results as regions")
        self.region_results.setToolTip(
            "Also list the Labels layers this plugin made (its own results) as regions."
        )
        self.region_results.setVisible(False)
        self.precision = QComboBox()
        self.precision.addItems(PRECISIONS)
        self.precision.setCurrentText(defaults.precision)
        self.precision.setToolTip(
            "Precision of the image and text encoders. auto: bf16 on a CPU with native bf16 "
            "(AVX512-BF16/AMX), fp32 on other CPUs, fp16 on GPUs. Changing it re-encodes the image."
        )
        self.confidence_maps = QCheckBox("confidence maps")
        self.confidence_maps.setChecked(True)
        self.confidence_maps.setToolTip("Add one confidence image (0..1) per class.")
        for combo in (self.preset, self.mode, self.inference, self.templates, self.regions,
                      self.precision):
            fit_combo(combo)
        form = QFormLayout(self)
        form.addRow("preset", self.preset)
        form.addRow(self.preset_info)
        form.addRow("mode", self.mode)
        form.addRow(row(self.denoise, self.denoise_threshold))
        form.addRow(row(self.key_smoothing, self.ks_threshold))
        form.addRow("inference", self.inference)
        form.addRow("window", self.window)  # one per row: side by side they are clipped
        form.addRow("stride", self.stride)
        form.addRow("short side", self.short_side)
        form.addRow("templates", self.templates)
        form.addRow("temperature", self.temperature)
        form.addRow("min confidence", self.min_confidence)
        form.addRow("refine", row(self.pamr, self.tlp))
        form.addRow("regions", self.regions)  # own row: a layer's name needs the width
        form.addRow(self.region_results)
        form.addRow("precision", self.precision)
        form.addRow(self.confidence_maps)
        self.denoise.toggled.connect(self.denoise_threshold.setEnabled)
        self.key_smoothing.toggled.connect(self.ks_threshold.setEnabled)
        self.inference.currentTextChanged.connect(self._update_windows)
        self.denoise_threshold.setEnabled(self.denoise.isChecked())
        self.ks_threshold.setEnabled(self.key_smoothing.isChecked())
        self.preset.activated.connect(self._on_preset_chosen)
        for signal in (self.mode.currentTextChanged, self.denoise.toggled,
                       self.key_smoothing.toggled, self.inference.currentTextChanged,
                       self.window.valueChanged, self.stride.valueChanged,
                       self.short_side.valueChanged, self.templates.currentTextChanged,
                       self.temperature.valueChanged, self.pamr.toggled, self.tlp.toggled):
            signal.connect(self._check_preset)
        self.regions.currentIndexChanged.connect(self._on_regions_changed)
        self.region_results.toggled.connect(lambda _: self._list_region_layers())
        self._update_windows()

    # ---- paper presets -------------------------------------------------------------------
    def choose_preset(self, name: Optional[str]) -> None:
        """Set every field a paper preset decides to its values (None: no preset; the fields
        stay as they are and the hidden ones go back to the engine's defaults)."""
        if name is not None and name not in PRESETS:
            raise InvalidInputError(f"Unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
        self._preset = name
        self._applying = True
        try:
            if name is not None:
                self._show_values(PRESETS[name])
        finally:
            self._applying = False
        self._show_preset_state()

    def _on_preset_chosen(self, index: int) -> None:
        text = self.preset.itemText(index)
        if text in PRESETS or text == NO_PRESET:
            self.choose_preset(None if text == NO_PRESET else text)
        else:  # the "<name>, changed" entry: nothing to apply
            self._show_preset_state()

    def _show_values(self, values: dict[str, Any]) -> None:
        """Show a preset's visible values in the controls."""
        if "mode" in values:
            self.mode.setCurrentText(values["mode"])
        if "templates" in values:
            self.templates.setCurrentText(str(values["templates"]))
        if "logit_scale" in values:
            self.temperature.setValue(float(values["logit_scale"]))
        for name, box in (("denoise", self.denoise), ("key_smoothing", self.key_smoothing),
                          ("pamr", self.pamr), ("tlp", self.tlp)):
            if name in values:
                box.setChecked(bool(values[name]))
        if "short_side" in values:
            self.short_side.setValue(int(values["short_side"] or 0))
        if "window" in values:
            if values["window"] is None:
                self.inference.setCurrentText(INFERENCE_AUTO)
            else:
                self.inference.setCurrentText(INFERENCE_SLIDING)
                self.window.setValue(int(values["window"]))
                self.stride.setValue(int(values.get("stride") or values["window"] // 2))

    def preset_changes(self) -> list[str]:
        """The preset's fields whose control now shows another value (empty: as the preset)."""
        if self._preset is None:
            return []
        shown = self._visible_values()
        return [k for k, v in PRESETS[self._preset].items() if k in shown and shown[k] != v]

    def _check_preset(self, *_: Any) -> None:
        if not self._applying:
            self._show_preset_state()

    def _show_preset_state(self) -> None:
        """The preset box and its note: the preset, ``<name>, changed`` or no preset."""
        self.preset.blockSignals(True)
        for i in range(self.preset.count() - 1, 0, -1):
            if self.preset.itemText(i) not in PRESETS:
                self.preset.removeItem(i)
        name, changed = self._preset, self.preset_changes()
        if name is None:
            self.preset.setCurrentText(NO_PRESET)
            self.preset_info.setText("")
        else:
            conventions = all(PRESETS[name].get(k) == v for k, v in REFERENCE_CONVENTIONS.items())
            source = PRESET_SOURCES[name].split(":")[0]
            kept = ("its conventions (positional embedding by scale factor, partial patches "
                    "dropped, no antialiasing, PAMR and TLP guided by the resized image)"
                    if conventions else "")
            if changed:
                self.preset.addItem(f"{name}, changed")
                self.preset.setCurrentIndex(self.preset.count() - 1)
                shown = ", ".join(_FIELD_LABELS.get(k, k) for k in changed)
                note = f"Changed from {name} ({source}): {shown}."
                if kept:
                    note += f" {kept[0].upper()}{kept[1:]} still apply."
            else:
                self.preset.setCurrentText(name)
                note = f"{name}: {source}" + (f", with {kept}." if kept else ".")
            self.preset_info.setText(note)
        self.preset_info.setVisible(bool(self.preset_info.text()))
        self.preset.blockSignals(False)

    def _visible_values(self) -> dict[str, Any]:
        """The preset-set fields as the controls show them (SegmentSettings names)."""
        sliding = self.inference.currentText() == INFERENCE_SLIDING
        return {
            "mode": self.mode.currentText(),
            "templates": self.templates.currentText(),
            "logit_scale": float(self.temperature.value()),
            "denoise": self.denoise.isChecked(),
            "key_smoothing": self.key_smoothing.isChecked(),
            "pamr": self.pamr.isChecked(),
            "tlp": self.tlp.isChecked(),
            "short_side": int(self.short_side.value()) or None,
            "window": int(self.window.value()) if sliding else None,
            "stride": int(self.stride.value()) if sliding else None,
        }

    def provenance(self) -> dict[str, Any]:
        """What a run records about the preset beyond its settings: when fields were changed
        after choosing one, the preset they started from and which fields differ."""
        changed = self.preset_changes()
        if not changed:
            return {}
        return {"preset_base": self._preset, "preset_changed": changed}

    # ---- regions from Labels layers ----------------------------------------------------------
    def set_region_layers(self, layers: Any) -> None:
        """List the viewer's Labels layers as regions (the plugin's own results only when
        asked), keeping the current choice if its layer still exists (renamed or not)."""
        from napari.layers import Labels

        labels = [layer for layer in layers if isinstance(layer, Labels)]
        self._plugin_layers = [layer for layer in labels if _is_plugin_output(layer)]
        self._all_labels = labels
        self.region_results.setVisible(bool(self._plugin_layers))
        self._list_region_layers()

    def _list_region_layers(self) -> None:
        current = self.region_layer()
        text = self.regions.currentText()
        show_results = self.region_results.isChecked()
        self._region_layers = [layer for layer in self._all_labels
                               if show_results or layer not in self._plugin_layers]
        self.regions.blockSignals(True)
        while self.regions.count() > 1 + len(REGION_METHOD_ITEMS):
            self.regions.removeItem(self.regions.count() - 1)
        set_items(self.regions, [LAYER_PREFIX + layer.name for layer in self._region_layers])
        if current in self._region_layers:
            self.regions.setCurrentIndex(1 + len(REGION_METHOD_ITEMS)
                                         + self._region_layers.index(current))
        elif text.startswith(LAYER_PREFIX) or self.regions.findText(text) < 0:
            self.regions.setCurrentText(NO_REGIONS)  # its layer is gone: no regions
        self.regions.blockSignals(False)
        if self.region_layer() is not current:
            self._on_regions_changed()

    def region_layer(self) -> Any:
        """The Labels layer chosen as regions, or None."""
        i = self.regions.currentIndex() - 1 - len(REGION_METHOD_ITEMS)
        return self._region_layers[i] if 0 <= i < len(self._region_layers) else None

    def choose_region_layer(self, layer: Any) -> None:
        """Choose ``layer`` (one of the listed Labels layers) as regions."""
        if layer not in self._region_layers:
            raise InvalidInputError(f"{getattr(layer, 'name', layer)!r} is not a listed Labels layer.")
        self.regions.setCurrentIndex(1 + len(REGION_METHOD_ITEMS) + self._region_layers.index(layer))

    def _on_regions_changed(self, *_: Any) -> None:
        self.regions_changed.emit()

    # ---- the rest ----------------------------------------------------------------------------
    def apply_preset(self, *, templates: str, window: int, stride: int) -> None:
        """Settings a model asks for (see :func:`napari_maskclip.demo.recommended_settings`):
        its prompt templates, and sliding windows of the given size and stride."""
        self.templates.setCurrentText(templates)
        self.inference.setCurrentText(INFERENCE_SLIDING)
        self.window.setValue(int(window))
        self.stride.setValue(int(stride))

    def set_student_mode(self, student: bool) -> None:
        """Disable MaskCLIP's settings while a student is the model (confidence maps stay)."""
        for control in (self.preset, self.mode, self.denoise, self.denoise_threshold,
                        self.key_smoothing, self.ks_threshold, self.inference, self.window,
                        self.stride, self.short_side, self.templates, self.temperature,
                        self.min_confidence, self.pamr, self.tlp, self.regions,
                        self.region_results):
            control.setEnabled(not student)
        if not student:
            self.denoise_threshold.setEnabled(self.denoise.isChecked())
            self.ks_threshold.setEnabled(self.key_smoothing.isChecked())
            self._update_windows()

    @staticmethod
    def _unit_spin(value: float) -> QDoubleSpinBox:
        spin = QDoubleSpinBox()
        spin.setRange(0.0, 1.0)
        spin.setSingleStep(0.05)
        spin.setDecimals(2)
        spin.setValue(value)
        return spin

    def _update_windows(self) -> None:
        sliding = self.inference.currentText() == INFERENCE_SLIDING
        self.window.setEnabled(sliding)
        self.stride.setEnabled(sliding)

    def segment_settings(self) -> SegmentSettings:
        """The engine's settings for these choices, checked (InvalidInputError says what to fix).
        The engine's settings module imports no torch, so this runs before any worker starts."""
        return SegmentSettings().replace(**self.overrides()).validate()

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``SegmentSettings.replace``."""
        regions = self.regions.currentText()
        values: dict[str, Any] = {
            "mode": self.mode.currentText(),
            "denoise": self.denoise.isChecked(),
            "denoise_threshold": float(self.denoise_threshold.value()),
            "key_smoothing": self.key_smoothing.isChecked(),
            "ks_threshold": float(self.ks_threshold.value()),
            "templates": self.templates.currentText(),
            "logit_scale": float(self.temperature.value()),
            "short_side": int(self.short_side.value()) or None,
            "background_threshold": float(self.min_confidence.value()) or None,
            "window": None,
            "stride": None,
            "pamr": self.pamr.isChecked(),
            "tlp": self.tlp.isChecked(),
            "regions": (None if regions == NO_REGIONS
                        else "labels" if regions.startswith(LAYER_PREFIX) else regions),
            "precision": self.precision.currentText(),
        }
        inference = self.inference.currentText()
        if inference == INFERENCE_WHOLE:
            values["max_whole_pixels"] = 1 << 62
        elif inference == INFERENCE_SLIDING:
            values["window"] = int(self.window.value())
            values["stride"] = int(self.stride.value())
        if self._preset is not None:
            preset = PRESETS[self._preset]
            # The preset's fields without a control stay in effect while it is chosen.
            values.update({k: preset[k] for k in _HIDDEN_PRESET_FIELDS if k in preset})
            values["preset"] = None if self.preset_changes() else self._preset
        return values

    def keep_confidence(self) -> bool:
        return self.confidence_maps.isChecked()
