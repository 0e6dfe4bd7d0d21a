"""TorchScript checkpoints (OpenAI's original ``.pt`` format) are read without running them.

``torch.jit.load`` runs an archive's ``__setstate__``; the project reads the weights out of the
zip with a restricted unpickler instead. The archives here are real ones, made by
``torch.jit.script`` / ``torch.jit.trace``; nothing is downloaded.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch

from engine_helpers import build_clip, tiny_config, write_config
from napari_maskclip.cli import main
from napari_maskclip.engine import load_clip, wrap_model
from napari_maskclip.engine.checkpoints import read_state_dict
from napari_maskclip.errors import ModelLoadError, UnsafeCheckpointError


class FileWriter(torch.nn.Module):
    """A module whose TorchScript ``__setstate__`` creates and fills a file (``from_file``)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.target = target
        self.sink = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.target = state[1]
        self.training = state[2]
        written = torch.from_file(state[1], shared=True, size=16, dtype=torch.uint8)
        written.fill_(65)
        self.sink = written


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* are deprecated (FutureWarning)
        return fn(*args, **kwargs)


@pytest.fixture
def hostile_archive(tmp_path) -> tuple[Path, Path]:
    target = tmp_path / "written-by-checkpoint.bin"
    archive = tmp_path / "ViT-B-32.pt"
    _quiet(torch.jit.script, FileWriter(str(target))).save(str(archive))
    assert not target.exists()
    return archive, target


def test_the_hostile_archive_really_writes_when_run(hostile_archive):
    """The archive is a real threat: TorchScript's own loader creates the file."""
    archive, target = hostile_archive
    _quiet(torch.jit.load, str(archive))
    assert target.read_bytes() == b"A" * 16


def test_torchscript_setstate_never_runs(hostile_archive, tmp_path):
    archive, target = hostile_archive
    with pytest.raises(UnsafeCheckpointError, match="__setstate__"):
        read_state_dict(archive)
    config = write_config(tiny_config("tiny_vit"), tmp_path / "tiny_vit.json")
    with pytest.raises(ModelLoadError):
        load_clip(str(config), str(archive), device="cpu")
    assert not target.exists()


def test_cli_refuses_torchscript_code_in_one_line(hostile_archive, tmp_path, capsys):
    archive, target = hostile_archive
    image = tmp_path / "a.png"
    import imageio.v3 as iio

    iio.imwrite(image, np.zeros((16, 16, 3), np.uint8))
    config = write_config(tiny_config("tiny_vit"), tmp_path / "tiny_vit.json")
    code = main(["segment", str(image), "--classes", "cat", "--out", str(tmp_path / "out"),
                 "--quiet", "--model", str(config), "--pretrained", str(archive)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "__setstate__" in err and "Traceback" not in err
    assert not target.exists()


def test_a_foreign_global_in_the_archive_is_refused_unrun(tmp_path):
    """A hand-made archive whose data.pkl calls os.mkdir: refused, the folder is not made."""
    made = tmp_path / "made-by-pickle"

    class Payload:
        def __reduce__(self):
            import os

            return (os.mkdir, (str(made),))

    archive = tmp_path / "crafted.pt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("crafted/data.pkl", pickle.dumps(Payload(), protocol=2))
        zf.writestr("crafted/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("crafted/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
    with pytest.raises(UnsafeCheckpointError, match="mkdir"):
        read_state_dict(archive)
    assert not made.exists()


@pytest.mark.parametrize("config_name", ["tiny_vit", "tiny_resnet"])
def test_traced_clip_weights_read_exactly_without_jit(config_name, tmp_path, monkeypatch):
    cfg = tiny_config(config_name)
    model = build_clip(cfg, seed=5)
    size = cfg["vision_cfg"]["image_size"]
    image = torch.randn(1, 3, size, size)
    text = torch.randint(0, cfg["text_cfg"]["vocab_size"], (1, cfg["text_cfg"]["context_length"]))
    archive = tmp_path / f"{config_name}.pt"
    _quiet(torch.jit.trace, model, (image, text), strict=False).save(str(archive))
    reference = _quiet(torch.jit.load, str(archive)).state_dict()

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called on a checkpoint")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    state, fmt = read_state_dict(archive)
    assert fmt == "openai-jit"
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key

    config = write_config(cfg, tmp_path / f"{config_name}.json")
    loaded = load_clip(str(config), str(archive), device="cpu")
    assert loaded.pretrained == str(archive)
    expected = wrap_model(model, device="cpu").model.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key].float(), expected[key].float()), key
