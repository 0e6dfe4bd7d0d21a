"""Dataset export: round trips, the confidence threshold, appending, remapping, overwriting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_maskclip.classes import class_color
from napari_maskclip.errors import DatasetError, InvalidInputError
from napari_maskclip.export import export_sample, export_sample_iter, read_dataset


def _probabilities(rng, labels, n_classes):
    """Probabilities whose argmax (background = 1 - sum) is ``labels``, with random confidence."""
    h, w = labels.shape
    p = rng.random((n_classes + 1, h, w)).astype(np.float32) * 0.5
    np.put_along_axis(p, labels[None].astype(np.intp), 1.0 + rng.random((1, h, w)) * 3, axis=0)
    p /= p.sum(axis=0, keepdims=True)
    return p[1:]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_round_trip_2d_rgb_with_confidence_and_edits(tmp_path, rng):
    image = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (37, 45)).astype(np.uint8)
    labels[0, :5] = 255  # painted "ignore"
    probs = _probabilities(rng, np.where(labels == 255, 0, labels), 2)
    edited = rng.random((37, 45)) > 0.7
    report = export_sample(tmp_path / "ds", "photo", image, labels, "cat, dog; puppy",
                           background="background; wall", probabilities=probs, edited=edited,
                           provenance={"settings": {"model": "ViT-B-16", "pretrained": "openai",
                                                    "mode": "maskclip"}})
    assert report.samples == ["photo"]

    ds = read_dataset(tmp_path / "ds")
    assert ds.names == ["photo"]
    assert ds.class_names == ["background", "cat", "dog"]
    assert [c.synonyms for c in ds.classes.classes] == [("cat",), ("dog", "puppy")]
    assert [b.text for b in ds.classes.background] == ["background; wall"]
    sample = ds["photo"]
    np.testing.assert_array_equal(sample.read_image(), image)
    mask = sample.read_mask()
    assert mask.dtype == np.uint8 and sample.ignore_index == 255
    np.testing.assert_array_equal(mask, labels)
    np.testing.assert_array_equal(sample.read_edited(), edited)
    conf = sample.read_confidence()
    assert conf.dtype == np.float16 and conf.shape == (2, 37, 45)
    np.testing.assert_allclose(conf, probs, atol=1e-3)
    assert sample.provenance["model"] == "ViT-B-16" and sample.provenance["pretrained"] == "openai"
    assert sample.provenance["settings"]["mode"] == "maskclip"
    assert sample.info["pixels"]["edited"] == int(edited.sum())

    table = json.loads((tmp_path / "ds" / "classes.json").read_text())
    entries = table["classes"]
    assert [(e["index"], e["name"], e["background"]) for e in entries] == [
        (0, "background", True), (1, "cat", False), (2, "dog", False)]
    assert entries[0]["synonyms"] == ["background", "wall"]
    assert entries[2]["color"] == list(class_color("dog"))
    assert table["ignore_index"] == 255
    # The mask PNG is a palette image whose colours are the class colours.
    from PIL import Image

    with Image.open(tmp_path / "ds" / "masks" / "photo.png") as im:
        assert im.mode == "P"
        palette = np.array(im.getpalette()[: 3 * 3]).reshape(3, 3)
    np.testing.assert_array_equal(palette[1], np.round(np.array(class_color("cat")[:3]) * 255))


def test_16_bit_gray_and_multichannel_images_keep_their_dtype(tmp_path, rng):
    gray16 = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    five = rng.random((20, 24, 5)).astype(np.float32)
    labels = rng.integers(0, 2, (20, 24)).astype(np.uint8)
    export_sample(tmp_path, "g", gray16, labels, "cell")
    export_sample(tmp_path, "f", five, labels, "cell")
    ds = read_dataset(tmp_path)
    assert ds["g"].image_path.suffix == ".tif" and ds["f"].image_path.suffix == ".tif"
    np.testing.assert_array_equal(ds["g"].read_image(), gray16)
    assert ds["g"].read_image().dtype == np.uint16
    np.testing.assert_array_equal(ds["f"].read_image(), five)


@pytest.mark.parametrize("shape, dtype", [
    ((12, 14, 1), np.uint8), ((12, 14, 2), np.uint8), ((12, 14, 4), np.uint16),
    ((12, 14, 3), np.float64), ((12, 14), np.int32), ((12, 14), np.uint8), ((12, 14, 4), np.uint8),
])
def test_any_image_round_trips_exactly(tmp_path, rng, shape, dtype):
    image = (rng.random(shape) * 200).astype(dtype)
    export_sample(tmp_path, "x", image, np.zeros((12, 14), np.uint8), "cell")
    back = read_dataset(tmp_path)["x"].read_image()
    assert back.dtype == image.dtype and back.shape == image.shape
    np.testing.assert_array_equal(back, image)


def test_channel_first_image_is_stored_channels_last(tmp_path, rng):
    image = rng.integers(0, 256, (3, 16, 20), dtype=np.uint8)
    labels = np.ones((16, 20), np.uint8)
    export_sample(tmp_path, "c", image, labels, "cell", channel_axis=0)
    np.testing.assert_array_equal(read_dataset(tmp_path)["c"].read_image(), np.moveaxis(image, 0, -1))


def test_stack_exports_one_sample_per_slice(tmp_path, rng):
    image = rng.integers(0, 4096, (3, 18, 22), dtype=np.uint16)
    labels = rng.integers(0, 3, (3, 18, 22)).astype(np.int32)
    probs = np.stack([_probabilities(rng, labels[z], 2) for z in range(3)], axis=1)  # C x Z x H x W
    steps = []
    gen = export_sample_iter(tmp_path / "ds", "vol", image, labels, "a, b", probabilities=probs)
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            report = stop.value
            break
    assert [s.done for s in steps] == [0, 1, 2, 3] and steps[-1].total == 3
    assert report.samples == ["vol_z0000", "vol_z0001", "vol_z0002"]
    ds = read_dataset(tmp_path / "ds")
    for z in range(3):
        s = ds[f"vol_z{z:04d}"]
        np.testing.assert_array_equal(s.read_image(), image[z])
        np.testing.assert_array_equal(s.read_mask(), labels[z])
        np.testing.assert_allclose(s.read_confidence(), probs[:, z], atol=1e-3)
        assert s.info["source"]["index"] == [z]


def test_time_series_names_and_selected_slices(tmp_path, rng):
    labels = rng.integers(0, 2, (2, 3, 8, 9)).astype(np.uint8)
    export_sample(tmp_path, "ts", None, labels, "x", slices=[(1, 2), (0, 0)])
    ds = read_dataset(tmp_path)
    assert ds.names == ["ts_t0001_z0002", "ts_t0000_z0000"]
    np.testing.assert_array_equal(ds["ts_t0001_z0002"].read_mask(), labels[1, 2])
    assert ds["ts_t0000_z0000"].image_path is None and ds["ts_t0000_z0000"].read_image() is None


def test_threshold_drops_only_unsure_pseudo_labels(tmp_path, rng):
    labels = np.array([[1, 1, 2, 0]], np.uint8)
    # probability of each pixel's own label: 0.9, 0.3, 0.35, background mass 1 - 0.1 - 0.1 = 0.8
    probs = np.array([[[0.9, 0.3, 0.3, 0.1]], [[0.05, 0.2, 0.35, 0.1]]], np.float32)
    edited = np.array([[False, False, True, False]])
    export_sample(tmp_path, "s", None, labels, "a, b", probabilities=probs, edited=edited,
                  min_confidence=0.5)
    sample = read_dataset(tmp_path)["s"]
    # pixel 1 (0.3, pseudo) dropped; pixel 2 (0.35) kept because a person painted it.
    np.testing.assert_array_equal(sample.read_mask(), [[1, 255, 2, 0]])
    assert sample.info["pixels"]["ignored_low_confidence"] == 1
    assert sample.info["min_confidence"] == 0.5


def test_threshold_without_edit_mask_keeps_labels_the_model_did_not_choose(tmp_path):
    labels = np.array([[1, 2]], np.uint8)
    # Pixel 0: label 1 is the argmax but unsure -> dropped. Pixel 1: label 2 is not what the
    # model chose (class 1 is), so a person changed it -> kept.
    probs = np.array([[[0.4, 0.45]], [[0.3, 0.3]]], np.float32)
    export_sample(tmp_path, "s", None, labels, "a, b", probabilities=probs, min_confidence=0.5)
    sample = read_dataset(tmp_path)["s"]
    np.testing.assert_array_equal(sample.read_mask(), [[255, 2]])
    assert sample.read_edited() is None and sample.info["edited"] is None
    assert sample.info["pixels"]["edited"] is None


def test_threshold_needs_probabilities(tmp_path):
    with pytest.raises(InvalidInputError, match="probability"):
        export_sample(tmp_path, "s", None, np.zeros((4, 4), np.uint8), "a", min_confidence=0.5)


def test_append_with_same_classes_merges_synonyms(tmp_path, rng):
    labels = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    export_sample(tmp_path, "one", None, labels, "cat, dog")
    report = export_sample(tmp_path, "two", None, labels, "Cat; kitten, dog")
    assert report.class_mapping is None
    ds = read_dataset(tmp_path)
    assert ds.names == ["one", "two"]
    assert [c.synonyms for c in ds.classes.classes] == [("cat", "kitten"), ("dog",)]
    np.testing.assert_array_equal(ds["two"].read_mask(), labels)


def test_append_with_other_classes_is_refused_and_writes_nothing(tmp_path, rng):
    labels = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    export_sample(tmp_path, "one", None, labels, "cat, dog")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    classes_before = (tmp_path / "classes.json").read_text()
    with pytest.raises(DatasetError, match=r"\[cat, dog\].*\[dog, cat\].*remap"):
        export_sample(tmp_path, "two", rng.integers(0, 255, (10, 12), dtype=np.uint8), labels, "dog, cat")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "classes.json").read_text() == classes_before


def test_remap_maps_labels_and_confidence_by_name(tmp_path, rng):
    base = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    export_sample(tmp_path, "one", None, base, "cat, dog; puppy, bird")
    labels = np.array([[0, 1, 2, 3]], np.uint8)  # in the new list: 1 = puppy, 2 = cat, 3 = fish
    probs = np.array([[[0.1, 0.6, 0.2, 0.1]], [[0.1, 0.2, 0.7, 0.1]], [[0.1, 0.1, 0.05, 0.7]]],
                     np.float32)
    with pytest.raises(DatasetError, match="'fish'.*add_classes"):
        export_sample(tmp_path, "two", None, labels, "puppy, cat, fish", remap=True)
    report = export_sample(tmp_path, "two", None, labels, "puppy, cat, fish",
                           probabilities=probs, remap=True, add_classes=True)
    assert report.classes_added == ["fish"]
    assert report.class_mapping == {0: 0, 1: 2, 2: 1, 3: 4}
    ds = read_dataset(tmp_path)
    assert ds.class_names == ["background", "cat", "dog", "bird", "fish"]
    np.testing.assert_array_equal(ds["two"].read_mask(), [[0, 2, 1, 4]])
    conf = ds["two"].read_confidence().astype(np.float32)
    assert conf.shape == (4, 1, 4)
    np.testing.assert_allclose(conf[0], probs[1], atol=1e-3)  # cat
    np.testing.assert_allclose(conf[1], probs[0], atol=1e-3)  # dog <- puppy
    assert np.isnan(conf[2]).all()                           # bird was not queried
    np.testing.assert_allclose(conf[3], probs[2], atol=1e-3)  # fish
    # The first sample still means what it meant.
    assert ds["one"].num_classes == 3
    np.testing.assert_array_equal(ds["one"].read_mask(), base)


def test_existing_sample_is_not_overwritten_without_the_flag(tmp_path, rng):
    first = rng.integers(0, 2, (8, 8)).astype(np.uint8)
    second = 1 - first
    export_sample(tmp_path, "s", rng.integers(0, 255, (8, 8), dtype=np.uint8), first, "a")
    files_before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DatasetError, match="already has sample.*overwrite"):
        export_sample(tmp_path, "s", None, second, "a")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files_before
    report = export_sample(tmp_path, "s", None, second, "a", overwrite=True)
    assert report.overwritten == ["s"]
    sample = read_dataset(tmp_path)["s"]
    np.testing.assert_array_equal(sample.read_mask(), second)
    # The new sample has no image, and the old image file is gone with it.
    assert sample.image_path is None and not list((tmp_path / "images").glob("s.*"))


def test_names_differing_only_in_case_are_refused(tmp_path):
    labels = np.zeros((4, 4), np.uint8)
    export_sample(tmp_path, "Cell", None, labels, "a")
    with pytest.raises(DatasetError, match="letter case"):
        export_sample(tmp_path, "cell", None, labels, "a", overwrite=True)


def test_more_than_254_classes_use_uint16_masks(tmp_path, rng):
    names = [f"c{i}" for i in range(300)]
    labels = rng.integers(0, 301, (9, 11)).astype(np.uint16)
    labels[0, 0] = 65535
    export_sample(tmp_path, "big", None, labels, names)
    sample = read_dataset(tmp_path)["big"]
    mask = sample.read_mask()
    assert sample.mask_path.suffix == ".tif" and mask.dtype == np.uint16
    assert sample.ignore_index == 65535
    np.testing.assert_array_equal(mask, labels)


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(InvalidInputError, match="Label value 5"):
        export_sample(target, "s", None, np.full((4, 4), 5, np.uint8), "a, b")
    with pytest.raises(InvalidInputError, match="does not match"):
        export_sample(target, "s", np.zeros((5, 4), np.uint8), np.zeros((4, 4), np.uint8), "a")
    with pytest.raises(InvalidInputError, match="1 probability maps for 2 classes"):
        export_sample(target, "s", None, np.zeros((4, 4), np.uint8), "a, b",
                      probabilities=np.zeros((1, 4, 4)))
    with pytest.raises(InvalidInputError, match="file name"):
        export_sample(target, "../evil", None, np.zeros((4, 4), np.uint8), "a")
    assert not target.exists()


def test_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and not a dataset"):
        export_sample(tmp_path, "s", None, np.zeros((4, 4), np.uint8), "a")


def test_closing_the_generator_keeps_the_finished_slices(tmp_path):
    labels = np.ones((5, 6, 7), np.uint8)
    gen = export_sample_iter(tmp_path, "v", None, labels, "a")
    seen = [next(gen) for _ in range(3)]  # start + two slices done
    assert seen[-1].done == 2
    gen.close()
    ds = read_dataset(tmp_path)
    assert ds.names == ["v_z0000", "v_z0001"]
