"""The demo's scene and vocabulary: what ``napari-maskclip demo`` and the Shapes sample show.

A deterministic synthetic scene (:mod:`napari_maskclip.synthetic`) whose shapes have the pixel
size the demo model was trained at, and the class and background names that model knows, as the
widget's text boxes and the CLI take them. Torch-free; the scene code (scikit-image) loads only
when a scene is made, so the CLI can import this module at start-up.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from . import demo_model_files

if TYPE_CHECKING:  # pragma: no cover
    from ..synthetic import Scene

__all__ = ["DEMO_SEED", "DEMO_SIZE", "demo_classes", "demo_scene"]

DEMO_SEED = 3
DEMO_SIZE = (192, 256)


def demo_scene(seed: int = DEMO_SEED, size: tuple[int, int] = DEMO_SIZE) -> "Scene":
    """The demo's synthetic scene (deterministic): several shapes on a textured background.

    The shapes have the pixel size the demo model was trained at (it saw 64 px scenes), so a
    larger scene holds more of them rather than bigger ones.
    """
    from ..synthetic import make_scene

    train_size, radius = 64, (0.1, 0.25)
    try:
        vocab = json.loads(demo_model_files(check=False).vocab.read_text())
        train_size = int(vocab.get("image_size", train_size))
        radius = tuple(vocab.get("data", {}).get("radius_frac", radius))
    except (FileNotFoundError, ValueError):  # no shipped model: the defaults it was trained with
        pass
    scale = train_size / min(size)
    return make_scene(seed, size=size, n_objects=(7, 11),
                      radius_frac=(radius[0] * scale, radius[1] * scale))


def demo_classes() -> tuple[str, str]:
    """(class names, background names) the demo model knows, as the widget's boxes take them."""
    from ..synthetic import BACKGROUND_NAME, CLASS_NAMES

    return ", ".join(CLASS_NAMES), BACKGROUND_NAME
