"""Stacks, channels and lazy data for the widget: layouts, slice-by-slice reading, outputs.

No Qt here: the stack job is plain Python over the tiny random ViT.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.plugin.stack_run import StackLayout, StackRequest, segment_stack_iter
from napari_maskclip.errors import InvalidInputError
from napari_maskclip.progress import run_to_completion


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


def test_layout_axes_for_stacks_time_series_and_rgb():
    stack = StackLayout((4, 5, 32, 40))
    assert stack.loop_axes == (0, 1)
    assert stack.output_shape == (4, 5, 32, 40)
    assert stack.n_slices == 20
    assert len(stack.all_slices()) == 20
    rgb = StackLayout((6, 32, 40, 3), rgb=True)
    assert rgb.ndim == 3 and rgb.loop_axes == (0,) and rgb.output_shape == (6, 32, 40)
    assert StackLayout((32, 40)).all_slices() == [()]


def test_layout_channel_axes():
    leading = StackLayout((5, 32, 40), channel_axis=0)
    assert leading.loop_axes == () and leading.output_shape == (32, 40)
    middle = StackLayout((3, 4, 32, 40), channel_axis=1)
    assert middle.loop_axes == (0,)
    assert middle.output_shape == (3, 1, 32, 40)
    assert middle.output_index((2,)) == (2, 0, slice(None), slice(None))
    scale, translate = middle.output_scale_translate([2.0, 1.5, 0.5, 0.5], [10.0, 3.0, 0.0, 1.0])
    # The kept channel axis spans all 4 channels: every channel position maps to output index 0.
    assert scale == [2.0, 6.0, 0.5, 0.5]
    assert translate == [10.0, 3.0 + 1.5 * 1.5, 0.0, 1.0]
    for c in range(4):
        world = 3.0 + 1.5 * c
        assert round((world - translate[1]) / scale[1]) == 0


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((32, 40, 3), {"rgb": True, "channel_axis": 0}, "RGB"),
        ((5, 32, 40), {"channel_axis": 1}, "not available"),
        ((32, 40), {"channel_axis": 0}, "2D layer"),
        ((40,), {}, "at least 2 axes"),
        ((0, 40), {}, "empty"),
    ],
)
def test_layout_rejects_impossible_choices(shape, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        StackLayout(shape, **kwargs)


def test_slice_at_rounds_and_clips_the_viewer_point():
    layout = StackLayout((3, 7, 32, 40))
    assert layout.slice_at([1.4, 5.6, 10.0, 3.0]) == (1, 6)
    assert layout.slice_at([-3.0, 99.0, 0.0, 0.0]) == (0, 6)
    assert layout.slice_at([np.nan, 2.0, 0, 0]) == (0, 2)
    # A point with extra leading world axes uses the trailing ones.
    assert layout.slice_at([9.0, 2.0, 3.0, 0.0, 0.0]) == (2, 3)


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
