"""The project's exceptions.

Every expected failure (bad input, missing weights, unsupported model, cancelled work) raises one of
these, with a message that tells the user what to do next. The widget shows the message as a
notification and the CLI prints it as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Optional


class MaskClipError(Exception):
    """Base class of every error napari-maskclip raises on purpose."""


class InvalidInputError(MaskClipError, ValueError):
    """The image, class list or a setting cannot be used as given."""


class ModelLoadError(MaskClipError):
    """The model name, config or checkpoint cannot be turned into a CLIP model."""


class WeightsUnavailableError(ModelLoadError):
    """Pretrained weights are neither cached locally nor downloadable (e.g. offline).

    The message says what to do with the CLI's options; ``model``, ``tag``, ``reason`` and
    ``cache`` (when known) let a UI say it with its own controls."""

    def __init__(self, message: str, *, model: Optional[str] = None, tag: Optional[str] = None,
                 reason: Optional[str] = None, cache: Optional[str] = None) -> None:
        super().__init__(message)
        self.model, self.tag, self.reason, self.cache = model, tag, reason, cache


class UnsafeCheckpointError(ModelLoadError):
    """A checkpoint needs arbitrary code to load (a full pickle) and was refused."""


class UnsupportedModelError(ModelLoadError):
    """The model family or an option does not support MaskCLIP's dense read-out."""


class DatasetError(MaskClipError):
    """An export or a dataset on disk is inconsistent (classes differ, sample exists...)."""


class Cancelled(MaskClipError):
    """Long work was stopped by the user; nothing partial was kept."""


class PreferencesError(MaskClipError):
    """Something the user chose to keep (e.g. a class colour) cannot be saved in the config dir."""


class OutputError(MaskClipError):
    """A result cannot be written where asked (a folder in the way, a read-only or full disk,
    another run writing the same file)."""
