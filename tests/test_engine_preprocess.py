"""What the image encoder actually receives for each kind of input image.

The network input is captured at ``visual.conv1`` and compared with the documented conversion:
0..1 intensities (uint8 / 255, floats in 0..1 kept, robust 1st-99.8th percentiles otherwise),
OpenAI CLIP's mean/std, zero padding (after normalisation) to a multiple of the patch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import OPENAI_MEAN, OPENAI_STD, EncoderCalls, normalise_pixels, pad_to_patch
from napari_maskclip.engine import Segmenter

H, W = 36, 44  # not multiples of the 8-px patch: padding is exercised too


@pytest.fixture
def seg(tiny_vit):
    return Segmenter(tiny_vit, templates="single", denoise=False, text_cache=None)


def _network_input(seg, image, **kw) -> torch.Tensor:
    with EncoderCalls(seg.loaded.visual) as calls:
        seg.encode(image, **kw)
    (x,) = calls.inputs
    return x


def _expected(unit_rgb: np.ndarray) -> torch.Tensor:
    return pad_to_patch(normalise_pixels(unit_rgb), 8)


def _check(seg, image, unit_rgb, atol=1e-5, **kw):
    x = _network_input(seg, image, **kw)
    torch.testing.assert_close(x.to(torch.float64), _expected(unit_rgb), atol=atol, rtol=0)


def _percentile_unit(data: np.ndarray, axis=None) -> np.ndarray:
    data = data.astype(np.float64)
    lo = np.percentile(data, 1.0, axis=axis, keepdims=True)
    hi = np.percentile(data, 99.8, axis=axis, keepdims=True)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0)


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_uint8_rgb_is_divided_by_255(seg):
    image = _rng().integers(0, 256, (H, W, 3), dtype=np.uint8)
    _check(seg, image, image / 255.0)


def test_gray_image_is_repeated_to_rgb(seg):
    gray = _rng(1).integers(0, 256, (H, W), dtype=np.uint8)
    _check(seg, gray, np.repeat(gray[..., None], 3, axis=-1) / 255.0)
    _check(seg, gray[..., None], np.repeat(gray[..., None], 3, axis=-1) / 255.0)


def test_rgba_drops_alpha(seg):
    rgba = _rng(2).integers(0, 256, (H, W, 4), dtype=np.uint8)
    _check(seg, rgba, rgba[..., :3] / 255.0)


def test_float_in_unit_range_is_kept(seg):
    image = _rng(3).random((H, W, 3)).astype(np.float32)
    _check(seg, image, image.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int32])
def test_other_ranges_use_joint_robust_percentiles(seg, dtype):
    image = (_rng(4).gamma(2.0, 800.0, (H, W, 3))).astype(dtype)
    image[0, 0] = 60000  # an outlier the percentiles ignore
    _check(seg, image, _percentile_unit(image), atol=1e-4)


def test_uint16_gray(seg):
    gray = _rng(5).integers(100, 4000, (H, W), dtype=np.uint16)
    unit = _percentile_unit(gray)
    _check(seg, gray, np.repeat(unit[..., None], 3, axis=-1), atol=1e-4)


def test_multichannel_picks_three_channels_scaled_per_channel(seg):
    stack = np.stack([_rng(10 + c).integers(0, 1000 * (c + 1), (H, W)) for c in range(5)]).astype(np.uint16)
    picked = np.stack([stack[4], stack[1], stack[0]], axis=-1)
    _check(seg, stack, _percentile_unit(picked, axis=(0, 1)), atol=1e-4, channel_axis=0, channels=[4, 1, 0])


def test_multichannel_single_channel_shown_as_gray(seg):
    stack = _rng(6).integers(0, 256, (H, W, 6), dtype=np.uint8)
    unit = np.repeat(stack[..., 2:3], 3, axis=-1) / 255.0
    _check(seg, stack, unit, channels=[2])


def test_channel_first_rgb_with_channel_axis(seg):
    rgb = _rng(7).integers(0, 256, (H, W, 3), dtype=np.uint8)
    _check(seg, np.moveaxis(rgb, -1, 0), rgb / 255.0, channel_axis=0)


def test_bool_image(seg):
    mask = _rng(8).random((H, W)) > 0.5
    _check(seg, mask, np.repeat(mask[..., None], 3, axis=-1).astype(np.float64))


def test_openai_mean_std_is_applied(seg):
    mean_colour = np.broadcast_to(np.array(OPENAI_MEAN, dtype=np.float32), (32, 40, 3)).copy()
    x = _network_input(seg, mean_colour)
    assert x.abs().max() < 1e-5  # the mean colour is CLIP's zero
    white = np.ones((32, 40, 3), dtype=np.float32)
    x = _network_input(seg, white)
    expected = (1.0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(x[0, :, 5, 7], expected, atol=1e-5, rtol=0)


def test_different_input_types_of_the_same_picture_give_the_same_labels(seg):
    rgb = _rng(9).integers(0, 256, (H, W, 3), dtype=np.uint8)
    base = seg(rgb, "cat, dog, tree")
    for other in (rgb.astype(np.float32) / 255.0,
                  np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=-1)):
        result = seg(other, "cat, dog, tree")
        np.testing.assert_allclose(result.probabilities, base.probabilities, atol=1e-5, rtol=0)
        assert np.array_equal(result.labels, base.labels)
