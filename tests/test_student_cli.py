"""``napari-maskclip train`` and ``predict`` on exported datasets, end to end."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from napari_maskclip.cli import main
from napari_maskclip.export import export_sample, read_dataset
from napari_maskclip.result_files import read_result
from napari_maskclip.student import load_checkpoint, read_checkpoint_meta
from napari_maskclip.student.data import load_training_data

from test_student_train import COLOURS, shapes_data

TINY = ["--backbone", "tiny", "--backbone-weights", "random", "--crop-size", "32",
        "--batch-size", "2", "--val-every", "0", "--quiet"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: tiny networks gain nothing from more, and on a busy small machine
    threads spin against each other (measured 10x slower). conftest's OMP_NUM_THREADS=1 comes
    too late when a pytest plugin has already loaded the OpenMP runtime, so set it here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _export(folder, data, *, edited, provenance=None):
    for i, sample in enumerate(data.samples):
        labels = np.where(sample.labels < 0, 255, sample.labels).astype(np.uint8)
        export_sample(folder, f"img{i}", sample.image, labels, list(COLOURS), edited=edited,
                      provenance=provenance)
    return folder


@pytest.fixture
def dataset(tmp_path, tiny_vit_files):
    """Exact labels (every pixel edited); the teacher recorded as the tiny ViT."""
    config, ckpt = tiny_vit_files
    provenance = {"model": str(config), "pretrained": str(ckpt),
                  "settings": {"templates": "single", "denoise": False}}
    return _export(tmp_path / "ds", shapes_data(6, size=40), edited=True, provenance=provenance)


def test_train_then_predict(dataset, tmp_path, tiny_vit_files, capsys):
    ckpt = tmp_path / "student.safetensors"
    assert main(["train", str(dataset), "--out", str(ckpt), "--iterations", "3", *TINY]) == 0
    meta = read_checkpoint_meta(ckpt)
    assert meta["iteration"] == 3 and meta["complete"]
    assert meta["teacher"]["model"] == str(tiny_vit_files[0])  # from the dataset's provenance
    assert meta["teacher"]["settings"]["templates"] == "single"
    assert meta["datasets"] == [str(dataset)]
    assert "3 iterations" in capsys.readouterr().out

    images = []
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (40, 56, 3)), ("b.png", (33, 30))):
        images.append(tmp_path / name)
        iio.imwrite(images[-1], (rng.random(shape) * 255).astype(np.uint8))
    out = tmp_path / "pred"
    assert main(["predict", *map(str, images), "--student", str(ckpt), "--out", str(out), "--quiet"]) == 0
    for path, shape in zip(images, ((40, 56), (33, 30))):
        files = read_result(out / f"{path.stem}_classes.json", confidence=True)
        assert files.labels.shape == shape
        assert files.confidence.shape == (3, *shape)
        assert [c["name"] for c in files.table["classes"]] == list(COLOURS)
        assert files.table["settings"]["student_checkpoint"] == str(ckpt)
    # A rerun skips finished images; other settings are refused without --overwrite; errors are
    # one line.
    capsys.readouterr()
    assert main(["predict", str(images[0]), "--student", str(ckpt), "--out", str(out), "--quiet"]) == 0
    assert "skipped 1 finished image" in capsys.readouterr().out
    assert main(["predict", str(images[0]), "--student", str(ckpt), "--out", str(out), "--quiet",
                 "--window", "64"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["predict", str(images[0]), "--student", str(tiny_vit_files[1]), "--out",
                 str(tmp_path / "x"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a napari-maskclip student checkpoint" in err and "\n" not in err
    assert main(["predict", str(images[0]), "--student", str(ckpt), "--out", str(tmp_path / "y"),
                 "--classes", "purple", "--quiet"]) == 1
    assert "not trained on 'purple'" in capsys.readouterr().err


def test_resume_from_the_cli(dataset, tmp_path, capsys):
    ckpt = tmp_path / "s.safetensors"
    assert main(["train", str(dataset), "--out", str(ckpt), "--iterations", "2", *TINY]) == 0
    assert main(["train", str(dataset), "--out", str(ckpt), "--iterations", "2", *TINY]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(dataset), "--out", str(ckpt), "--resume", "--lr", "0.5", "--quiet"]) == 1
    assert "--resume keeps" in capsys.readouterr().err
    assert main(["train", str(dataset), "--out", str(ckpt), "--resume", "--iterations", "4", "--quiet"]) == 0
    saved = load_checkpoint(ckpt)
    assert saved.iteration == 4
    assert [h["iteration"] for h in saved.meta["history"]] == [1, 2, 3, 4]


def test_unedited_pixels_use_the_teacher_given_on_the_command_line(tmp_path, tiny_vit_files):
    """A dataset without provenance, half edited: the teacher comes from --model/--pretrained."""
    data = shapes_data(4, size=40)
    edited = np.zeros((40, 40), dtype=bool)
    edited[:20] = True
    folder = _export(tmp_path / "ds", data, edited=edited)
    loaded = load_training_data([folder])
    assert all(s.needs_teacher for s in loaded.samples)
    ckpt = tmp_path / "t.safetensors"
    assert main(["train", str(folder), "--out", str(ckpt), "--iterations", "2", *TINY]) == 1
    config, weights = tiny_vit_files
    assert main(["train", str(folder), "--out", str(ckpt), "--iterations", "2", "--model",
                 str(config), "--pretrained", str(weights), "--templates", "single", *TINY]) == 0
    meta = read_checkpoint_meta(ckpt)
    assert meta["teacher"]["pretrained"] == str(weights)


def test_datasets_combine_by_class_name(tmp_path):
    first = _export(tmp_path / "a", shapes_data(2, size=32), edited=True)
    data = shapes_data(2, seed=1, size=32)
    folder = tmp_path / "b"
    for i, sample in enumerate(data.samples):
        # The same classes in another order, plus one the first dataset does not have.
        reorder = np.array([0, 3, 1, 2])  # red 1 -> 3, green 2 -> 1, blue 3 -> 2
        labels = reorder[sample.labels].astype(np.uint8)
        export_sample(folder, f"img{i}", sample.image, labels, ["green", "blue", "red", "cyan"],
                      edited=None)
    combined = load_training_data([first, folder])
    assert combined.class_names == ["red", "green", "blue", "cyan"]
    assert [s.name for s in combined.samples] == ["a/img0", "a/img1", "b/img0", "b/img1"]
    # Remapped back to the first dataset's label values.
    assert np.array_equal(combined.samples[2].labels, data.samples[0].labels)
    assert combined.samples[2].trusted is None  # no edit information: labels trusted by default
    relabel = load_training_data([first, folder], unknown_edits="teacher")
    assert not relabel.samples[2].trusted.any() and relabel.samples[0].trusted.all()
    assert len(read_dataset(folder)) == 2
