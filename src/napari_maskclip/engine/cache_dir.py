"""Where napari-maskclip keeps its caches (text embeddings, file digests).

The user's cache directory (``platformdirs``), overridable with ``NAPARI_MASKCLIP_CACHE_DIR``
(tests, shared machines, read-only homes). Downloaded CLIP weights stay in open_clip's and
Hugging Face's own caches, so other tools share them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["user_cache_dir", "weights_cache_hint", "CACHE_ENV"]

CACHE_ENV = "NAPARI_MASKCLIP_CACHE_DIR"


def user_cache_dir() -> Path:
    """The directory for napari-maskclip's own caches (not created here)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-maskclip", appauthor=False))


def weights_cache_hint() -> str:
    """Where open_clip keeps downloaded weights, for error messages."""
    hf_home = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hf_home:
        base = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.join(Path.home(), ".cache")), "huggingface"
        )
        hf_home = os.path.join(base, "hub")
    return hf_home
