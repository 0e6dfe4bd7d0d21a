"""Sample images for the File > Open Sample menu, each with class names worth trying.

Natural photos shipped with scikit-image (no download). Each layer carries suggested class names
(a :class:`~.records.SampleSuggestion` in its metadata); the MaskCLIP widget fills them in when
its class box is empty, so a first run is one click. Imports neither torch nor Qt.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..engine.names import DEMO_MODEL
from .records import SampleSuggestion

__all__ = ["SAMPLES", "astronaut", "cat", "coffee", "rocket", "shapes"]

LayerData = list[tuple[np.ndarray, dict[str, Any]]]

#: name -> (scikit-image loader, suggested classes, suggested background, description)
SAMPLES: dict[str, tuple[str, str, str, str]] = {
    "cat": ("chelsea", "cat, eye, nose", "background; wall",
            "Chelsea the cat (scikit-image), 451x300 RGB"),
    "astronaut": ("astronaut", "astronaut; person, flag, rocket", "background; sky",
                  "Eileen Collins (NASA, via scikit-image), 512x512 RGB"),
    "coffee": ("coffee", "coffee cup; mug, saucer; plate, spoon", "wooden table; table",
               "A cup of coffee (scikit-image), 600x400 RGB"),
    "rocket": ("rocket", "rocket, launch tower; tower, lights", "sky; night sky",
               "A rocket on its launch pad (SpaceX, via scikit-image), 640x427 RGB"),
}


def _sample(name: str) -> LayerData:
    import skimage.data

    loader, classes, background, description = SAMPLES[name]
    image: np.ndarray = getattr(skimage.data, loader)()
    meta = SampleSuggestion(classes, background, description=description).to_metadata()
    return [(image, {"name": name, "rgb": True, "metadata": meta})]


def _make(name: str) -> Callable[[], LayerData]:
    def load() -> LayerData:
        return _sample(name)

    load.__name__ = name
    load.__doc__ = f"{SAMPLES[name][3]}; suggested classes: {SAMPLES[name][1]}."
    return load


cat = _make("cat")
astronaut = _make("astronaut")
coffee = _make("coffee")
rocket = _make("rocket")


def shapes() -> LayerData:
    """A synthetic shapes scene for the offline demo model (no download, no real CLIP needed).

    The layer suggests the demo model, its 12 classes and its background name, so the widget is
    ready to run as soon as the sample opens.
    """
    from ..demo.scene import demo_classes, demo_scene

    scene = demo_scene()
    classes, background = demo_classes()
    meta = SampleSuggestion(
        classes, background, model=DEMO_MODEL,
        description="Synthetic shapes scene for the offline demo model",
    ).to_metadata()
    return [(scene.image, {"name": "shapes (demo)", "rgb": True, "metadata": meta})]
