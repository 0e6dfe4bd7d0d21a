"""What the widget remembers between sessions: recent class lists, the last model choice, recent
student checkpoints, and the Export/Train panels' last folders and files.

Stored as one small JSON file in the user's config directory (platformdirs
``user_config_dir("napari-maskclip")``; ``NAPARI_MASKCLIP_CONFIG_DIR`` overrides it, e.g. for
tests), written atomically so a crash never leaves a half-written file. A missing or unreadable
file means "nothing remembered yet", never an error: preferences must not stop anyone working.
Imports neither torch nor Qt.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..atomic import atomic_write_text

__all__ = [
    "CONFIG_ENV", "WidgetPreferences", "config_dir", "preferences_path", "update_preferences",
]

CONFIG_ENV = "NAPARI_MASKCLIP_CONFIG_DIR"
_FILE = "widget.json"
#: How many recent class lists (and background lists) are kept.
MAX_RECENT = 12


def config_dir() -> Path:
    """The folder holding the widget's preferences (created on first write)."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-maskclip"))


def preferences_path() -> Path:
    return config_dir() / _FILE


def _push_recent(items: list[str], text: str) -> list[str]:
    """Most recent first, without duplicates (compared ignoring case and spacing)."""
    text = text.strip()
    if not text:
        return items
    key = " ".join(text.split()).casefold()
    rest = [item for item in items if " ".join(item.split()).casefold() != key]
    return ([text] + rest)[:MAX_RECENT]


@dataclass
class WidgetPreferences:
    """Recent class lists (most recent first) and the last model the user ran."""

    recent_classes: list[str] = field(default_factory=list)
    recent_background: list[str] = field(default_factory=list)
    model: Optional[str] = None
    pretrained: Optional[str] = None
    #: Student checkpoints used or trained recently (most recent first).
    recent_students: list[str] = field(default_factory=list)
    #: The last dataset folder exported to (the Export and Train panels start there).
    last_dataset: Optional[str] = None

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "WidgetPreferences":
        path = path or preferences_path()
        try:
            raw: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        if not isinstance(raw, dict):
            return cls()

        def strings(key: str) -> list[str]:
            value = raw.get(key)
            if not isinstance(value, list):
                return []
            return [v for v in value if isinstance(v, str) and v.strip()][:MAX_RECENT]

        def text(key: str) -> Optional[str]:
            value = raw.get(key)
            return value if isinstance(value, str) and value.strip() else None

        return cls(
            recent_classes=strings("recent_classes"),
            recent_background=strings("recent_background"),
            model=text("model"),
            pretrained=text("pretrained"),
            recent_students=strings("recent_students"),
            last_dataset=text("last_dataset"),
        )

    def remember_run(self, classes: str, background: str, model: str, pretrained: str) -> None:
        """Record what a successful run used."""
        self.recent_classes = _push_recent(self.recent_classes, classes)
        self.recent_background = _push_recent(self.recent_background, background)
        self.model = model.strip() or None
        self.pretrained = pretrained.strip() or None

    def remember_student(self, checkpoint: str) -> None:
        """Record a student checkpoint that was trained or used."""
        self.recent_students = _push_recent(self.recent_students, str(checkpoint))

    def save(self, path: Optional[Path] = None) -> bool:
        """Write atomically; returns False (and keeps working) if the folder is not writable."""
        path = path or preferences_path()
        try:
            atomic_write_text(path, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        except OSError:
            return False
        return True


def update_preferences(change: Callable[[WidgetPreferences], None]) -> WidgetPreferences:
    """Read the file, apply ``change``, write it back; returns the new preferences.

    Each panel changes only its own fields on a fresh read, so panels open side by side never
    overwrite what another one remembered.
    """
    prefs = WidgetPreferences.load()
    change(prefs)
    prefs.save()
    return prefs
