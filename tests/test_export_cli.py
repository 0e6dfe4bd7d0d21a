"""``napari-maskclip export``: from image + label files, and from a ``segment`` output folder."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_maskclip.cli import main
from napari_maskclip.export import read_dataset
from napari_maskclip.image_files import write_label_image


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for stem in ("a", "b"):
        image = rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)
        labels = rng.integers(0, 3, (20, 26)).astype(np.uint8)
        iio.imwrite(tmp_path / f"{stem}.png", image)
        write_label_image(tmp_path / f"{stem}_lab.png", labels)
        out[stem] = (image, labels)
    stack = rng.integers(0, 4000, (3, 20, 26)).astype(np.uint16)
    stack_labels = rng.integers(0, 3, (3, 20, 26)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "vol_lab.tif", stack_labels, photometric="minisblack")
    out["vol"] = (stack, stack_labels)
    return out


def _files_args(tmp_path, stems):
    return (["--images", *[str(tmp_path / f"{s}.{'tif' if s == 'vol' else 'png'}") for s in stems],
             "--labels", *[str(tmp_path / f"{s}_lab.{'tif' if s == 'vol' else 'png'}") for s in stems]])


def test_export_from_files_then_append(tmp_path, inputs, capsys):
    ds_dir = tmp_path / "ds"
    assert main(["export", *_files_args(tmp_path, ["a", "vol"]), "--classes", "cat, dog",
                 "--out", str(ds_dir), "--quiet"]) == 0
    assert main(["export", *_files_args(tmp_path, ["b"]), "--classes", "cat, dog",
                 "--out", str(ds_dir), "--quiet"]) == 0
    ds = read_dataset(ds_dir)
    assert ds.names == ["a", "vol_z0000", "vol_z0001", "vol_z0002", "b"]
    np.testing.assert_array_equal(ds["a"].read_image(), inputs["a"][0])
    np.testing.assert_array_equal(ds["b"].read_mask(), inputs["b"][1])
    np.testing.assert_array_equal(ds["vol_z0001"].read_image(), inputs["vol"][0][1])
    np.testing.assert_array_equal(ds["vol_z0002"].read_mask(), inputs["vol"][1][2])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"1 sample(s) in {ds_dir}"


def test_export_errors_are_one_line_and_write_nothing(tmp_path, inputs, capsys):
    ds_dir = tmp_path / "ds"
    assert main(["export", *_files_args(tmp_path, ["a"]), "--classes", "cat, dog",
                 "--out", str(ds_dir), "--quiet"]) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in ds_dir.rglob("*")}
    # The same command again: the input is finished, nothing is redone.
    assert main(["export", *_files_args(tmp_path, ["a"]), "--classes", "cat, dog",
                 "--out", str(ds_dir), "--quiet"]) == 0
    assert "skipped 1 finished image" in capsys.readouterr().out
    cases = [
        (["--classes", "cat, dog", "--background", "floor"], "already has sample"),  # no --overwrite
        (["--classes", "dog, cat", "--overwrite"], "--remap"),       # other class order
        (["--classes", "cat, dog, bird", "--overwrite", "--remap"], "--add-classes"),
    ]
    for extra, message in cases:
        assert main(["export", *_files_args(tmp_path, ["a"]), *extra, "--out", str(ds_dir), "--quiet"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert {p: p.stat().st_mtime_ns for p in ds_dir.rglob("*")} == before


def test_export_from_a_segment_folder(tmp_path, inputs):
    from napari_maskclip.engine import SegmentationResult
    from napari_maskclip.classes import parse_classes
    from napari_maskclip.result_files import write_result

    image, labels = inputs["a"]
    probs = np.random.default_rng(1).random((2, 20, 26)).astype(np.float32) / 2
    result = SegmentationResult(labels=labels, probabilities=probs,
                                classes=parse_classes("cat, dog; puppy"),
                                background=parse_classes("background; floor"),
                                settings={"model": "demo", "pretrained": None, "mode": "maskclip"})
    seg = tmp_path / "seg"
    write_result(result, seg, "a", extra={"source_image": str(tmp_path / "nowhere.png")})
    # The recorded source is gone; --images-dir finds it by stem.
    code = main(["export", "--from-segment", str(seg), "--out", str(tmp_path / "ds"), "--quiet",
                 "--min-confidence", "0.3"])
    assert code == 1
    assert main(["export", "--from-segment", str(seg), "--images-dir", str(tmp_path),
                 "--out", str(tmp_path / "ds"), "--quiet", "--min-confidence", "0.3"]) == 0
    ds = read_dataset(tmp_path / "ds")
    sample = ds["a"]
    assert ds.class_names == ["background", "cat", "dog"]
    assert ds.classes.classes[1].synonyms == ("dog", "puppy")
    assert [b.text for b in ds.classes.background] == ["background; floor"]
    np.testing.assert_array_equal(sample.read_image(), image)
    np.testing.assert_allclose(sample.read_confidence(), probs, atol=1e-3)
    # Unsure pixels that agree with the model became ignore; the rest kept their label.
    mask = sample.read_mask()
    from napari_maskclip.export.pixels import label_confidence

    unsure = label_confidence(labels, probs) < 0.3
    assert np.all(mask[~unsure] == labels[~unsure])
    assert sample.info["pixels"]["ignored_low_confidence"] == int(np.count_nonzero(mask == 255))
    assert sample.provenance["model"] == "demo"
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["samples"][0]["edited"] is None
