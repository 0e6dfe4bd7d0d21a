"""Prediction with a trained student: MaskCLIP-shaped results, class subsets, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_maskclip.engine import SegmentationResult
from napari_maskclip.errors import InvalidInputError, ModelLoadError
from napari_maskclip.progress import run_to_completion
from napari_maskclip.student import (
    StudentSegmenter,
    TrainSettings,
    is_student_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    train,
)

from test_student_train import COLOURS, random_embeddings, shapes_data


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: tiny networks gain nothing from more, and on a busy small machine
    threads spin against each other (measured 10x slower). conftest's OMP_NUM_THREADS=1 comes
    too late when a pytest plugin has already loaded the OpenMP runtime, so set it here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny student trained for a few steps, saved as a checkpoint: (path, TrainResult)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    settings = TrainSettings(iterations=6, batch_size=4, crop_size=48, backbone="tiny",
                             backbone_weights="random", lr=0.05, val_fraction=0.2,
                             val_interval=0, save_interval=0)
    result = train(shapes_data(8, size=48), path, settings=settings,
                   class_embeddings=random_embeddings(4), device="cpu")
    torch.set_num_threads(before)
    return path, result


def test_predictions_are_maskclip_shaped_results(student):
    path, _ = student
    seg = StudentSegmenter(path, device="cpu")
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    steps = []
    result = run_to_completion(seg.run_iter(image), steps.append)
    assert isinstance(result, SegmentationResult)
    assert result.labels.shape == (50, 70) and result.labels.dtype == np.uint8
    assert result.probabilities.shape == (3, 50, 70) and result.probabilities.dtype == np.float32
    assert result.class_names == list(COLOURS)
    assert result.settings["student_checkpoint"] == str(path)
    assert steps and steps[-1].done == steps[-1].total
    # Labels are the argmax over background + classes: wherever a class wins, its label shows.
    probs = result.probabilities
    background = 1.0 - probs.sum(axis=0)
    best = np.argmax(np.concatenate([background[None], probs]), axis=0)
    assert np.mean(best == result.labels) > 0.999
    table = result.classes_table()
    assert [c["name"] for c in table["classes"]] == list(COLOURS)


@pytest.mark.parametrize("image, kwargs", [
    (np.random.default_rng(1).integers(0, 4000, (40, 45)).astype(np.uint16), {}),
    (np.random.default_rng(2).random((5, 30, 33)).astype(np.float32),
     {"channel_axis": 0, "channels": [0, 2, 4]}),
])
def test_gray_16_bit_and_multichannel_images(student, image, kwargs):
    seg = StudentSegmenter(student[0], device="cpu")
    result = seg(image, **kwargs)
    h, w = (image.shape[1:] if kwargs else image.shape)
    assert result.labels.shape == (h, w)
    assert result.probabilities.shape == (3, h, w)


def test_large_images_go_through_windows(student):
    seg = StudentSegmenter(student[0], device="cpu", window=48, max_whole_pixels=48 * 48)
    image = (np.random.default_rng(3).random((90, 130, 3)) * 255).astype(np.uint8)
    steps = []
    result = run_to_completion(seg.run_iter(image), steps.append)
    assert result.labels.shape == (90, 130)
    assert steps[-1].total > 1  # several windows
    assert result.settings["inference"] == "sliding"
    assert np.allclose(result.probabilities.sum(axis=0) <= 1.0 + 1e-5, True)


def test_class_subset_and_unknown_classes(student):
    seg = StudentSegmenter(student[0], device="cpu")
    image = shapes_data(1, seed=5, size=48).samples[0].image
    full = seg(image)
    sub = seg(image, "blue, red")
    assert sub.class_names == ["blue", "red"]
    assert np.array_equal(sub.probabilities, full.probabilities[[2, 0]])
    expected = np.select([full.labels == 3, full.labels == 1], [1, 2], 0)
    assert np.array_equal(sub.labels, expected)
    with pytest.raises(InvalidInputError, match="not trained on 'cat'"):
        seg(image, "cat")


def test_checkpoint_holds_weights_classes_embeddings_settings_iteration(student, tmp_path):
    path, result = student
    meta = read_checkpoint_meta(path)
    assert meta["iteration"] == 6 and meta["complete"] is True
    assert [c["name"] for c in meta["classes"]] == list(COLOURS)
    assert meta["background"] == ["background"]
    assert meta["settings"]["backbone"] == "tiny"
    assert "random" in meta["backbone_weights"]
    assert meta["teacher"] is None  # trained on exact labels with given embeddings
    assert len(meta["split"]["val"]) == 2 and len(meta["split"]["train"]) == 6
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.class_embeddings, random_embeddings(4))
    assert ckpt.optimizer_state is not None and ckpt.optimizer_state["state"]
    net = ckpt.build_network()
    trained = result.net.state_dict()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in net.state_dict().items())
    # The in-memory result predicts like the saved file.
    image = shapes_data(1, seed=9, size=48).samples[0].image
    assert np.array_equal(result.segmenter("cpu")(image).labels, StudentSegmenter(path, device="cpu")(image).labels)


def test_is_student_checkpoint(student, tiny_vit_files, tmp_path):
    path, _ = student
    assert is_student_checkpoint(path)
    clip_weights = tiny_vit_files[1]
    assert not is_student_checkpoint(clip_weights)
    text = tmp_path / "notes.safetensors"
    text.write_text(json.dumps({"hello": 1}))
    assert not is_student_checkpoint(text)
    assert not is_student_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="not a napari-maskclip student checkpoint"):
        StudentSegmenter(clip_weights)
