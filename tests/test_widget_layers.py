"""Results -> layers, and the re-run rules that keep every user edit.

Runs on napari's Qt-free ``ViewerModel``: the rules are about layer data and metadata, not pixels
on screen.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.plugin.layers import (
    META_KEY,
    Geometry,
    apply_result,
    edited_slices,
    managed_layers,
    result_layer_data,
)
from napari_maskclip.plugin.stack_run import StackResult
from napari_maskclip.stacks import StackLayout
from napari_maskclip.classes import class_color

GEO2D = Geometry(scale=(0.5, 2.0), translate=(10.0, -3.0))
GEO3D = Geometry(scale=(3.0, 0.5, 2.0), translate=(0.0, 10.0, -3.0))


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


def make_result(shape, names, slices=None, seed=0) -> StackResult:
    """A stack result whose computed slices hold random labels and probabilities."""
    rng = np.random.default_rng(seed)
    layout = StackLayout(shape)
    slices = slices if slices is not None else layout.all_slices()
    labels = np.zeros(shape, dtype=np.uint8)
    probs = [np.zeros(shape, dtype=np.float32) for _ in names]
    keys = []
    for index in slices:
        key = layout.output_index(index)
        keys.append(key)
        labels[key] = rng.integers(0, len(names) + 1, size=shape[-2:])
        for p in probs:
            p[key] = rng.random(shape[-2:])
    return StackResult(labels=labels, probabilities=probs, class_names=list(names),
                       class_texts=list(names), background="", slices=list(slices),
                       output_indices=keys)


def apply(viewer, result, geometry=GEO2D):
    return apply_result(viewer, result, source_id="src-1", source_name="img", geometry=geometry)


def test_layer_data_carries_names_colours_geometry_and_visibility():
    result = make_result((20, 30), ["cat", "dog", "sofa", "floor", "wall"])
    result.labels[:] = 1  # only "cat" covers pixels
    result.labels[0, :5] = 3
    tuples = result_layer_data(result, source_name="img", geometry=GEO2D)
    *confidence, (labels, kwargs, kind) = tuples
    assert kind == "labels" and labels is result.labels
    assert kwargs["name"] == "img [maskclip]"
    assert kwargs["features"] == {"index": [0, 1, 2, 3, 4, 5],
                                  "name": ["background", "cat", "dog", "sofa", "floor", "wall"]}
    assert kwargs["colormap"][2] == class_color("dog")
    assert kwargs["colormap"][0][3] == 0.0  # background transparent
    assert kwargs["scale"] == [0.5, 2.0] and kwargs["translate"] == [10.0, -3.0]
    assert [c[1]["name"] for c in confidence] == [f"img [maskclip] {n}" for n in result.class_names]
    assert all(c[1]["blending"] == "translucent" and c[1]["contrast_limits"] == (0.0, 1.0)
               for c in confidence)
    # Only classes that cover pixels (the top ones) start visible.
    assert [c[1]["visible"] for c in confidence] == [True, False, True, False, False]


def test_first_run_adds_layers_with_the_source_geometry(viewer):
    report = apply(viewer, make_result((20, 30), ["cat", "dog"]))
    assert report.mode == "new"
    labels = viewer.layers["img [maskclip]"]
    assert labels.data.shape == (20, 30)
    np.testing.assert_allclose(labels.scale, [0.5, 2.0])
    np.testing.assert_allclose(labels.translate, [10.0, -3.0])
    conf = viewer.layers["img [maskclip] dog"]
    assert conf.data.dtype == np.float32
    # Confidence maps sit below the labels, so the labels stay on top for painting.
    assert viewer.layers.index(conf) < viewer.layers.index(labels)
    assert labels.metadata[META_KEY]["class_names"] == ["cat", "dog"]


def test_unedited_rerun_replaces_in_place_and_reuses_stale_maps(viewer):
    apply(viewer, make_result((20, 30), ["cat", "dog", "bird"]))
    labels = viewer.layers["img [maskclip]"]
    cat_layer = viewer.layers["img [maskclip] cat"]
    second = make_result((20, 30), ["sofa", "dog"], seed=5)
    report = apply(viewer, second)
    assert report.mode == "replaced" and report.labels_layer is labels
    np.testing.assert_array_equal(labels.data, second.labels)
    assert sorted(layer.name for layer in viewer.layers) == [
        "img [maskclip]", "img [maskclip] dog", "img [maskclip] sofa"
    ]
    # The map of a class that is gone is reused (cheaper than removing and adding layers).
    assert viewer.layers["img [maskclip] sofa"] is cat_layer
    assert cat_layer.metadata[META_KEY]["class_name"] == "sofa"
    np.testing.assert_array_equal(cat_layer.data, second.probabilities[0])
    assert labels.features["name"].tolist() == ["background", "sofa", "dog"]
    np.testing.assert_array_equal(viewer.layers["img [maskclip] dog"].data, second.probabilities[1])
    assert viewer.layers.index(labels) == len(viewer.layers) - 1


def test_edited_labels_are_never_overwritten(viewer):
    apply(viewer, make_result((20, 30), ["cat", "dog"]))
    labels = viewer.layers["img [maskclip]"]
    labels.paint((5, 5), 2)  # a brush stroke (public API, undoable)
    painted = labels.data.copy()
    assert edited_slices(labels) == {""}
    report = apply(viewer, make_result((20, 30), ["cat", "dog"], seed=3))
    assert report.mode == "kept-edited"
    np.testing.assert_array_equal(labels.data, painted)
    assert labels.metadata[META_KEY]["managed"] is False
    assert report.labels_layer is not labels and report.labels_layer.name == "img [maskclip] (2)"
    assert "untouched" in report.describe()
    # The next run updates the new layer and still leaves the edited one alone.
    again = apply(viewer, make_result((20, 30), ["bird"], seed=4))
    assert again.labels_layer is report.labels_layer and again.mode == "replaced"
    np.testing.assert_array_equal(labels.data, painted)
    assert managed_layers(viewer, "src-1")[0] is report.labels_layer


def test_stack_runs_fill_slices_in_place_and_skip_edited_ones(viewer):
    shape = (4, 16, 20)
    apply(viewer, make_result(shape, ["cat", "dog"], slices=[(0,)]), GEO3D)
    labels = viewer.layers["img [maskclip]"]
    labels.data[0, :3, :3] = 2  # the user fixes slice 0
    labels.refresh()
    slice0 = labels.data[0].copy()
    second = make_result(shape, ["cat", "dog"], slices=[(2,)], seed=9)
    report = apply(viewer, second, GEO3D)
    assert report.mode == "updated" and report.labels_layer is labels
    np.testing.assert_array_equal(labels.data[0], slice0)  # the edit is kept
    np.testing.assert_array_equal(labels.data[2], second.labels[2])  # the new slice is written
    conf = viewer.layers["img [maskclip] cat"]
    np.testing.assert_array_equal(conf.data[2], second.probabilities[0][2])
    assert conf.data[0].any()  # the first run's map of slice 0 is still there
    # Re-running the edited slice itself goes to a new layer instead.
    third = apply(viewer, make_result(shape, ["cat", "dog"], slices=[(0,)], seed=2), GEO3D)
    assert third.mode == "kept-edited"
    np.testing.assert_array_equal(labels.data[0], slice0)


def test_painting_an_unwritten_slice_counts_as_an_edit(viewer):
    shape = (3, 16, 20)
    apply(viewer, make_result(shape, ["cat"], slices=[(0,)]), GEO3D)
    labels = viewer.layers["img [maskclip]"]
    assert edited_slices(labels) == set()
    labels.data[1, 4, 4] = 1
    assert edited_slices(labels) == {"1"}
    report = apply(viewer, make_result(shape, ["cat"], slices=[(1,)]), GEO3D)
    assert report.mode == "kept-edited"
    assert labels.data[1, 4, 4] == 1


def test_deleted_confidence_layers_are_recreated(viewer):
    apply(viewer, make_result((20, 30), ["cat", "dog"]))
    viewer.layers.remove("img [maskclip] cat")
    apply(viewer, make_result((20, 30), ["cat", "dog"], seed=2))
    assert "img [maskclip] cat" in viewer.layers
