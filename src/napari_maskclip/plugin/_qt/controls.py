"""Small Qt building blocks shared by the MaskCLIP, Export and Train panels.

The dock must fit a 1280x800 screen whatever the user typed or remembered: combo boxes are sized
by a minimum number of characters, not by their longest item (a remembered class list can be
1000 px long), and elide; labels that may show a path wrap inside it. The full text is always in
the tooltip.
"""

from __future__ import annotations

import re

from typing import Any

from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLayout,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

__all__ = [
    "WrapLabel", "ask_clip_checkpoint", "ask_model_config", "class_remap_boxes", "fit_combo",
    "page_layout", "row",
    "set_items",
    "small_button",
]

#: Characters a combo box is sized for (it elides what is longer; the tooltip has it all).
COMBO_CHARS = 10
_ZWSP = "\u200b"  # a break opportunity that draws nothing
_LONG_TOKEN = re.compile(r"\S{24,}")


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


def class_remap_boxes() -> tuple[QCheckBox, QCheckBox]:
    """Export's choice for a dataset with other classes, shared by every page that saves into
    one: remap by name, and (only with it) append the classes the dataset lacks."""
    remap = QCheckBox("fit my classes to the dataset's (by name)")
    remap.setToolTip(
        "When the dataset has other classes (or another order): match them by name or "
        "synonym and renumber the labels to the dataset's list. Without it such a dataset is "
        "refused."
    )
    add_classes = QCheckBox("add classes the dataset lacks")
    add_classes.setEnabled(False)
    add_classes.setToolTip(
        "Append new class names to the dataset's list (old samples keep their meaning)."
    )
    remap.toggled.connect(add_classes.setEnabled)
    return remap, add_classes


def page_layout(owner: QWidget, body_layout: QLayout, footer_layout: QLayout) -> None:
    """Lay ``owner`` out as a page of the dock: ``body_layout`` (the choices) in a vertical scroll
    area, and ``footer_layout`` (the action buttons and status line) pinned below it, so Run,
    Export, Start and Cancel stay in sight on a short screen."""
    body = QWidget()
    body.setLayout(body_layout)
    body_layout.addStretch(1)
    scroll = _VerticalScroll()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setWidget(body)
    footer = QWidget()
    footer.setLayout(footer_layout)
    footer_layout.setContentsMargins(6, 2, 6, 6)
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.setSpacing(0)
    outer.addWidget(scroll, 1)
    outer.addWidget(footer)
    owner.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)


class _VerticalScroll(QScrollArea):
    """A scroll area that scrolls up and down only: it asks for the width of its page (plus its
    scrollbar), so the dock is made wide enough and never shows a horizontal scrollbar. The page
    itself stays narrow whatever is typed or remembered (see :func:`fit_combo`)."""

    def __init__(self) -> None:
        super().__init__()
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def _page_width(self, hint: QSize) -> int:
        body = self.widget()
        if body is None:
            return hint.width()
        extra = self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return max(hint.width(), body.minimumSizeHint().width() + extra)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = super().minimumSizeHint()
        return QSize(self._page_width(hint), hint.height())

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        return QSize(self._page_width(hint), hint.height())

    def eventFilter(self, watched: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # the page's minimum width may have changed
        return super().eventFilter(watched, event)


def fit_combo(combo: QComboBox, chars: int = COMBO_CHARS) -> QComboBox:
    """Size ``combo`` for ``chars`` characters whatever its items, let it grow with the dock, and
    elide long items in the middle (start and end of a path or list stay readable); its tooltip
    shows the current text in full after the help text."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    combo.view().setTextElideMode(Qt.TextElideMode.ElideMiddle)
    help_text = combo.toolTip()

    def show_current(text: str) -> None:
        base = combo.property("maskclip_help") or help_text
        combo.setToolTip(f"{text}\n\n{base}" if len(text) > chars and base else base or text)

    combo.setProperty("maskclip_help", help_text)
    combo.currentTextChanged.connect(show_current)
    show_current(combo.currentText())
    return combo


def set_items(combo: QComboBox, items: list[str]) -> None:
    """Add ``items`` to ``combo``, each with its full text as its tooltip (the list elides)."""
    for text in items:
        combo.addItem(text)
        combo.setItemData(combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole)


class WrapLabel(QLabel):
    """A word-wrapped label that also wraps long paths and lists inside them, so a long file name
    never widens the dock; the tooltip shows the text unchanged."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt's name)
        self._full = text
        super().setText(_LONG_TOKEN.sub(_breakable, text))
        self.setToolTip(text if _LONG_TOKEN.search(text) else "")

    def full_text(self) -> str:
        """The text as given (without the invisible break points)."""
        return self._full

    def text(self) -> str:  # noqa: D102 - the text as given, for scripts and tests
        return self._full


def _breakable(match: "re.Match[str]") -> str:
    token = match.group(0)
    out, run = [], 0
    for char in token:
        out.append(char)
        run += 1
        if char in "/\\_-.,;:" or run >= 16:
            out.append(_ZWSP)
            run = 0
    return "".join(out)


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
