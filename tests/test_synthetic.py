"""Synthetic scenes: deterministic, exact masks, captions that name what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.synthetic import (
    BACKGROUND_NAME,
    BACKGROUND_NAMES,
    CLASS_NAMES,
    TEMPLATE,
    caption_for,
    make_batch,
    make_scene,
)


def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = make_scene(5), make_scene(5), make_scene(6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_mask_is_exact_and_objects_account_for_every_labelled_pixel():
    for scene in make_batch(11, 24, (80, 72), (1, 4)):
        assert scene.image.shape == (80, 72, 3) and scene.image.dtype == np.uint8
        assert scene.mask.shape == (80, 72) and scene.mask.dtype == np.uint8
        present = set(np.unique(scene.mask)) - {0}
        assert present == set(scene.class_ids)
        per_class = np.bincount(scene.mask.ravel(), minlength=len(CLASS_NAMES) + 1)
        for cls in present:
            assert per_class[cls] == sum(o.area for o in scene.objects if o.class_id == cls)
        assert scene.mask.max() <= len(CLASS_NAMES)


def test_objects_are_saturated_in_their_colour_and_background_is_grey():
    """Colour must be unambiguous: object pixels are saturated, background pixels are not."""
    scenes = make_batch(3, 16, (64, 64), (2, 3), noise=(0.0, 0.0), clutter_prob=1.0)
    for scene in scenes:
        rgb = scene.image.astype(np.float64) / 255
        sat = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1e-6)
        assert np.median(sat[scene.mask == 0]) < 0.3
        for obj in scene.objects:
            pixels = rgb[scene.mask == obj.class_id]
            mean = pixels.mean(0)
            colour = obj.name.split()[0]
            r, g, b = mean
            if colour == "red":
                assert r > g and r > b
            elif colour == "green":
                assert g > r and g > b
            elif colour == "blue":
                assert b > r and b > g
            else:  # yellow
                assert min(r, g) > b


def test_captions_name_each_class_once_and_the_background():
    scene = make_batch(0, 1, (64, 64), classes=[[1, 1, 5]])[0]
    for name in {o.name for o in scene.objects}:
        assert scene.caption.count(name) == 1
    assert scene.background in BACKGROUND_NAMES and scene.background in scene.caption
    plain = make_batch(0, 1, (64, 64), classes=[[1, 5]], caption_background=False)[0]
    assert "background" not in plain.caption
    empty = make_batch(0, 1, (64, 64), classes=[[]], caption_background=False)[0]
    assert empty.caption == TEMPLATE.format(BACKGROUND_NAME) and empty.mask.max() == 0
    assert caption_for([3]) == TEMPLATE.format(CLASS_NAMES[2])
    assert caption_for([1, 2]) == "a photo of a red circle and a red square."


def test_classes_per_scene_must_match_the_count():
    with pytest.raises(ValueError, match="classes"):
        make_batch(0, 2, classes=[[1]])
