"""The Train panel's request, checked on the main thread before any worker starts (no Qt)."""

from __future__ import annotations

import pytest

from napari_maskclip.errors import InvalidInputError
from napari_maskclip.plugin.train_job import TrainRequest
from napari_maskclip.student.settings import TrainSettings


def request(tmp_path, **kwargs) -> TrainRequest:
    (tmp_path / "ds").mkdir(exist_ok=True)
    base = dict(datasets=[str(tmp_path / "ds")], checkpoint=str(tmp_path / "student"))
    return TrainRequest(**{**base, **kwargs})


def test_a_good_request_is_completed(tmp_path):
    checked = request(tmp_path).check()
    assert checked.checkpoint.endswith("student.safetensors")
    assert checked.settings == TrainSettings()


@pytest.mark.parametrize(
    "settings, message",
    [
        (TrainSettings(batch_size=1), "batch_size must be at least 2"),
        (TrainSettings(crop_size=16), "crop_size must be at least 32"),
        (TrainSettings(backbone="vgg"), "Unknown backbone"),
        (TrainSettings(self_train_fraction=2.0), "self_train_fraction"),
    ],
)
def test_impossible_settings_are_refused_at_once(tmp_path, settings, message):
    with pytest.raises(InvalidInputError, match=message):
        request(tmp_path, settings=settings).check()


def test_missing_folders_and_existing_checkpoints_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="Add at least one dataset folder"):
        request(tmp_path, datasets=[]).check()
    with pytest.raises(InvalidInputError, match="Dataset folder not found"):
        request(tmp_path, datasets=[str(tmp_path / "nowhere")]).check()
    (tmp_path / "student.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="exists already"):
        request(tmp_path).check()
    assert request(tmp_path, resume=True).check().resume
    with pytest.raises(InvalidInputError, match="Teacher weights need a teacher model"):
        request(tmp_path, overwrite=True, pretrained="openai").check()
