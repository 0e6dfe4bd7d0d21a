"""How the plugin's panels tell the user about problems: one rule for every panel.

Errors the user can fix (:class:`~napari_maskclip.errors.MaskClipError`: a refused export, a
missing file, weights unavailable offline...) become a plain napari notification with the
message; anything else is a bug and goes to napari's error notification with its traceback.
Nothing is raised out of a panel.
"""

from __future__ import annotations

from ..errors import MaskClipError

__all__ = ["notify", "show_exception"]


def notify(message: str, *, error: bool = False) -> None:
    from napari.utils.notifications import show_error, show_warning

    (show_error if error else show_warning)(message)


def show_exception(exc: BaseException) -> str:
    """Show ``exc`` as described above; returns the one-line text for a status line."""
    if isinstance(exc, MaskClipError):
        notify(str(exc), error=True)
        return f"Error: {exc}"
    from napari.utils.notifications import notification_manager

    notification_manager.receive_error(type(exc), exc, exc.__traceback__)
    return f"Unexpected error ({type(exc).__name__}): {exc}"
