"""Small Qt building blocks shared by the MaskCLIP, Export and Train panels."""

from __future__ import annotations

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QPushButton, QWidget

__all__ = ["ask_clip_checkpoint", "ask_model_config", "row", "small_button"]


def row(*widgets: QWidget) -> QWidget:
    """Widgets side by side, without margins (one row of a form)."""
    box = QWidget()
    layout = QHBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        layout.addWidget(w)
    return box


def small_button(text: str, tip: str) -> QPushButton:
    """A narrow button such as the "..." of a file field."""
    button = QPushButton(text)
    button.setFixedWidth(32)
    button.setToolTip(tip)
    return button


def ask_model_config(parent: QWidget) -> str:
    """The path of an open_clip model-config JSON the user picks ("" if cancelled)."""
    path, _ = QFileDialog.getOpenFileName(
        parent, "open_clip model config", "", "Model config (*.json);;All files (*)"
    )
    return path


def ask_clip_checkpoint(parent: QWidget) -> str:
    """The path of a CLIP checkpoint file the user picks ("" if cancelled)."""
    path, _ = QFileDialog.getOpenFileName(
        parent, "CLIP checkpoint", "",
        "Checkpoints (*.safetensors *.pt *.pth *.bin);;All files (*)",
    )
    return path
