"""Semantic labels -> instance labels (connected components of each class)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_maskclip.errors import InvalidInputError
from napari_maskclip.export.instances import instance_labels


def test_diagonal_touch_depends_on_connectivity():
    labels = np.zeros((6, 6), np.uint8)
    labels[1, 1] = labels[2, 2] = 3  # touch at a corner only
    assert len(instance_labels(labels, connectivity=1)) == 2
    joined = instance_labels(labels, connectivity=2)
    assert len(joined) == 1 and joined.classes.tolist() == [3] and joined.areas.tolist() == [2]
    assert len(instance_labels(labels)) == 1  # default: diagonals connect


def test_holes_neighbours_background_and_ignore():
    labels = np.zeros((9, 9), np.uint8)
    labels[1:8, 1:8] = 1
    labels[3:6, 3:6] = 2  # a hole of another class
    labels[1, 1] = 255  # ignored pixel inside the ring
    labels[8, 0] = 1  # touches the ring only diagonally
    inst = instance_labels(labels, connectivity=1, ignore_index=255)
    assert len(inst) == 3
    ring = inst.instances[4, 1]
    assert inst.classes[ring - 1] == 1
    assert inst.areas[ring - 1] == 49 - 9 - 1
    assert inst.instances[4, 4] != ring and inst.classes[inst.instances[4, 4] - 1] == 2
    assert inst.instances[1, 1] == 0 and inst.instances[0, 0] == 0
    # Different classes never merge, even when adjacent.
    assert len(set(inst.instances[3:6, 2:7].ravel()) - {0}) == 2


def test_min_area_drops_and_renumbers():
    labels = np.zeros((10, 10), np.uint16)
    labels[0:4, 0:4] = 5
    labels[8, 8] = 5
    labels[6:8, 0:3] = 7
    inst = instance_labels(labels, min_area=5)
    assert inst.dropped_small == 1
    assert sorted(inst.classes.tolist()) == [5, 7]
    assert sorted(np.unique(inst.instances).tolist()) == [0, 1, 2]
    assert inst.instances[8, 8] == 0
    with pytest.raises(InvalidInputError):
        instance_labels(labels, min_area=0)


def test_matches_per_class_labelling_on_random_maps():
    rng = np.random.default_rng(3)
    for connectivity in (1, 2):
        labels = rng.integers(0, 4, (40, 50)).astype(np.uint8)
        inst = instance_labels(labels, connectivity=connectivity)
        expected = 0
        for k in (1, 2, 3):
            structure = ndimage.generate_binary_structure(2, connectivity)
            _, n = ndimage.label(labels == k, structure)
            expected += n
        assert len(inst) == expected
        # Every instance is exactly one class, its pixels are its area, its box holds it.
        for i in range(1, len(inst) + 1):
            pixels = inst.instances == i
            assert set(np.unique(labels[pixels]).tolist()) == {int(inst.classes[i - 1])}
            assert pixels.sum() == inst.areas[i - 1]
            box, inside = inst.mask(i)
            assert inside.sum() == pixels.sum()
        assert ((inst.instances > 0) == (labels > 0)).all()


def test_background_other_than_zero_and_3d():
    labels = np.array([[0, 0, 9], [9, 9, 9]], np.uint8)
    inst = instance_labels(labels, background=9)
    assert len(inst) == 1 and inst.classes.tolist() == [0] and inst.areas.tolist() == [2]
    stack = np.zeros((3, 4, 4), np.uint8)
    stack[0, 0, 0] = stack[1, 0, 0] = 2  # connected through z
    stack[2, 3, 3] = 2
    assert len(instance_labels(stack, connectivity=1)) == 2


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="connectivity"):
        instance_labels(np.zeros((3, 3), np.uint8), connectivity=3)
    with pytest.raises(InvalidInputError, match="integer"):
        instance_labels(np.zeros((3, 3), np.float32))
    empty = instance_labels(np.zeros((3, 3), np.uint8))
    assert len(empty) == 0 and empty.instances.dtype == np.int32 and not empty.instances.any()
