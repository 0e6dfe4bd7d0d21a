"""The UI-free MaskCLIP engine: model loading, dense features, text embeddings, refinements,
tiled inference and caches. Imports neither napari nor Qt.

Typical use::

    from napari_maskclip.engine import Segmenter
    seg = Segmenter("ViT-B-16", "openai")          # or Segmenter("demo") offline
    result = seg(image, "cat, dog; puppy", background="background")
    result.labels, result.probabilities, result.class_names
"""

from .dense import MODES, DenseOutput, dense_features
from .features import ImageFeatures
from .loading import DEMO_MODEL, RANDOM_WEIGHTS, LoadedModel, load_clip, wrap_model
from .result import SegmentationResult
from .segmenter import Segmenter
from .settings import SegmentSettings
from .templates import maskclip_templates, resolve_templates
from .text import TextEmbeddingCache, TextEncoder

__all__ = [
    "MODES",
    "DEMO_MODEL",
    "RANDOM_WEIGHTS",
    "DenseOutput",
    "ImageFeatures",
    "LoadedModel",
    "SegmentSettings",
    "SegmentationResult",
    "Segmenter",
    "TextEmbeddingCache",
    "TextEncoder",
    "dense_features",
    "load_clip",
    "maskclip_templates",
    "resolve_templates",
    "wrap_model",
]
