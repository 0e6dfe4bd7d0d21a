"""Bad input gets a clear, typed error before any expensive work."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import EncoderCalls, random_rgb
from napari_maskclip.engine import Segmenter, SegmentSettings
from napari_maskclip.errors import InvalidInputError, UnsupportedModelError


@pytest.fixture
def seg(tiny_vit):
    return Segmenter(tiny_vit, templates="single", denoise=False, text_cache=None)


# ---- class lists --------------------------------------------------------------------------
@pytest.mark.parametrize("classes", ["", "  ", " , ,\n", [], ["cat", ""], ["cat", "   "],
                                     ["; "], "cat, Cat", "dog; puppy, puppy", "dog; dog",
                                     ["cat", "dog; CAT"], [3]])
def test_bad_class_lists_are_refused_before_encoding(seg, tiny_vit, classes):
    with EncoderCalls(tiny_vit.visual) as calls:
        with pytest.raises(InvalidInputError) as info:
            seg(random_rgb(32, 32), classes)
    assert calls.count == 0
    assert str(info.value)


def test_trailing_separators_are_harmless(seg):
    result = seg(random_rgb(32, 32), "cat, dog,\n")
    assert result.class_names == ["cat", "dog"]


def test_empty_class_list_on_cached_features_is_refused(seg):
    features = seg.encode(random_rgb(32, 32))
    with pytest.raises(InvalidInputError):
        seg.segment(features, "")


# ---- images -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 5, 3), (7, 100), (100, 7, 3)])
def test_image_smaller_than_a_patch(seg, shape):
    with pytest.raises(InvalidInputError, match="patch"):
        seg(np.zeros(shape, np.uint8), "cat")


def test_image_smaller_than_a_patch_after_resizing(seg):
    with pytest.raises(InvalidInputError):
        seg(np.zeros((64, 64, 3), np.uint8), "cat", short_side=4)


def test_resnet_image_smaller_than_its_stride(tiny_resnet):
    seg = Segmenter(tiny_resnet, templates="single", text_cache=None)
    with pytest.raises(InvalidInputError):
        seg(np.zeros((20, 40, 3), np.uint8), "cat")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(seg, tiny_vit, bad):
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    image[3, 4, 1] = bad
    with EncoderCalls(tiny_vit.visual) as calls, pytest.raises(InvalidInputError, match="(?i)nan|infinite"):
        seg(image, "cat")
    assert calls.count == 0


@pytest.mark.parametrize("shape", [
    (2, 32, 32, 3), (1, 2, 32, 32, 3), (32,), (32, 32, 5), (32, 32, 2),
    (0, 0), (0, 32, 3),
])
def test_wrong_dimensions(seg, shape):
    with pytest.raises(InvalidInputError):
        seg(np.zeros(shape, np.uint8), "cat")


def test_bad_channel_choices(seg):
    stack = np.zeros((5, 32, 32), np.uint16)
    with pytest.raises(InvalidInputError):
        seg(stack, "cat", channel_axis=0, channels=[0, 1])
    with pytest.raises(InvalidInputError):
        seg(stack, "cat", channel_axis=0, channels=[7])
    with pytest.raises(InvalidInputError):
        seg(stack, "cat", channel_axis=5, channels=[0])


def test_complex_and_object_images(seg):
    with pytest.raises(InvalidInputError):
        seg(np.zeros((32, 32), np.complex64), "cat")
    with pytest.raises(InvalidInputError):
        seg(np.array([[object()] * 32] * 32), "cat")


# ---- settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [
    {"window": 32, "stride": 64},
    {"window": -8},
    {"window": 0},
    {"short_side": 1.5},
    {"denoise_threshold": 1.5},
    {"ks_threshold": -0.1},
    {"background_threshold": 2.0},
    {"logit_scale": 0.0},
    {"window_batch": 0},
    {"mode": "maskclip+"},
    {"templates": "no-such-set"},
    {"max_whole_pixels": 0},
])
def test_impossible_settings(tiny_vit, seg, changes):
    with pytest.raises(InvalidInputError):
        Segmenter(tiny_vit, text_cache=None, **changes)
    with pytest.raises(InvalidInputError):
        seg(random_rgb(32, 32), "cat", **changes)


def test_unknown_setting_name(seg):
    with pytest.raises(InvalidInputError, match="windw"):
        seg(random_rgb(32, 32), "cat", windw=64)
    with pytest.raises(InvalidInputError):
        SegmentSettings().replace(windw=64)


def test_window_smaller_than_a_patch(seg):
    with pytest.raises(InvalidInputError):
        seg(random_rgb(64, 64), "cat", window=4, stride=4)


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip", "naive"])
def test_vit_only_modes_with_a_resnet(tiny_resnet, mode):
    with pytest.raises(UnsupportedModelError):
        Segmenter(tiny_resnet, text_cache=None, mode=mode)
    seg = Segmenter(tiny_resnet, text_cache=None, templates="single")
    with pytest.raises(UnsupportedModelError, match="(?i)vit"):
        seg(random_rgb(64, 64), "cat", mode=mode)


def test_settings_round_trip():
    s = SegmentSettings(mode="sclip", window=448, templates=("a {}.", "the {}."), background_threshold=0.3)
    assert SegmentSettings.from_dict(s.to_dict()) == s
    assert s.replace(window=224).window == 224 and s.window == 448


@pytest.mark.parametrize("templates", [("a photo of a cat.",), ("{} and {}",), ()])
def test_bad_custom_templates_are_refused_before_encoding(seg, tiny_vit, templates):
    with EncoderCalls(tiny_vit.visual) as calls:
        with pytest.raises(InvalidInputError):
            seg(random_rgb(32, 32), "cat", templates=templates)
    assert calls.count == 0, "the image was encoded before the templates were checked"


@pytest.mark.parametrize("shape", [(0, 0), (0, 32, 3), (32, 0)])
def test_prepare_image_rejects_empty_images(shape):
    from napari_maskclip.engine.preprocess import prepare_image

    with pytest.raises(InvalidInputError):
        prepare_image(np.zeros(shape, np.uint8))
