"""MaskCLIP+: a DeepLab-style student self-trained on MaskCLIP pseudo-labels and people's labels.

UI-free (no napari, no Qt). Typical use::

    from napari_maskclip.student import train, StudentSegmenter
    result = train(["my-dataset/"], "student.safetensors", teacher="ViT-B-16", pretrained="openai")
    seg = StudentSegmenter("student.safetensors")
    out = seg(image)                  # a SegmentationResult, like MaskCLIP's

Training is a generator (:func:`train_iter`) yielding progress with the loss, shared by the
widget, the CLI and tests.

Names are imported lazily, so ``napari_maskclip.student.settings`` (and the CLI's option lists)
load without torch. No submodule is named like an export (the loop lives in ``training``, not
``train``): importing a submodule sets it as a package attribute, which would shadow the lazy
name, and ``from napari_maskclip.student import train`` would then return a module.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKBONES": "settings",
    "FORMAT": "checkpoint",
    "IGNORE": "data",
    "Sample": "data",
    "StudentCheckpoint": "checkpoint",
    "StudentNet": "network",
    "StudentSegmenter": "predict",
    "TrainResult": "training",
    "TrainSettings": "settings",
    "TrainingData": "data",
    "build_student": "network",
    "compose_targets": "data",
    "is_student_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_checkpoint_meta": "checkpoint",
    "save_checkpoint": "checkpoint",
    "segmentation_loss": "training",
    "train": "training",
    "train_iter": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
