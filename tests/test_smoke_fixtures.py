import numpy as np


def test_tiny_vit_segments_an_rgb_image(tiny_segmenter):
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    result = tiny_segmenter(image, "cat, dog; puppy")
    assert result.labels.shape == (40, 56)
    assert result.probabilities.shape == (2, 40, 56)
    assert result.class_names == ["cat", "dog"]
    assert set(np.unique(result.labels)) <= {1, 2}
