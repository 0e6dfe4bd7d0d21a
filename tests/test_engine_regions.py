"""Region voting (engine/regions.py): superpixels, user label images, per-region means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_maskclip.engine.regions import RegionVote, check_regions, region_vote, superpixels
from napari_maskclip.errors import InvalidInputError


def _reference_vote(probs: np.ndarray, regions: np.ndarray) -> np.ndarray:
    out = probs.astype(np.float64).copy()
    for r in np.unique(regions):
        if r == 0:
            continue
        sel = regions == r
        out[:, sel] = probs[:, sel].astype(np.float64).mean(axis=1)[:, None]
    return out


def test_vote_equals_per_region_mean_and_keeps_region_zero():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 17, 19)).astype(np.float32)
    regions = rng.integers(0, 6, (17, 19)).astype(np.int32)
    out = region_vote(torch.from_numpy(probs), regions, block=4).numpy()
    np.testing.assert_allclose(out, _reference_vote(probs, regions), atol=1e-6)
    assert np.array_equal(out[:, regions == 0], probs[:, regions == 0])


def test_vote_in_row_blocks_equals_one_block():
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.random((4, 30, 10)).astype(np.float32))
    regions = rng.integers(1, 5, (30, 10)).astype(np.int32)
    torch.testing.assert_close(region_vote(probs, regions, block=7), region_vote(probs, regions))


def test_vote_gives_each_region_one_label():
    rng = np.random.default_rng(2)
    probs = torch.from_numpy(rng.random((5, 20, 20)).astype(np.float32))
    regions = np.repeat(np.arange(1, 5), 100).reshape(20, 20).astype(np.int32)
    labels = region_vote(probs, regions).argmax(0).numpy()
    for r in range(1, 5):
        assert len(np.unique(labels[regions == r])) == 1


def test_check_regions_compacts_large_ids_and_refuses_bad_input():
    regions = np.array([[0, 7], [1 << 30, 7]], dtype=np.int64)
    out = check_regions(regions, (2, 2))
    assert out.dtype == np.int32 and out[0, 0] == 0
    assert out[0, 1] == out[1, 1] != out[1, 0] and out.max() == 2
    no_zero = check_regions(np.array([[5, 5], [9, 9]]), (2, 2))
    assert no_zero.min() == 1  # without a 0 in the image every id is a region
    with pytest.raises(InvalidInputError, match="same size"):
        check_regions(np.zeros((3, 2), int), (2, 2))
    with pytest.raises(InvalidInputError, match="negative"):
        check_regions(np.array([[-1, 0], [0, 0]]), (2, 2))
    with pytest.raises(InvalidInputError, match="whole numbers"):
        check_regions(np.full((2, 2), 0.5), (2, 2))


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_superpixels_cover_every_pixel_and_follow_edges(method):
    image = np.zeros((40, 40, 3), np.float32)
    image[:, 20:] = 1.0
    params = {"n_segments": 8} if method == "slic" else {"scale": 10.0, "min_size": 10}
    labels = superpixels(image, method, **params)
    assert labels.shape == (40, 40) and labels.min() >= 1
    left, right = set(np.unique(labels[:, :20])), set(np.unique(labels[:, 20:]))
    assert not left & right  # no superpixel straddles the edge


def test_superpixels_unknown_method():
    with pytest.raises(InvalidInputError, match="slic"):
        superpixels(np.zeros((4, 4, 3)), "watershed")


def test_region_vote_accumulator_refuses_nothing_on_empty_regions():
    vote = RegionVote(np.zeros((2, 2), np.int32), 2)
    probs = torch.tensor([[[0.2, 0.8], [0.5, 0.5]], [[0.8, 0.2], [0.5, 0.5]]])
    vote.add(probs, 0)
    assert torch.equal(vote.apply(probs, 0), probs)


def _reference_majority(probs: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """CorrCLIP's vote, written out: per region the share of pixels whose argmax is each class."""
    out = probs.astype(np.float64).copy()
    labels = probs.argmax(axis=0)
    for r in np.unique(regions):
        if r == 0:
            continue
        sel = regions == r
        counts = np.bincount(labels[sel], minlength=probs.shape[0])
        out[:, sel] = (counts / sel.sum())[:, None]
    return out


def test_majority_vote_is_the_most_frequent_label_per_region():
    rng = np.random.default_rng(4)
    probs = rng.random((4, 17, 19)).astype(np.float32)
    regions = rng.integers(0, 6, (17, 19)).astype(np.int32)
    out = region_vote(torch.from_numpy(probs), regions, block=4, rule="majority").numpy()
    np.testing.assert_allclose(out, _reference_majority(probs, regions), atol=1e-6)
    assert np.array_equal(out[:, regions == 0], probs[:, regions == 0])
    # Where the rules disagree: one confident pixel of class 0, two mild ones of class 1.
    p = torch.tensor([[0.9, 0.4, 0.4], [0.1, 0.6, 0.6]]).reshape(2, 1, 3)
    one = np.ones((1, 3), np.int32)
    assert int(region_vote(p, one).argmax(0)[0, 0]) == 0  # mean: 0.57 vs 0.43
    majority = region_vote(p, one, rule="majority")
    assert int(majority.argmax(0)[0, 0]) == 1
    torch.testing.assert_close(majority[:, 0, 0], torch.tensor([1 / 3, 2 / 3]))
    # Ties go to the lowest class index.
    tie = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).reshape(2, 1, 2)
    assert int(region_vote(tie, np.ones((1, 2), np.int32), rule="majority").argmax(0)[0, 0]) == 0
    with pytest.raises(InvalidInputError, match="majority"):
        region_vote(p, one, rule="mode")
