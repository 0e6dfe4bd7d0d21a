"""Where napari-maskclip keeps what it remembers for the user (class colours, plugin preferences).

The user's config directory (platformdirs ``user_config_dir("napari-maskclip")``), overridable
with ``NAPARI_MASKCLIP_CONFIG_DIR`` (tests, shared machines, read-only homes). Defined in the core,
not the plugin, because the core's class colours live there too. Caches live elsewhere
(:mod:`napari_maskclip.engine.cache_dir`): deleting a cache must never lose a user's choices.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONFIG_ENV", "user_config_dir"]

CONFIG_ENV = "NAPARI_MASKCLIP_CONFIG_DIR"


def user_config_dir() -> Path:
    """The folder for what napari-maskclip remembers (not created here)."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("napari-maskclip"))
