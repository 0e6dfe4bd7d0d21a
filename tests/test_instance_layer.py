"""Labels layer data -> instance layer data tuple, without a viewer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.errors import InvalidInputError
from napari_maskclip.plugin.instance_layer import INSTANCES_META_KEY, instances_layer_data

FEATURES = {"index": [0, 1, 2], "name": ["background", "cat", "dog"]}


def two_class_plane() -> np.ndarray:
    plane = np.zeros((8, 10), np.uint8)
    plane[1:3, 1:3] = 1  # cat, 4 px
    plane[5:8, 0:2] = 1  # another cat, 6 px
    plane[1:4, 6:9] = 2  # dog, 9 px, with a cat hole inside it
    plane[2, 7] = 1  # a one-pixel cat
    return plane


def test_features_name_each_instance_and_geometry_is_copied():
    meta = {"name": "photo [maskclip]", "features": FEATURES, "metadata": {},
            "scale": (0.5, 2.0), "translate": (3.0, -1.0)}
    data, kwargs, kind = instances_layer_data(two_class_plane(), meta)
    assert kind == "labels" and data.dtype == np.int32 and data.shape == (8, 10)
    assert kwargs["name"] == "photo [maskclip] [instances]"
    assert kwargs["scale"] == [0.5, 2.0] and kwargs["translate"] == [3.0, -1.0]
    feats = kwargs["features"]
    assert feats["index"] == [0, 1, 2, 3, 4]
    # Raster order of first pixels: cat (1,1), dog (1,6), cat hole (2,7), cat (5,0).
    assert feats["class_index"] == [0, 1, 2, 1, 1]
    assert feats["class"] == ["background", "cat", "dog", "cat", "cat"]
    assert feats["area"] == [0, 4, 8, 1, 6]
    plane = two_class_plane()
    for i in range(1, 5):  # each instance: exactly its pixels, one class
        assert np.unique(plane[data == i]).tolist() == [feats["class_index"][i]]
        assert int((data == i).sum()) == feats["area"][i]
    assert ((data > 0) == (plane > 0)).all()
    assert kwargs["metadata"][INSTANCES_META_KEY]["instances"] == 4


def test_current_slice_only_and_whole_stack_in_3d():
    stack = np.zeros((3, 8, 10), np.uint8)
    stack[0] = stack[1] = two_class_plane()
    stack[2, 0, 0] = 2
    meta = {"name": "vol", "features": None, "metadata": {}}
    data, kwargs, _ = instances_layer_data(stack, meta, lead=[1])
    assert data.shape == stack.shape and not data[0].any() and not data[2].any()
    assert data[1].max() == 4 and kwargs["metadata"][INSTANCES_META_KEY]["slice"] == [1]
    # Without class names the class column says the label value.
    assert kwargs["features"]["class"][1:3] == ["label 1", "label 2"]
    whole, kwargs, _ = instances_layer_data(stack, meta)
    # Slices 0 and 1 touch: their components join in 3D; the lone pixel of slice 2 is one more.
    assert whole.max() == 5 and whole[0, 1, 1] == whole[1, 1, 1]
    assert kwargs["features"]["area"][1] == 8


def test_min_area_and_bad_input():
    meta = {"name": "x", "features": FEATURES, "metadata": {}}
    data, kwargs, _ = instances_layer_data(two_class_plane(), meta, min_area=2)
    assert data.max() == 3 and kwargs["metadata"][INSTANCES_META_KEY]["dropped_small"] == 1
    with pytest.raises(InvalidInputError):
        instances_layer_data(np.zeros((4, 4), np.float32), meta)
    with pytest.raises(InvalidInputError):
        instances_layer_data(np.zeros((2, 4, 4), np.uint8), meta, lead=[2])
