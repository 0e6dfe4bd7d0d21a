"""Stacks, channels and lazy data for the widget: slice-by-slice reading and full-shape outputs.

No Qt here: the stack job is plain Python over the tiny random ViT. (The geometry itself is the
core's: tests/test_stacks.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.errors import InvalidInputError
from napari_maskclip.plugin.stack_run import StackRequest, segment_stack_iter
from napari_maskclip.progress import run_to_completion
from napari_maskclip.stacks import StackLayout


class CountingArray:
    """An array-like that records every read, like a lazy zarr/dask array would perform them."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.reads: list[tuple[int, ...]] = []

    def __getitem__(self, key):
        out = self._data[key]
        self.reads.append(np.shape(out))
        return out

    def __array__(self, dtype=None, copy=None):  # a full load: must never happen
        raise AssertionError("the whole array was loaded")


def test_stack_reads_one_slice_at_a_time_and_fills_only_requested_slices(tiny_segmenter):
    rng = np.random.default_rng(0)
    data = CountingArray((rng.random((4, 40, 48)) * 1000).astype(np.uint16))
    layout = StackLayout(data.shape)
    request = StackRequest(data=data, layout=layout, slices=[(1,), (3,)], classes="cat, dog")
    result = run_to_completion(segment_stack_iter(tiny_segmenter, request))
    assert data.reads == [(40, 48), (40, 48)]
    assert result.labels.shape == (4, 40, 48)
    assert len(result.probabilities) == 2
    assert all(p.shape == (4, 40, 48) and p.dtype == np.float32 for p in result.probabilities)
    # Untouched slices stay empty; computed ones match a direct engine call.
    assert not result.labels[0].any() and not result.probabilities[0][2].any()
    direct = tiny_segmenter(np.asarray(data._data[3]), "cat, dog")
    np.testing.assert_array_equal(result.labels[3], direct.labels)
    np.testing.assert_allclose(result.probabilities[1][3], direct.probabilities[1], atol=1e-6)
    assert result.class_names == ["cat", "dog"]
    assert result.encoded_slices == 2


def test_multichannel_slices_pick_channels(tiny_segmenter):
    rng = np.random.default_rng(1)
    data = (rng.random((2, 5, 40, 48)) * 4000).astype(np.uint16)  # Z, C, Y, X
    layout = StackLayout(data.shape, channel_axis=1)
    request = StackRequest(
        data=data, layout=layout, slices=layout.all_slices(), classes="a, b", channels=(0, 2, 4)
    )
    result = run_to_completion(segment_stack_iter(tiny_segmenter, request))
    assert result.labels.shape == (2, 1, 40, 48)
    direct = tiny_segmenter(data[1], "a, b", channel_axis=0, channels=(0, 2, 4))
    np.testing.assert_array_equal(result.labels[1, 0], direct.labels)


def test_progress_covers_every_slice_and_reaches_one(tiny_segmenter):
    data = np.zeros((3, 32, 32), dtype=np.uint8)
    data[:, 8:20, 8:20] = 200
    layout = StackLayout(data.shape)
    steps = []
    request = StackRequest(data=data, layout=layout, slices=layout.all_slices(), classes="x")
    run_to_completion(segment_stack_iter(tiny_segmenter, request), steps.append)
    fractions = [s.info["fraction"] for s in steps]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert {s.info["slice"] for s in steps} == {0, 1, 2}
    assert "slice 3/3" in steps[-1].message


def test_closing_the_generator_stops_between_windows(tiny_segmenter):
    data = np.random.default_rng(2).random((2, 96, 96)).astype(np.float32)
    layout = StackLayout(data.shape)
    request = StackRequest(data=data, layout=layout, slices=layout.all_slices(), classes="x, y",
                           settings=tiny_segmenter.settings.replace(window=32, stride=16))
    gen = segment_stack_iter(tiny_segmenter, request)
    next(gen)
    next(gen)
    calls = tiny_segmenter.image_encoder_calls
    gen.close()
    assert tiny_segmenter.image_encoder_calls == calls
    assert len(tiny_segmenter.features_cache) == 0  # nothing partial was cached


def test_bad_class_list_fails_before_reading_any_slice(tiny_segmenter):
    data = CountingArray(np.zeros((2, 32, 32), dtype=np.uint8))
    request = StackRequest(data=data, layout=StackLayout(data.shape), slices=[(0,)], classes=" , ")
    with pytest.raises(InvalidInputError, match="No class names"):
        run_to_completion(segment_stack_iter(tiny_segmenter, request))
    assert data.reads == []


def test_memory_budget_is_checked_before_work(tiny_segmenter):
    data = CountingArray(np.zeros((50, 64, 64), dtype=np.uint8))
    layout = StackLayout(data.shape)
    request = StackRequest(data=data, layout=layout, slices=layout.all_slices(),
                           classes="a, b, c", memory_budget=1 << 20)
    with pytest.raises(InvalidInputError, match="confidence maps"):
        run_to_completion(segment_stack_iter(tiny_segmenter, request))
    assert data.reads == []
    request.keep_confidence = False  # labels alone fit
    result = run_to_completion(segment_stack_iter(tiny_segmenter, request))
    assert result.probabilities == [] and result.labels.shape == (50, 64, 64)


def test_region_layer_of_a_stack_is_read_one_slice_at_a_time(tiny_segmenter):
    """Regions shaped like the stack (a Labels layer over every slice) vote slice by slice,
    reading only the slices segmented; a 2D layer serves every slice."""
    from napari_maskclip.plugin.stack_run import check_region_data

    rng = np.random.default_rng(1)
    data = (rng.random((3, 40, 48)) * 255).astype(np.uint8)
    layout = StackLayout(data.shape)
    regions = np.zeros((3, 40, 48), dtype=np.int32)
    regions[:, :, :24] = 1
    regions[:, :, 24:] = 2
    regions[2, :20] = 3  # slice 2 has its own regions
    lazy = CountingArray(regions)
    request = StackRequest(data=data, layout=layout, slices=[(0,), (2,)], classes="cat, dog, sofa",
                           regions=lazy)
    result = run_to_completion(segment_stack_iter(tiny_segmenter, request))
    assert lazy.reads == [(40, 48), (40, 48)]
    for index in (0, 2):
        for region in np.unique(regions[index]):
            assert np.unique(result.labels[index][regions[index] == region]).size == 1
    assert result.settings["regions"] == "labels"
    check_region_data(regions[0], layout)  # one 2D plane: for every slice
    with pytest.raises(InvalidInputError, match="image's slices are 40x48"):
        check_region_data(np.zeros((2, 40, 48)), layout)
