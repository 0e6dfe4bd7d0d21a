"""``napari-maskclip status DS``: counts from the dataset's files, the last line one JSON object;
bad input is one line and a non-zero exit."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from napari_maskclip.cli import main
from napari_maskclip.export import export_sample
from napari_maskclip.series import SeriesSession, list_images


def _dataset(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(5):
        Image.fromarray(np.full((10, 10, 3), 40 * k, np.uint8)).save(folder / f"img{k}.png")
    ds = tmp_path / "ds"
    session = SeriesSession.open(list_images(folder), ds, "cat, dog")
    first = np.zeros((10, 10), np.uint8)
    first[:5] = 1               # 49 cat (one ignored below), 50 background
    first[0, 0] = 255           # one ignored
    second = np.full((10, 10), 2, np.uint8)  # 100 dog
    edited = np.zeros((10, 10), bool)
    edited[:2] = True           # 20 edited pixels
    session.save(0, session.read_image(0), first, edited=edited)
    session.save(1, session.read_image(1), second, reviewed=True)
    session.save(2, session.read_image(2), np.zeros((10, 10), np.uint8))
    return folder, ds


def test_status_counts_from_the_files(tmp_path, capsys):
    folder, ds = _dataset(tmp_path)
    assert main(["status", str(ds), "--images", str(folder)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["saved"] == report["samples"] == 3 and report["images"] == 3
    assert report["reviewed"] == 1 and report["with_edits"] == 1 and report["unknown_edits"] == 0
    assert report["edited_pixels"] == 120 and report["total_pixels"] == 300
    assert abs(report["edited_pixel_share"] - 0.4) < 1e-9
    assert report["classes"] == ["background", "cat", "dog"]
    assert report["class_pixels"] == {"background": 150, "cat": 49, "dog": 100}
    assert report["ignored_pixels"] == 1
    assert (report["series_images"], report["series_saved"]) == (5, 3)
    text = "\n".join(out[:-1])
    assert "series: 3 / 5 images" in text and "edited pixels: 40.0 %" in text
    assert "classes: background, cat, dog" in text


def test_unknown_edits_and_mask_only_samples(tmp_path, capsys):
    ds = tmp_path / "ds"
    export_sample(ds, "a", None, np.ones((4, 5), np.uint8), "cat")  # edits unknown, no image
    assert main(["status", str(ds)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 0 and report["unknown_edits"] == 1 and report["edited_pixels"] == 0
    assert report["class_pixels"] == {"background": 0, "cat": 20}
    assert report["series_images"] is None


def test_bad_input_is_one_line_and_non_zero(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["status", str(tmp_path / "plain")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a napari-maskclip dataset" in err[0]

    _, ds = _dataset(tmp_path)
    (ds / "dataset.json").write_text('{"format": "napari-maskclip-dataset", "samples": [')
    assert main(["status", str(ds)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.json" in err[0] and err[0].startswith("napari-maskclip status: error:")
