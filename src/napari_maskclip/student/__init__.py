"""MaskCLIP+: a DeepLab-style student self-trained on MaskCLIP pseudo-labels and people's labels.

UI-free (no napari, no Qt). Typical use::

    from napari_maskclip.student import train, StudentSegmenter
    result = train(["my-dataset/"], "student.safetensors", teacher="ViT-B-16", pretrained="openai")
    seg = StudentSegmenter("student.safetensors")
    out = seg(image)                  # a SegmentationResult, like MaskCLIP's

Training is a generator (:func:`train_iter`) yielding progress with the loss, shared by the
widget, the CLI and tests.
"""

from .checkpoint import (
    FORMAT,
    StudentCheckpoint,
    is_student_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from .data import IGNORE, Sample, TrainingData, compose_targets
from .network import BACKBONES, StudentNet, build_student
from .predict import StudentSegmenter
from .settings import TrainSettings
from .train import TrainResult, segmentation_loss, train, train_iter

__all__ = [
    "BACKBONES",
    "FORMAT",
    "IGNORE",
    "Sample",
    "StudentCheckpoint",
    "StudentNet",
    "StudentSegmenter",
    "TrainResult",
    "TrainSettings",
    "TrainingData",
    "build_student",
    "compose_targets",
    "is_student_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "save_checkpoint",
    "segmentation_loss",
    "train",
    "train_iter",
]
