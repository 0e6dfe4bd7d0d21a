"""PAMR (engine/pamr.py) against a brute-force reference written from the method's description.

The reference loops over pixels in float64 and reads neighbours by clamping coordinates (the
replicate border), independently of the engine's padded-slice implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine_helpers import reference_pamr
from napari_maskclip.engine import pamr as pamr_module
from napari_maskclip.engine.pamr import pamr, pamr_halo


def _inputs(h=11, w=13, c=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((c, h, w)).astype(np.float32)
    image[:, :, w // 2:] += 1.5  # an edge
    scores = rng.random((k, h, w)).astype(np.float32)
    return image, scores


@pytest.mark.parametrize("dilations", [(1, 2), (1,), (2, 3), (8, 16)])
def test_pamr_matches_bruteforce(dilations):
    image, scores = _inputs()
    out = pamr(torch.from_numpy(image), torch.from_numpy(scores), iterations=3, dilations=dilations)
    ref = reference_pamr(image, scores, 3, dilations)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5, rtol=0)


def test_pamr_one_channel_guide_and_batch():
    image, scores = _inputs(c=1, seed=1)
    image2, scores2 = _inputs(c=1, seed=2)
    batch = pamr(torch.from_numpy(np.stack([image, image2])),
                 torch.from_numpy(np.stack([scores, scores2])), iterations=2, dilations=(1, 2))
    ref2 = reference_pamr(image2, scores2, 2, (1, 2))
    np.testing.assert_allclose(batch[1].numpy(), ref2, atol=1e-5, rtol=0)


def test_pamr_tiles_with_halo_equal_the_whole_image():
    image, scores = _inputs(h=53, w=47, seed=3)
    img, sc = torch.from_numpy(image), torch.from_numpy(scores)
    whole = pamr(img, sc, iterations=4, dilations=(1, 2), tile=1000)
    tiled = pamr(img, sc, iterations=4, dilations=(1, 2), tile=9)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    # The halo is what makes it exact: without it the tile borders differ.
    assert pamr_halo(4, (1, 2)) == 8


def test_pamr_working_memory_is_bounded_by_the_tile(monkeypatch):
    seen = []
    original = pamr_module._refine_whole

    def spy(image, scores, iterations, dilations):
        seen.append(tuple(scores.shape[-2:]))
        return original(image, scores, iterations, dilations)

    monkeypatch.setattr(pamr_module, "_refine_whole", spy)
    image, scores = _inputs(h=100, w=90, seed=4)
    pamr(torch.from_numpy(image), torch.from_numpy(scores), iterations=2, dilations=(1, 2), tile=20)
    halo = pamr_halo(2, (1, 2))
    assert len(seen) == math.ceil(100 / 20) * math.ceil(90 / 20)
    assert max(max(s) for s in seen) <= 20 + 2 * halo


def test_pamr_keeps_a_convex_combination_and_snaps_to_edges():
    """Probabilities stay probabilities; a blurry boundary is pulled onto the image's edge."""
    h, w = 24, 24
    image = np.zeros((3, h, w), np.float32)
    image[:, :, 12:] = 1.0
    image += np.random.default_rng(5).normal(0, 0.01, image.shape).astype(np.float32)
    ramp = np.clip((np.arange(w) - 6) / 12.0, 0, 1)  # boundary smeared over columns 6..18
    p1 = np.broadcast_to(ramp, (h, w)).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    out = pamr(torch.from_numpy(image), torch.from_numpy(probs), iterations=10, dilations=(1, 2)).numpy()
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    truth = np.zeros((h, w), int)
    truth[:, 12:] = 1
    before = (probs.argmax(0) == truth).mean()
    after = (out.argmax(0) == truth).mean()
    assert after > before and after == 1.0


def test_pamr_refuses_mismatched_guide():
    with pytest.raises(ValueError):
        pamr(torch.zeros(3, 5, 5), torch.zeros(2, 5, 6))
