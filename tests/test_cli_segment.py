"""The ``segment`` command: three readable files per image, one-line errors, nothing clobbered."""

from __future__ import annotations

import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_maskclip.cli import main
from napari_maskclip.image_files import read_label_image

from hang_guard import HANG_GUARD_S


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("a.png", (40, 56, 3)), ("b.png", (33, 30))):
        path = tmp_path / name
        iio.imwrite(path, (rng.random(shape) * 255).astype(np.uint8))
        paths.append(path)
    return paths


def _model_args(files):
    config, ckpt = files
    return ["--model", str(config), "--pretrained", str(ckpt), "--templates", "single"]


def test_segment_writes_three_files_per_image(images, tmp_path, tiny_vit_files, capsys):
    out = tmp_path / "out"
    code = main(["segment", *map(str, images), "--classes", "cat, dog; puppy", "--out", str(out),
                 "--no-denoise", "--quiet", *_model_args(tiny_vit_files)])
    assert code == 0
    for path in images:
        stem = path.stem
        h, w = iio.imread(path).shape[:2]
        labels = read_label_image(out / f"{stem}_labels.png")
        assert labels.shape == (h, w) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1, 2}
        confidence = tifffile.imread(out / f"{stem}_confidence.tif")
        assert confidence.shape == (2, h, w) and confidence.dtype == np.float32
        assert np.all((confidence >= 0) & (confidence <= 1))
        table = json.loads((out / f"{stem}_classes.json").read_text())
        assert [c["name"] for c in table["classes"]] == ["cat", "dog"]
        assert [c["index"] for c in table["classes"]] == [1, 2]
        assert table["classes"][1]["synonyms"] == ["dog", "puppy"]
        assert table["settings"]["denoise"] is False
        # The label map is the argmax of the confidence maps (no background given).
        np.testing.assert_array_equal(labels, confidence.argmax(axis=0) + 1)


def test_segment_refuses_to_overwrite_without_flag(images, tmp_path, tiny_vit_files, capsys):
    out = tmp_path / "out"
    args = ["segment", str(images[0]), "--classes", "cat", "--out", str(out), "--quiet",
            *_model_args(tiny_vit_files)]
    assert main(args) == 0
    before = (out / "a_classes.json").read_bytes()
    assert main(args + ["--classes", "dog"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "--overwrite" in err[-1]
    assert (out / "a_classes.json").read_bytes() == before
    assert main(args + ["--classes", "dog", "--overwrite"]) == 0
    assert json.loads((out / "a_classes.json").read_text())["classes"][0]["name"] == "dog"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--classes", " , "], "No class names"),
        (["--classes", "cat, Cat"], "Duplicate"),
        (["--classes", "cat", "--model", "no-such-model"], "Unknown model"),
        (["--classes", "cat", "--pretrained", "/nope/weights.pt"], "not found"),
    ],
)
def test_segment_bad_input_is_one_line_and_nonzero(images, tmp_path, tiny_vit_files, capsys, extra, needle):
    args = ["segment", str(images[0]), "--out", str(tmp_path / "o"), "--quiet",
            *_model_args(tiny_vit_files), *extra]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-maskclip segment: error:")
    assert needle in err[0]
    assert not (tmp_path / "o").exists()


def test_segment_missing_image_and_nan_image(tmp_path, tiny_vit_files, capsys):
    assert main(["segment", str(tmp_path / "missing.png"), "--classes", "cat", "--out",
                 str(tmp_path / "o"), *_model_args(tiny_vit_files)]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "nan.tif"
    data = np.ones((40, 40), dtype=np.float32)
    data[3, 3] = np.nan
    tifffile.imwrite(bad, data)
    assert main(["segment", str(bad), "--classes", "cat", "--out", str(tmp_path / "o"), "--quiet",
                 *_model_args(tiny_vit_files)]) == 1
    assert "NaN" in capsys.readouterr().err


def test_cli_entry_point_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "napari_maskclip.cli", "segment", "--help"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0
    for option in ("--mode", "--denoise", "--key-smoothing", "--background", "--window",
                   "--stride", "--short-side", "--device"):
        assert option in proc.stdout


def test_cli_parser_starts_without_torch():
    """Option lists come from torch-free modules: --help and bad usage answer instantly."""
    code = ("import sys; from napari_maskclip.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'napari', 'qtpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
