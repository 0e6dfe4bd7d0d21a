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
    link_run_layers,
    managed_layers,
    recolor_class,
    result_layer_data,
    show_confidence,
)
from napari_maskclip.plugin.records import ConfidenceRecord
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


def maps_of(layer) -> ConfidenceRecord:
    return ConfidenceRecord.from_metadata(layer.metadata)


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
    # One confidence image per run, not one per class: it holds every map, shows one.
    assert len(confidence) == 1
    data, conf, kind = confidence[0]
    assert kind == "image" and conf["name"] == "img [maskclip] confidence"
    assert conf["blending"] == "translucent" and conf["contrast_limits"] == (0.0, 1.0)
    record = ConfidenceRecord.from_metadata(conf["metadata"])
    assert record.class_names == tuple(result.class_names)
    np.testing.assert_array_equal(record.maps, np.stack(result.probabilities))
    # It shows the class covering most pixels, in that class's colour, as a view (no copy).
    assert record.class_name == "cat" and np.shares_memory(data, record.maps)
    np.testing.assert_array_equal(data, result.probabilities[0])
    assert tuple(conf["colormap"].colors[-1][:3]) == pytest.approx(class_color("cat")[:3])


def test_first_run_adds_layers_with_the_source_geometry(viewer):
    report = apply(viewer, make_result((20, 30), ["cat", "dog"]))
    assert report.mode == "new"
    labels = viewer.layers["img [maskclip]"]
    assert labels.data.shape == (20, 30)
    np.testing.assert_allclose(labels.scale, [0.5, 2.0])
    np.testing.assert_allclose(labels.translate, [10.0, -3.0])
    conf = viewer.layers["img [maskclip] confidence"]
    assert conf.data.dtype == np.float32 and len(viewer.layers) == 2
    # Confidence maps sit below the labels, so the labels stay on top for painting.
    assert viewer.layers.index(conf) < viewer.layers.index(labels)
    assert labels.metadata[META_KEY]["class_names"] == ["cat", "dog"]


def test_unedited_rerun_replaces_in_place_and_reuses_the_confidence_layer(viewer):
    apply(viewer, make_result((20, 30), ["cat", "dog", "bird"]))
    labels = viewer.layers["img [maskclip]"]
    conf_layer = viewer.layers["img [maskclip] confidence"]
    second = make_result((20, 30), ["sofa", "dog"], seed=5)
    report = apply(viewer, second)
    assert report.mode == "replaced" and report.labels_layer is labels
    np.testing.assert_array_equal(labels.data, second.labels)
    assert sorted(layer.name for layer in viewer.layers) == [
        "img [maskclip]", "img [maskclip] confidence"
    ]
    # The run's layer is reused (cheaper than removing and adding layers), with the new maps.
    assert report.confidence_layer is conf_layer
    record = maps_of(conf_layer)
    assert record.class_names == ("sofa", "dog")
    assert record.run_id == labels.metadata[META_KEY]["run_id"]
    np.testing.assert_array_equal(record.maps, np.stack(second.probabilities))
    assert labels.features["name"].tolist() == ["background", "sofa", "dog"]
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
    maps = maps_of(viewer.layers["img [maskclip] confidence"]).maps
    np.testing.assert_array_equal(maps[:, 2], np.stack(second.probabilities)[:, 2])
    assert maps[:, 0].any()  # the first run's maps of slice 0 are still there
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


def test_deleted_confidence_layer_is_recreated(viewer):
    apply(viewer, make_result((20, 30), ["cat", "dog"]))
    viewer.layers.remove("img [maskclip] confidence")
    apply(viewer, make_result((20, 30), ["cat", "dog"], seed=2))
    assert "img [maskclip] confidence" in viewer.layers


def test_twelve_classes_make_two_layers_not_thirteen(viewer):
    names = [f"class {k}" for k in range(12)]
    apply(viewer, make_result((20, 30), names))
    assert [layer.name for layer in viewer.layers] == ["img [maskclip] confidence",
                                                       "img [maskclip]"]
    assert maps_of(viewer.layers[0]).maps.shape == (12, 20, 30)


def test_the_label_picked_for_painting_shows_its_confidence(viewer):
    result = make_result((20, 30), ["cat", "dog", "bird"])
    result.labels[:] = 2  # dog covers most pixels: shown first, and the label picked
    report = apply(viewer, result)
    labels, conf = report.labels_layer, report.confidence_layer
    assert maps_of(conf).class_name == "dog" and labels.selected_label == 2
    np.testing.assert_array_equal(conf.data, result.probabilities[1])
    labels.selected_label = 3
    assert maps_of(conf).class_name == "bird"
    np.testing.assert_array_equal(conf.data, result.probabilities[2])
    assert tuple(conf.colormap.colors[-1][:3]) == pytest.approx(
        tuple(labels.colormap.color_dict[3][:3]))
    labels.selected_label = 9  # not a class: the shown map stays
    assert maps_of(conf).class_name == "bird"
    # The dock picks a class directly; a class the run lacks changes nothing.
    assert show_confidence(viewer.layers, labels, "dog") is conf
    np.testing.assert_array_equal(conf.data, result.probabilities[1])
    assert show_confidence(viewer.layers, labels, "sofa") is None
    # A re-run into the same layer keeps the label the user picked, and shows its map.
    labels.selected_label = 1
    again = apply(viewer, make_result((20, 30), ["cat", "dog", "bird"], seed=4))
    assert again.mode == "updated" and labels.selected_label == 1
    assert maps_of(conf).class_name == "cat"


def test_deleting_a_labels_layer_deletes_its_confidence_layer_only(viewer):
    apply(viewer, make_result((20, 30), ["cat", "dog"]))
    first = viewer.layers["img [maskclip]"]
    first.paint((5, 5), 2)
    second = apply(viewer, make_result((20, 30), ["cat", "dog"], seed=3))
    assert second.mode == "kept-edited"
    assert "img [maskclip] (2) confidence" in viewer.layers
    viewer.layers.remove(first)
    assert sorted(layer.name for layer in viewer.layers) == [
        "img [maskclip] (2)", "img [maskclip] (2) confidence"]
    viewer.layers.remove(second.labels_layer)
    assert len(viewer.layers) == 0


def test_a_duplicate_labels_layer_keeps_the_maps_alive(viewer):
    report = apply(viewer, make_result((20, 30), ["cat"]))
    copy = viewer.add_labels(report.labels_layer.data.copy(), name="copy",
                             metadata=dict(report.labels_layer.metadata))
    link_run_layers(viewer)
    viewer.layers.remove(report.labels_layer)
    assert "img [maskclip] confidence" in viewer.layers
    viewer.layers.remove(copy)
    assert "img [maskclip] confidence" not in viewer.layers


def test_recolouring_a_class_updates_labels_and_the_shown_map(viewer):
    report = apply(viewer, make_result((20, 30), ["cat", "dog"]))
    labels, conf = report.labels_layer, report.confidence_layer
    show_confidence(viewer.layers, labels, "dog")
    assert recolor_class(viewer.layers, "dog", (1.0, 0.0, 0.5)) == [labels]
    np.testing.assert_allclose(labels.colormap.color_dict[2], [1.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(conf.colormap.colors[-1][:3], [1.0, 0.0, 0.5])
    assert recolor_class(viewer.layers, "sofa", (0, 0, 0)) == []
