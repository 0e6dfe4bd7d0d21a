"""The core's stack geometry (napari_maskclip.stacks): plane, channel and loop axes, slice keys,
the viewer point -> slice rule, and samples cut from labels (shared by the plugin and the export)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.errors import InvalidInputError
from napari_maskclip.stacks import (
    DEFAULT_AXES,
    SampleAxes,
    StackLayout,
    clamp_index,
    index_of_key,
    leading_axis_names,
    leading_indices,
    slice_key,
)


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


def test_leading_indices_and_slice_keys():
    assert leading_indices((5, 6)) == [()]
    assert leading_indices((2, 3, 5, 6)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert slice_key(()) == "" and slice_key((3,)) == "3"
    assert slice_key((0, 3, slice(None), slice(None))) == "0,3"  # an output index
    for index in leading_indices((2, 3, 5, 6)):
        assert index_of_key(slice_key(index)) == index
    assert index_of_key("") == ()


def test_axis_names_for_sample_names():
    assert leading_axis_names(1) == DEFAULT_AXES[1] == ("z",)
    assert leading_axis_names(2) == ("t", "z")
    assert leading_axis_names(3) == ("d0", "d1", "d2")


def test_clamp_index_aligns_points_by_their_last_axes():
    assert clamp_index([2.6, 4.0, 4.0], (3, 8, 8), [0]) == (2,)
    assert clamp_index([7.0], (3, 8, 8), [0]) == (0,)  # padded in front: the plane's coordinate
    assert clamp_index([1.0, -2.0, 0.0, 0.0], (2, 9, 8, 8), [0, 1]) == (1, 0)
    assert clamp_index([None, 30.0, 0.0, 0.0], (2, 9, 8, 8), [0, 1]) == (0, 8)


def test_read_sample_puts_the_picked_channels_last():
    data = np.arange(2 * 4 * 3 * 5).reshape(2, 4, 3, 5)  # Z x C x H x W
    layout = StackLayout(data.shape, channel_axis=1)
    np.testing.assert_array_equal(layout.read_sample(data, (1,)), np.moveaxis(data[1], 0, -1))
    np.testing.assert_array_equal(layout.read_sample(data, (0,), (0, 2, 3)),
                                  np.moveaxis(data[0, [0, 2, 3]], 0, -1))
    np.testing.assert_array_equal(layout.read_sample(data, (0,), (2,)), data[0, 2])
    assert layout.sample_channels() == (4,)
    assert layout.sample_channels((0, 2, 3)) == (3,) and layout.sample_channels((2,)) == ()
    rgb = StackLayout((2, 3, 5, 3), rgb=True)
    assert rgb.sample_channels() == (3,)
    assert StackLayout((3, 5)).sample_channels() == ()


def test_sample_axes_drop_a_kept_channel_axis():
    layout = StackLayout((2, 4, 3, 5), channel_axis=1)  # labels: 2 x 1 x 3 x 5
    axes = SampleAxes.of(layout.output_shape, layout)
    assert axes.shape == (2, 3, 5) and axes.n_lead == 1
    assert axes.to_output((1,)) == (1, 0) and axes.from_output((1, 0)) == (1,)
    assert axes.all_leads() == [(0,), (1,)]
    assert axes.lead_at([1.2, 0.0, 2.0, 2.0]) == (1,)
    # Labels that do not match the layout (or no layout) are cut as they are.
    assert SampleAxes.of((2, 3, 5), layout).shape == (2, 3, 5)
    assert SampleAxes.of((2, 3, 5)).shape == (2, 3, 5)
    # A leading channel axis is not in the labels at all.
    lead = StackLayout((4, 3, 5), channel_axis=0)
    assert SampleAxes.of(lead.output_shape, lead).shape == (3, 5)


def test_the_export_names_slices_with_the_same_axes():
    from napari_maskclip.export.slices import plan_stack

    plan = plan_stack("vol", None, np.zeros((2, 3, 4, 4), np.uint8))
    assert [name for name, _ in plan.slices][:2] == ["vol_t0000_z0000", "vol_t0000_z0001"]
    assert [index for _, index in plan.slices] == leading_indices((2, 3, 4, 4))
