"""Sample images: natural photos shipped with scikit-image, each with class names to try."""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.plugin import sample_data as _sample_data
from napari_maskclip.classes import parse_classes


@pytest.mark.parametrize("name", sorted(_sample_data.SAMPLES))
def test_sample_is_an_rgb_photo_with_suggested_classes(name):
    layers = getattr(_sample_data, name)()
    assert len(layers) == 1
    image, kwargs = layers[0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert min(image.shape[:2]) >= 256 and image.std() > 10  # a real photo, not a blank
    assert kwargs["name"] == name and kwargs["rgb"] is True
    meta = kwargs["metadata"]["napari_maskclip"]
    classes = parse_classes(meta["suggested_classes"])
    background = parse_classes(meta["suggested_background"], allow_empty=True)
    parse_classes(classes + background)  # no name in both lists
    assert len(classes) >= 2


def test_samples_are_distinct_images():
    shapes = {getattr(_sample_data, n)()[0][0].shape for n in _sample_data.SAMPLES}
    assert len(shapes) == len(_sample_data.SAMPLES)
