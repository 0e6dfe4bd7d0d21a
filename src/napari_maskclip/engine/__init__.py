"""The UI-free MaskCLIP engine: model loading, dense features, text embeddings, refinements,
tiled inference and caches. Imports neither napari nor Qt.

Typical use::

    from napari_maskclip.engine import Segmenter
    seg = Segmenter("ViT-B-16", "openai")          # or Segmenter("demo", None) offline
    result = seg(image, "cat, dog; puppy", background="background")
    result.labels, result.probabilities, result.class_names

Names are imported lazily: ``napari_maskclip.engine.settings``, ``.modes``, ``.preprocess``
and ``.windows`` load without torch, so UIs and CLIs can list options and validate input
before paying for torch (``.names``: model names and the default-weights rule, likewise).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MODES": "modes",
    "DEFAULT_MODEL": "names",
    "DEMO_MODEL": "names",
    "RANDOM_WEIGHTS": "names",
    "DenseOutput": "dense",
    "ImageFeatures": "features",
    "LoadedModel": "loading",
    "SegmentSettings": "settings",
    "SegmentationResult": "result",
    "Segmenter": "segmenter",
    "TextEmbeddingCache": "text",
    "TextEncoder": "text",
    "default_pretrained": "names",
    "dense_features": "dense",
    "load_clip": "loading",
    "maskclip_templates": "templates",
    "resolve_templates": "templates",
    "wrap_model": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
