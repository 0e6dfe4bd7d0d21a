"""Written files get the user's normal mode (``0o666`` less the umask), not ``mkstemp``'s 0600.

A dataset or a result in a shared folder must be readable by colleagues when the umask says so.
Checked for each kind of output: segment results, an exported sample with dataset.json, and a
student checkpoint, under umask 022 and 002.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from napari_maskclip.cli import main
from napari_maskclip.export import export_sample

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_modes(paths, umask: int) -> None:
    expected = 0o666 & ~umask
    paths = list(paths)
    assert paths
    for path in paths:
        assert _mode(path) == expected, f"{path.name}: {oct(_mode(path))} != {oct(expected)}"


def test_segment_outputs_get_the_umask_mode(tmp_path, tiny_vit_files, umask):
    image = tmp_path / "cell.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (24, 30, 3), dtype=np.uint8))
    config, ckpt = tiny_vit_files
    out = tmp_path / "out"
    assert main(["segment", str(image), "--classes", "cat, dog", "--out", str(out), "--quiet",
                 "--model", str(config), "--pretrained", str(ckpt), "--templates", "single"]) == 0
    written = sorted(out.iterdir())
    assert {p.name for p in written} == {"cell_labels.png", "cell_confidence.tif", "cell_classes.json"}
    _assert_modes(written, umask)


def test_exported_files_and_dataset_json_get_the_umask_mode(tmp_path, umask):
    rng = np.random.default_rng(1)
    root = tmp_path / "ds"
    export_sample(root, "s", rng.integers(0, 256, (12, 14, 3), dtype=np.uint8),
                  rng.integers(0, 3, (12, 14)).astype(np.uint8), "a, b",
                  probabilities=rng.random((2, 12, 14)).astype(np.float32), edited=True)
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.relative_to(root).as_posix() for p in files}
    assert {"dataset.json", "classes.json", "images/s.png", "masks/s.png", "confidence/s.tif",
            "edited/s.png"} <= names
    _assert_modes(files, umask)
    # Replacing a sample writes new files, with the same mode.
    export_sample(root, "s", rng.integers(0, 256, (12, 14, 3), dtype=np.uint8),
                  rng.integers(0, 3, (12, 14)).astype(np.uint8), "a, b", overwrite=True)
    _assert_modes([root / "dataset.json", root / "masks" / "s.png", root / "images" / "s.png"], umask)


def test_student_checkpoint_gets_the_umask_mode(tmp_path, umask):
    import torch

    from napari_maskclip.student.checkpoint import save_checkpoint
    from napari_maskclip.student.network import build_student

    net = build_student("tiny", torch.nn.functional.normalize(torch.randn(3, 16), dim=-1))
    path = save_checkpoint(tmp_path / "student.safetensors", net, {"classes": ["a", "b", "c"]})
    _assert_modes([path], umask)
