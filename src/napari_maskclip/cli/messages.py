"""The one-line messages live in the core (:mod:`napari_maskclip.messages`); re-exported here."""

from ..messages import one_line, os_error_message

__all__ = ["one_line", "os_error_message"]
