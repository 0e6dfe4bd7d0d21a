"""Edited or damaged student checkpoints: one clear error that names the file, never a traceback,
a hang or an allocation without bound, whether the checkpoint is loaded for prediction, resumed
through the API, or resumed from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_maskclip.cli import main
from napari_maskclip.errors import MaskClipError
from napari_maskclip.student import StudentSegmenter, train
from napari_maskclip.student.data import load_training_data

from test_student_cli import _export
from test_student_train import random_embeddings, shapes_data, tiny_settings

KEY = "napari_maskclip"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset folder, a good checkpoint trained on it for 2 of 3 iterations)."""
    root = tmp_path_factory.mktemp("base")
    folder = _export(root / "ds", shapes_data(5, size=40), edited=True)
    ckpt = root / "good.safetensors"
    train(load_training_data([folder]), ckpt, settings=tiny_settings(iterations=2),
          class_embeddings=random_embeddings(4, 16), device="cpu")
    return folder, ckpt


def edited(meta: Optional[Callable[[dict], Any]] = None,
           tensors: Optional[Callable[[dict], Any]] = None,
           raw: Optional[str] = None) -> dict:
    return {"meta": meta, "tensors": tensors, "raw": raw}


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit that sets ``a.b.0.c`` to ``value`` (or deletes it when value is ``_DELETE``)."""
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        node: Any = meta
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value
    return edit


_DELETE = object()
CONV = "model/backbone.body.0.0.weight"

#: (id, edit, must the prediction loader refuse it too?)
CASES = [
    ("not-an-object", edited(raw="[1, 2, 3]"), True),
    ("nested-100k-deep", edited(raw="[" * 100_000 + "]" * 100_000), True),
    ("not-json", edited(raw="{'iteration': 2"), True),
    ("format-version-text", edited(_set("format_version", "1")), True),
    ("missing-classes", edited(_set("classes", _DELETE)), True),
    ("missing-settings", edited(_set("settings", _DELETE)), True),
    ("missing-iteration", edited(_set("iteration", _DELETE)), True),
    ("iteration-text", edited(_set("iteration", "2")), True),
    ("iteration-negative", edited(_set("iteration", -1)), True),
    ("iteration-huge", edited(_set("iteration", 10**30)), True),
    ("iteration-beyond-schedule", edited(_set("iteration", 3)), True),
    ("iterations-huge", edited(_set("settings.iterations", 10**12)), True),
    ("crop-huge", edited(_set("settings.crop_size", 10**9)), True),
    ("batch-huge", edited(_set("settings.batch_size", 10**9)), True),
    ("pixels-per-step-huge", edited(lambda m: m["settings"].update(crop_size=4096, batch_size=64)),
     True),
    ("lr-text", edited(_set("settings.lr", "fast")), True),
    ("lr-nan", edited(_set("settings.lr", float("nan"))), True),
    ("seed-negative", edited(_set("settings.seed", -5)), True),
    ("backbone-unknown", edited(_set("settings.backbone", "vgg")), True),
    ("flip-text", edited(_set("settings.flip", "yes")), True),
    ("settings-list", edited(_set("settings", [1, 2])), True),
    ("teacher-settings-bad", edited(_set("settings.teacher_settings", {"window": "big"})), True),
    ("complete-text", edited(_set("complete", "yes")), True),
    ("classes-empty", edited(_set("classes", [])), True),
    ("class-missing", edited(lambda m: m["classes"].pop()), True),
    ("class-extra", edited(lambda m: m["classes"].append(
        {"index": 4, "name": "x", "synonyms": ["x"]})), True),
    ("class-not-a-mapping", edited(_set("classes.0", "red")), True),
    ("class-index-wrong", edited(_set("classes.1.index", 7)), True),
    ("synonyms-empty", edited(_set("classes.0.synonyms", [])), True),
    ("synonyms-missing", edited(_set("classes.0.synonyms", _DELETE)), True),
    ("synonym-not-text", edited(_set("classes.0.synonyms", [1])), True),
    ("name-huge", edited(lambda m: m["classes"][0].update(name="x" * 10**6,
                                                          synonyms=["x" * 10**6])), True),
    ("color-text", edited(_set("classes.0.color", "red")), True),
    ("background-huge", edited(_set("background", ["floor"] * 10**5)), True),
    ("background-number", edited(_set("background", [3])), True),
    ("teacher-text", edited(_set("teacher", "ViT-B-16")), True),
    ("teacher-settings-wrong-type", edited(_set("teacher", {"settings": {"max_whole_pixels": "x"}})), True),
    ("split-text", edited(_set("split", "all")), True),
    ("split-numbers", edited(_set("split.train", [1, 2])), True),
    ("datasets-mapping", edited(_set("datasets", {"a": 1})), True),
    ("history-longer-than-run", edited(lambda m: m.update(history=m["history"] * 1000)), True),
    ("history-loss-text", edited(_set("history.0.loss", "low")), True),
    ("history-iteration-huge", edited(_set("history.0.iteration", 10**9)), True),
    ("optimizer-two-groups", edited(lambda m: m.update(
        optimizer_param_groups=m["optimizer_param_groups"] * 2)), True),
    ("optimizer-params-wrong", edited(_set("optimizer_param_groups.0.params", [0, 0, 1])), True),
    ("optimizer-momentum-text", edited(_set("optimizer_param_groups.0.momentum", "0.9")), True),
    ("optimizer-momentum-differs", edited(_set("optimizer_param_groups.0.momentum", 0.5)), True),
    ("optimizer-flag-number", edited(_set("optimizer_param_groups.0.nesterov", 2)), True),
    ("optimizer-scalars-garbage", edited(_set("optimizer_scalars", {"x": 1})), True),
    ("optimizer-too-few-params", edited(_set("optimizer_param_groups.0.params", [0, 1])), False),
    # Tensors that disagree with the description or the network.
    ("embeddings-rows", edited(tensors=lambda t: t.update(
        {"model/class_embeddings": t["model/class_embeddings"][:-1]})), True),
    ("embeddings-too-wide", edited(tensors=lambda t: t.update(
        {"model/class_embeddings": torch.zeros(4, 9000)})), True),
    ("embeddings-missing", edited(tensors=lambda t: t.pop("model/class_embeddings")), True),
    ("weight-shape", edited(tensors=lambda t: t.update({CONV: torch.zeros(2, 2)})), True),
    ("weight-missing", edited(tensors=lambda t: t.pop(CONV)), True),
    ("optimizer-tensor-name", edited(tensors=lambda t: t.update(
        {"optimizer/x/momentum_buffer": torch.zeros(1)})), True),
    ("optimizer-tensor-index", edited(tensors=lambda t: t.update(
        {"optimizer/99/momentum_buffer": torch.zeros(1)})), True),
    ("momentum-shape", edited(tensors=lambda t: t.update(
        {"optimizer/0/momentum_buffer": torch.zeros(3)})), False),
    ("momentum-dtype", edited(tensors=lambda t: t.update(
        {"optimizer/0/momentum_buffer": t["optimizer/0/momentum_buffer"].long()})), False),
]


def write_edited(good: Path, out: Path, edit: dict) -> Path:
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as handle:
        meta = json.loads(handle.metadata()[KEY])
    if edit["meta"]:
        edit["meta"](meta)
    if edit["tensors"]:
        edit["tensors"](tensors)
    text = edit["raw"] if edit["raw"] is not None else json.dumps(meta)
    save_file(tensors, str(out), metadata={KEY: text})
    return out


def assert_clear(error: BaseException, path: Path) -> None:
    message = str(error)
    assert isinstance(error, MaskClipError), repr(error)
    assert str(path) in message and "\n" not in message and len(message) < 600, message


def test_the_unedited_checkpoint_passes_every_path(base, tmp_path, capsys):
    """The control: the same rewriting with no edit loads, resumes and resumes from the CLI."""
    folder, good = base
    path = write_edited(good, tmp_path / "c.safetensors", edited())
    assert StudentSegmenter(path, device="cpu").class_names == ["red", "green", "blue"]
    assert main(["train", str(folder), "--out", str(path), "--resume", "--quiet"]) == 0
    result = train(load_training_data([folder]), path, resume=True, iterations=3, device="cpu")
    assert result.iteration == 3


@pytest.mark.parametrize("edit, predict_refuses", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_malformed_checkpoint_gives_one_clear_error(base, tmp_path, capsys, edit, predict_refuses):
    folder, good = base
    path = write_edited(good, tmp_path / "bad.safetensors", edit)
    before = path.read_bytes()

    # Loading for prediction: refused with one line naming the file (or, for optimiser-only
    # damage, which prediction does not read, loaded fine).
    try:
        StudentSegmenter(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - the point is which exception it is
        assert_clear(exc, path)
    else:
        assert not predict_refuses, "the damaged checkpoint was loaded"

    # Resuming through the API.
    with pytest.raises(Exception) as info:
        train(load_training_data([folder]), path, resume=True, iterations=3, device="cpu")
    assert_clear(info.value, path)

    # Resuming from the command line: one line, exit 1.
    assert main(["train", str(folder), "--out", str(path), "--resume", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "\n" not in err and "Traceback" not in err, err
    assert path.read_bytes() == before  # a refused checkpoint is never rewritten
