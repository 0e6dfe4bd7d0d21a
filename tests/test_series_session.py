"""The series session: saving through the exporter, resume, Mark reviewed, unreadable images,
mixed image kinds, class rules (no model needed: labels are made up here)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_maskclip.errors import DatasetError, InvalidInputError
from napari_maskclip.export import export_sample, read_dataset
from napari_maskclip.series import SeriesSession, list_images

CLASSES = "cat, dog"


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def _series(tmp_path, n=4, size=(12, 10)):
    rng = np.random.default_rng(0)
    images = {}
    for k in range(n):
        images[f"img{k + 1}"] = _write(tmp_path / "imgs" / f"img{k + 1}.png",
                                       rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return list_images(tmp_path / "imgs"), images


def _labels(shape, seed):
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.uint8)


def test_save_resume_and_saved_labels(tmp_path):
    images, _ = _series(tmp_path)
    ds = tmp_path / "ds"
    session = SeriesSession.open(images, ds, CLASSES)
    assert session.first_unsaved() == 0 and session.saved_count() == 0
    assert session.saved_labels(0) is None
    saved = {}
    for i in (0, 1):
        image = session.read_image(i)
        labels = _labels(image.shape[:2], i)
        labels[0, :3] = 255  # ignore stays ignore
        session.save(i, image, labels)
        saved[i] = labels
    assert session.is_saved(0) and session.is_saved(1) and not session.is_saved(2)
    assert session.first_unsaved() == 2

    # Closing is nothing: reopen and continue at the first image not saved.
    again = SeriesSession.open(list_images(tmp_path / "imgs"), ds, CLASSES)
    assert again.first_unsaved() == 2 and again.saved_count() == 2
    for i, labels in saved.items():
        np.testing.assert_array_equal(again.saved_labels(i), labels)
    assert again.saved_labels(2) is None
    dataset = read_dataset(ds)
    assert dataset.names == ["img1", "img2"]
    np.testing.assert_array_equal(dataset["img1"].read_image(), again.read_image(0))
    # Not reviewed, nothing edited: the labels are the model's (not trusted as human labels).
    assert not dataset["img1"].read_edited().any()
    assert dataset["img1"].provenance["reviewed"] is False
    assert dataset["img1"].info["source"]["series_image"] == "img1.png"


def test_mark_reviewed_counts_every_pixel_as_human_for_training(tmp_path):
    from napari_maskclip.student.data import load_training_data

    images, _ = _series(tmp_path, n=3)
    ds = tmp_path / "ds"
    session = SeriesSession.open(images, ds, CLASSES)
    shape = session.read_image(0).shape[:2]
    edited = np.zeros(shape, bool)
    edited[2:5, 3:7] = True
    session.save(0, session.read_image(0), _labels(shape, 0))                      # as predicted
    session.save(1, session.read_image(1), _labels(shape, 1), edited=edited)       # some edits
    session.save(2, session.read_image(2), _labels(shape, 2), reviewed=True)       # reviewed
    dataset = read_dataset(ds)
    assert dataset["img3"].provenance["reviewed"] is True
    assert dataset["img3"].read_edited().all()
    assert dataset["img3"].info["pixels"]["edited"] == shape[0] * shape[1]
    assert dataset["img3"].info["pixels"]["pseudo"] == 0

    data = load_training_data([ds])
    trusted = {s.name: s.trusted_mask() for s in data.samples}
    assert not trusted["img1"].any()
    np.testing.assert_array_equal(trusted["img2"], edited)
    assert trusted["img3"].all()

    status = session.status()
    assert (status.total, status.saved, status.edited, status.reviewed) == (3, 3, 1, 1)
    assert status.line("MaskCLIP demo") == "3 / 3 saved, 1 with edits, 1 reviewed, model: MaskCLIP demo"

    # Saving again (back, Next) keeps the earlier edits and the review.
    more = np.zeros(shape, bool)
    more[0, 0] = True
    session.save(1, session.read_image(1), _labels(shape, 1), edited=more)
    session.save(2, session.read_image(2), _labels(shape, 2))
    dataset = read_dataset(ds)
    np.testing.assert_array_equal(dataset["img2"].read_edited(), edited | more)
    assert dataset["img3"].provenance["reviewed"] is True and dataset["img3"].read_edited().all()


def test_unreadable_images_are_listed_and_skipped(tmp_path):
    images, _ = _series(tmp_path, n=3)
    (tmp_path / "imgs" / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    images = list_images(tmp_path / "imgs")
    assert len(images) == 3  # listed
    session = SeriesSession.open(images, tmp_path / "ds", CLASSES)
    session.read_image(0)
    with pytest.raises(InvalidInputError, match="img2.png"):
        session.read_image(1)
    assert list(session.unreadable) == [1]
    assert session.next_index(0) == 2 and session.next_index(2, -1) == 0
    session.save(0, session.read_image(0), _labels(session.read_image(0).shape[:2], 0))
    assert session.first_unsaved() == 2
    assert session.status().line("m") == "1 / 3 saved, 0 with edits, model: m; 1 unreadable, skipped"


def test_mixed_sizes_and_kinds_are_saved_as_they_are(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "a_gray.png": rng.integers(0, 256, (9, 7), dtype=np.uint8),
        "b_rgb.jpg": None,  # JPEG is lossy: compare with what is read
        "c_rgba.png": rng.integers(0, 256, (11, 13, 4), dtype=np.uint8),
        "d_16bit.tif": rng.integers(0, 65536, (8, 15), dtype=np.uint16),
        "e_rgb.bmp": rng.integers(0, 256, (5, 6, 3), dtype=np.uint8),
    }
    for name, array in arrays.items():
        if array is None:
            array = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
        _write(tmp_path / "imgs" / name, array)
    session = SeriesSession.open(list_images(tmp_path / "imgs"), tmp_path / "ds", CLASSES)
    assert len(session) == 5
    read = {}
    for i in range(len(session)):
        image = session.read_image(i)
        read[i] = image
        session.save(i, image, _labels(image.shape[:2], i))
    dataset = read_dataset(tmp_path / "ds")
    for i, name in enumerate(session.names):
        stored = dataset[name].read_image()
        assert stored.dtype == read[i].dtype
        np.testing.assert_array_equal(stored, read[i])
        np.testing.assert_array_equal(dataset[name].read_mask(), _labels(read[i].shape[:2], i))
    assert dataset["d_16bit"].read_image().dtype == np.uint16


def test_class_rules_are_exports(tmp_path):
    images, _ = _series(tmp_path, n=2)
    ds = tmp_path / "ds"
    export_sample(ds, "other", None, np.zeros((4, 4), np.uint8), "cat, dog")
    with pytest.raises(DatasetError, match="remap"):
        SeriesSession.open(images, ds, "dog, bird")
    with pytest.raises(DatasetError, match="add_classes"):
        SeriesSession.open(images, ds, "dog, bird", remap=True)
    session = SeriesSession.open(images, ds, "dog, bird", remap=True, add_classes=True)
    image = session.read_image(0)
    labels = _labels(image.shape[:2], 5)  # 1 = dog, 2 = bird in the page's classes
    session.save(0, image, labels)
    dataset = read_dataset(ds)
    assert dataset.class_names == ["background", "cat", "dog", "bird"]
    expected = np.array([0, 2, 3])[labels]
    np.testing.assert_array_equal(dataset["img1"].read_mask(), expected)
    # Shown again in the page's values.
    np.testing.assert_array_equal(session.saved_labels(0), labels)

    # A folder that is neither empty nor a dataset is refused before anything is written.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        SeriesSession.open(images, tmp_path / "busy", CLASSES)


def test_a_sample_the_series_did_not_save_is_never_replaced(tmp_path):
    images, _ = _series(tmp_path, n=2)
    ds = tmp_path / "ds"
    theirs = _labels((12, 10), 9)
    export_sample(ds, "img1", None, theirs, CLASSES)
    session = SeriesSession.open(images, ds, CLASSES)
    assert session.is_saved(0)  # shown as saved, with its labels
    np.testing.assert_array_equal(session.saved_labels(0), theirs)
    with pytest.raises(DatasetError, match="did not save"):
        session.save(0, session.read_image(0), _labels((12, 10), 0))
    np.testing.assert_array_equal(read_dataset(ds)["img1"].read_mask(), theirs)


def test_order_and_navigation(tmp_path):
    images, _ = _series(tmp_path, n=5)
    session = SeriesSession.open(images, tmp_path / "ds", CLASSES)
    assert session.order == [0, 1, 2, 3, 4]
    session.set_order([3, 1])
    assert session.order == [3, 1, 0, 2, 4]
    assert session.next_index(None) == 3
    assert session.next_index(3) == 1 and session.next_index(1, -1) == 3
    assert session.next_index(4) is None and session.next_index(3, -1) is None
    assert session.next_index(3, 2) == 0
    assert session.first_unsaved() == 3
    with pytest.raises(InvalidInputError):
        session.set_order([1, 1])
    with pytest.raises(IndexError):
        session.set_order([7])
