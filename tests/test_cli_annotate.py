"""``napari-maskclip annotate``: refusals come as one line and exit code 1, before any window."""

from __future__ import annotations

import sys

import imageio.v3 as iio
import numpy as np
import pytest

from napari_maskclip.cli import main


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    iio.imwrite(images / "a.png", np.zeros((16, 16, 3), np.uint8))
    return images


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_no_display_is_one_line(monkeypatch, capsys, folder, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    code = main(["annotate", str(folder), "--dataset", str(tmp_path / "ds"), "--classes", "a, b"])
    assert code == 1
    assert _one_line(capsys).startswith("napari-maskclip annotate: error: annotate opens napari "
                                        "and needs a display")


@pytest.mark.parametrize("case", ["no classes", "no student file", "no images"])
def test_bad_arguments_are_refused_before_napari_opens(monkeypatch, capsys, folder, tmp_path,
                                                       case):
    monkeypatch.setenv("DISPLAY", ":99")  # a display "exists": the checks come first anyway
    opened = []
    monkeypatch.setattr("napari_maskclip.cli.annotate._gui", lambda args: opened.append(args))
    args = ["annotate", str(folder), "--dataset", str(tmp_path / "ds")]
    expected = {"no classes": "Give the class names",
                "no student file": "Student checkpoint not found",
                "no images": "No images"}[case]
    if case == "no student file":
        args += ["--student", str(tmp_path / "missing.safetensors")]
    elif case == "no images":
        empty = tmp_path / "empty"
        empty.mkdir()
        args = ["annotate", str(empty), "--dataset", str(tmp_path / "ds"), "--classes", "a"]
    assert main(args) == 1
    assert expected in _one_line(capsys)
    assert not opened


def test_classes_and_student_are_exclusive(capsys, folder, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", str(folder), "--dataset", str(tmp_path / "ds"), "--classes", "a",
              "--student", "s.safetensors"])
    assert exit_info.value.code == 2


def test_a_dataset_with_other_classes_is_refused_unless_remapped(monkeypatch, capsys, folder,
                                                                 tmp_path):
    from napari_maskclip.export import export_sample

    dataset = tmp_path / "ds"
    export_sample(dataset, "x", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), "cat")
    monkeypatch.setenv("DISPLAY", ":99")
    opened = []
    monkeypatch.setattr("napari_maskclip.cli.annotate._gui", lambda args: opened.append(args) or 0)
    base = ["annotate", str(folder), "--dataset", str(dataset), "--classes", "cat, dog"]
    assert main(base) == 1
    assert "remap" in _one_line(capsys) and not opened
    assert main(base + ["--remap"]) == 1  # dog is not in the dataset: needs --add-classes
    assert "dog" in _one_line(capsys) and not opened
    assert main(base + ["--add-classes"]) == 1
    assert "--add-classes needs --remap" in _one_line(capsys)
    assert main(base + ["--remap", "--add-classes"]) == 0
    assert opened and opened[0].remap and opened[0].add_classes
