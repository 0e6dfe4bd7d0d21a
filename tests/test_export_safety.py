"""The exporter touches only files its own ``dataset.json`` lists (and its temp and lock files).

A folder that is not a dataset and not empty is refused; a file in the way of a new sample is
refused, also with overwrite; links (symlinks) among the dataset's entries are refused, so nothing
outside the dataset is ever written or deleted. Every case runs through the Python API and the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from napari_maskclip.cli import main
from napari_maskclip.errors import DatasetError
from napari_maskclip.export import export_sample, read_dataset
from napari_maskclip.image_files import write_label_image

needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (12, 14)).astype(np.uint8)
    return image, labels


def _snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file (and link) under ``roots``, with its bytes: what must not change."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                out[str(path)] = b"link->" + os.readlink(path).encode()
            elif path.is_file():
                out[str(path)] = path.read_bytes()
            else:
                out[str(path)] = b"<dir>"
    return out


def _user_folder(root: Path) -> dict[str, bytes]:
    """A folder of the user's own images/ and masks/ (no dataset.json), plus notes."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    iio.imwrite(root / "images" / "s.jpg", np.full((12, 14, 3), 90, np.uint8))
    iio.imwrite(root / "images" / "s.png", np.full((12, 14, 3), 60, np.uint8))
    write_label_image(root / "masks" / "s.png", np.ones((12, 14), np.uint8))
    (root / "masks" / "s.txt").write_text("my notes about s")
    return _snapshot(root)


def _run_cli(capsys, tmp_path: Path, out: Path, name: str = "s", *extra: str) -> tuple[int, list[str]]:
    """``napari-maskclip export`` of one image as sample ``name``; exit code and stderr lines."""
    image, labels = _arrays(3)
    src = tmp_path / "inputs"
    src.mkdir(exist_ok=True)
    iio.imwrite(src / f"{name}.png", image)
    write_label_image(src / f"{name}_lab.png", labels)
    capsys.readouterr()
    code = main(["export", "--images", str(src / f"{name}.png"), "--labels", str(src / f"{name}_lab.png"),
                 "--classes", "a, b", "--out", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


# ---- a folder that is not a dataset ---------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_python_refuses_a_user_folder_of_images_and_masks(tmp_path, overwrite):
    root = tmp_path / "mine"
    before = _user_folder(root)
    image, labels = _arrays()
    with pytest.raises(DatasetError, match="not empty and not a dataset"):
        export_sample(root, "s", image, labels, "a, b", overwrite=overwrite)
    assert _snapshot(root) == before


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_cli_refuses_a_user_folder_of_images_and_masks(tmp_path, capsys, extra):
    root = tmp_path / "mine"
    before = _user_folder(root)
    code, err = _run_cli(capsys, tmp_path, root, "s", *extra)
    assert code != 0
    assert len(err) == 1 and "not empty and not a dataset" in err[0] and "Traceback" not in err[0]
    assert _snapshot(root) == before


def test_an_empty_folder_and_os_clutter_are_accepted(tmp_path):
    root = tmp_path / "new"
    root.mkdir()
    (root / ".DS_Store").write_bytes(b"finder")
    image, labels = _arrays()
    export_sample(root, "s", image, labels, "a, b")
    assert read_dataset(root).names == ["s"]
    assert (root / ".DS_Store").read_bytes() == b"finder"


# ---- links out of the dataset ---------------------------------------------------------------
@needs_symlinks
@pytest.mark.parametrize("api", ["python", "cli"])
def test_a_linked_images_folder_in_a_new_folder_is_refused(tmp_path, capsys, api):
    photos = tmp_path / "photos"
    photos.mkdir()
    iio.imwrite(photos / "s.jpg", np.zeros((12, 14, 3), np.uint8))
    (photos / "s.txt").write_text("outside the dataset")
    root = tmp_path / "ds"
    root.mkdir()
    (root / "images").symlink_to(photos, target_is_directory=True)
    before = _snapshot(photos, root)
    if api == "python":
        image, labels = _arrays()
        with pytest.raises(DatasetError):
            export_sample(root, "s", image, labels, "a, b")
    else:
        code, err = _run_cli(capsys, tmp_path, root, "s")
        assert code != 0 and len(err) == 1
    assert _snapshot(photos, root) == before


@needs_symlinks
@pytest.mark.parametrize("api", ["python", "cli"])
@pytest.mark.parametrize("linked", ["images", "masks"])
def test_a_linked_folder_inside_a_dataset_is_refused(tmp_path, capsys, api, linked):
    root = tmp_path / "ds"
    image, labels = _arrays()
    export_sample(root, "first", image, labels, "a, b")
    outside = tmp_path / "outside"
    (root / linked).rename(outside)  # the user moved the folder away and linked it back
    (root / linked).symlink_to(outside, target_is_directory=True)
    iio.imwrite(outside / "s.jpg", np.zeros((12, 14, 3), np.uint8))
    (outside / "s.txt").write_text("outside the dataset")
    before = _snapshot(outside, root)
    if api == "python":
        with pytest.raises(DatasetError, match="link"):
            export_sample(root, "s", image, labels, "a, b", overwrite=True)
    else:
        code, err = _run_cli(capsys, tmp_path, root, "s", "--overwrite")
        assert code != 0 and len(err) == 1 and "link" in err[0]
    assert _snapshot(outside, root) == before


@needs_symlinks
def test_a_linked_sample_file_is_never_replaced(tmp_path):
    root = tmp_path / "ds"
    image, labels = _arrays()
    export_sample(root, "first", image, labels, "a, b")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (root / "masks" / "s.png").symlink_to(victim)
    before = _snapshot(root)
    with pytest.raises(DatasetError, match="in the way"):
        export_sample(root, "s", image, labels, "a, b", overwrite=True)
    assert victim.read_bytes() == b"precious" and _snapshot(root) == before


# ---- files in the way of a new sample ---------------------------------------------------------
@pytest.mark.parametrize("api", ["python", "cli"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_unlisted_file_in_the_way_is_refused(tmp_path, capsys, api, overwrite):
    root = tmp_path / "ds"
    image, labels = _arrays()
    export_sample(root, "first", image, labels, "a, b")
    iio.imwrite(root / "images" / "s.png", np.full((5, 5, 3), 7, np.uint8))  # the user's own file
    before = _snapshot(root)
    if api == "python":
        with pytest.raises(DatasetError, match="in the way"):
            export_sample(root, "s", image, labels, "a, b", overwrite=overwrite)
    else:
        code, err = _run_cli(capsys, tmp_path, root, "s", *(["--overwrite"] if overwrite else []))
        assert code != 0 and len(err) == 1 and "in the way" in err[0], err
    assert _snapshot(root) == before
    assert read_dataset(root).names == ["first"]


@pytest.mark.parametrize("api", ["python", "cli"])
def test_unlisted_files_named_like_a_sample_are_never_deleted(tmp_path, capsys, api):
    root = tmp_path / "ds"
    image, labels = _arrays()
    export_sample(root, "first", image, labels, "a, b")
    (root / "masks" / "s.txt").write_text("my notes about s")
    iio.imwrite(root / "images" / "s.jpg", np.full((5, 5, 3), 7, np.uint8))
    notes, jpg = (root / "masks" / "s.txt").read_bytes(), (root / "images" / "s.jpg").read_bytes()
    if api == "python":
        export_sample(root, "s", image, labels, "a, b")
    else:
        code, err = _run_cli(capsys, tmp_path, root, "s")
        assert code == 0, err
    assert (root / "masks" / "s.txt").read_bytes() == notes
    assert (root / "images" / "s.jpg").read_bytes() == jpg
    assert read_dataset(root).names == ["first", "s"]


def test_overwrite_replaces_and_removes_only_the_listed_files(tmp_path):
    root = tmp_path / "ds"
    image, labels = _arrays()
    export_sample(root, "s", image, labels, "a, b")
    assert (root / "images" / "s.png").is_file()
    wide = np.arange(12 * 14, dtype=np.uint16).reshape(12, 14)  # 16-bit: stored as TIFF now
    export_sample(root, "s", wide, labels, "a, b", overwrite=True)
    ds = read_dataset(root)
    assert ds["s"].image_path.name == "s.tif" and not (root / "images" / "s.png").exists()
    np.testing.assert_array_equal(ds["s"].read_image(), wide)


def test_a_hand_edited_index_cannot_make_the_exporter_delete_outside(tmp_path):
    root = tmp_path / "ds"
    image, labels = _arrays()
    export_sample(root, "s", image, labels, "a, b")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"precious")
    info = json.loads((root / "dataset.json").read_text())
    info["samples"][0]["confidence"] = "../outside.png"
    info["pending"] = ["../outside.png", "masks/../../outside.png", str(outside)]
    (root / "dataset.json").write_text(json.dumps(info))
    export_sample(root, "s", image, labels, "a, b", overwrite=True)
    export_sample(root, "t", image, labels, "a, b")
    assert outside.read_bytes() == b"precious"
    assert read_dataset(root).names == ["s", "t"]


def test_cli_checks_every_input_before_the_first_is_exported(tmp_path, capsys):
    root = tmp_path / "ds"
    image, labels = _arrays()
    export_sample(root, "first", image, labels, "a, b")
    iio.imwrite(root / "masks" / "z.png", np.zeros((5, 5), np.uint8))  # in the way of input 'z'
    src = tmp_path / "inputs"
    src.mkdir()
    for stem in ("y", "z"):
        iio.imwrite(src / f"{stem}.png", image)
        write_label_image(src / f"{stem}_lab.png", labels)
    before = _snapshot(root)
    capsys.readouterr()
    code = main(["export", "--images", str(src / "y.png"), str(src / "z.png"),
                 "--labels", str(src / "y_lab.png"), str(src / "z_lab.png"),
                 "--classes", "a, b", "--out", str(root), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "in the way" in err[0]
    assert _snapshot(root) == before  # 'y' was not exported either
