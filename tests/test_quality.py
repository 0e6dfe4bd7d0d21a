"""The paper's two claims, in miniature, on the shipped demo model (fast version of
``benchmarks/quality.py``): MaskCLIP's value path beats the naive last-layer tokens, and the
shipped MaskCLIP+ student (trained on the teacher's pseudo-labels only) beats its teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(quality):
    from napari_maskclip.engine import Segmenter, TextEmbeddingCache, load_clip

    config, weights, vocab = quality.model_files(None)
    loaded = load_clip(str(config), str(weights), device="cpu")
    segmenter = Segmenter(loaded, text_cache=TextEmbeddingCache(None),
                          templates=tuple(vocab["templates"]))
    scenes = quality.make_scenes(quality.EVAL_STREAM, 32, quality.scene_kwargs(vocab))
    return vocab, segmenter, scenes


def _miou(quality, setup, predict) -> float:
    vocab, _, scenes = setup
    return quality.score(predict, scenes, len(vocab["class_names"]) + 1).miou


def _teacher(setup, mode: str):
    vocab, segmenter, _ = setup
    background = "; ".join(vocab["background_names"])

    def predict(image):
        return segmenter(image, vocab["class_names"], background=background, mode=mode,
                         denoise=False).labels
    return predict


def test_value_path_beats_naive_tokens(quality, setup):
    naive = _miou(quality, setup, _teacher(setup, "naive"))
    maskclip = _miou(quality, setup, _teacher(setup, "maskclip"))
    assert maskclip > naive + 0.05, (maskclip, naive)


def test_shipped_student_beats_its_teacher(quality, setup):
    from napari_maskclip.demo import demo_model_files
    from napari_maskclip.student import StudentSegmenter

    files = demo_model_files()
    student = StudentSegmenter(files.student, device="cpu")
    vocab = json.loads(files.vocab.read_text())
    assert [c.name for c in student.classes] == vocab["class_names"]
    assert student.checkpoint.meta["teacher"]["model"] == "demo"
    maskclip = _miou(quality, setup, _teacher(setup, "maskclip"))
    learned = _miou(quality, setup, lambda image: student(image).labels)
    assert learned > maskclip, (learned, maskclip)
