"""Segmenting images with a trained student, with the same result type as MaskCLIP.

:class:`StudentSegmenter` loads a checkpoint and returns the engine's
:class:`~napari_maskclip.engine.SegmentationResult` (labels 0..C, per-class probabilities, class
names from the checkpoint, settings including the checkpoint path), so the napari widget shows it
with the same layer code and ``napari-maskclip predict`` writes the same three files as
``segment``. Images go through the engine's preparation (gray, RGB(A), 16-bit, picked channels);
the network is fully convolutional, so images up to ``max_whole_pixels`` are read whole and larger
ones in overlapping windows whose logits are averaged (memory stays bounded by the window).
"""

from __future__ import annotations

import os
from typing import Any, Generator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..classes import ClassesLike, ClassSpec, parse_classes
from ..engine.device import resolve_device
from ..engine.precision import autocast_context, resolve_autocast
from ..engine.preprocess import prepare_image
from ..engine.result import SegmentationResult
from ..engine.windows import coverage, window_boxes
from ..errors import InvalidInputError
from ..progress import Progress, run_to_completion
from .checkpoint import StudentCheckpoint, load_checkpoint
from .network import StudentNet

__all__ = ["StudentSegmenter", "predict_logits_iter"]

_MIN_SIDE = 32
_ROW_BLOCK = 512


def predict_logits_iter(
    net: StudentNet,
    unit: np.ndarray,
    *,
    window: int = 512,
    stride: Optional[int] = None,
    max_whole_pixels: int = 1024 * 1024,
    device: Optional[torch.device] = None,
    precision: str = "fp32",
) -> Generator[Progress, None, torch.Tensor]:
    """``H x W x 3`` image in 0..1 -> ``(K+1) x H x W`` float32 logits on the CPU.

    The network must be in eval mode. Windows are ``window`` px every ``stride`` px (default
    two thirds of the window) when the image has more than ``max_whole_pixels`` pixels. The
    network runs under autocast to ``precision`` (a resolved name: fp32, bf16, fp16).
    """
    device = device or next(net.parameters()).device
    height, width = unit.shape[:2]
    pad_h, pad_w = max(0, _MIN_SIDE - height), max(0, _MIN_SIDE - width)
    x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)).permute(2, 0, 1)[None]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    full_h, full_w = x.shape[-2:]
    if full_h * full_w <= max_whole_pixels:
        yield Progress("predict", 0, 1, "reading the whole image")
        with torch.no_grad(), autocast_context(device, precision):
            logits = net(x.to(device)).float().cpu()[0]
        yield Progress("predict", 1, 1, "done")
        return logits[:, :height, :width]
    window = max(_MIN_SIDE, int(window))
    stride = int(stride or max(1, window * 2 // 3))
    boxes = window_boxes(full_h, full_w, window, stride)
    logits = torch.zeros(net.num_classes, full_h, full_w, dtype=torch.float32)
    total = len(boxes)
    yield Progress("predict", 0, total, f"reading {total} windows")
    for i, box in enumerate(boxes):
        crop = x[:, :, box.y0:box.y1, box.x0:box.x1].to(device)
        with torch.no_grad(), autocast_context(device, precision):
            logits[:, box.y0:box.y1, box.x0:box.x1] += net(crop).float().cpu()[0]
        yield Progress("predict", i + 1, total, f"window {i + 1}/{total}")
    rows = torch.from_numpy(coverage(full_h, window, stride))
    cols = torch.from_numpy(coverage(full_w, window, stride))
    logits /= rows[None, :, None] * cols[None, None, :]
    return logits[:, :height, :width]


class StudentSegmenter:
    """A trained MaskCLIP+ student, used like the engine's :class:`~napari_maskclip.engine.Segmenter`."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | StudentCheckpoint,
        *,
        device: str | torch.device = "auto",
        window: Optional[int] = None,
        stride: Optional[int] = None,
        max_whole_pixels: int = 1024 * 1024,
        precision: str = "auto",
    ) -> None:
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, StudentCheckpoint)
            else load_checkpoint(checkpoint, with_optimizer=False)
        )
        self.device = resolve_device(device)
        #: ``fp32`` or ``bf16`` (autocast; ``auto``: bf16 on a CPU with native bf16), or ``fp16``.
        self.precision = resolve_autocast(self.device, precision)
        self.net = self.checkpoint.build_network().to(self.device).eval()
        self.classes: list[ClassSpec] = self.checkpoint.classes
        self.background: list[ClassSpec] = self.checkpoint.background
        train = self.checkpoint.settings
        self.window = int(window or max(train.crop_size, 512))
        self.stride = stride
        self.max_whole_pixels = int(max_whole_pixels)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def path(self) -> Optional[str]:
        return str(self.checkpoint.path) if self.checkpoint.path else None

    def describe(self) -> str:
        meta = self.checkpoint.meta
        return (f"MaskCLIP+ student ({meta['settings']['backbone']}, {len(self.classes)} classes, "
                f"{meta['iteration']} iterations) on {self.device.type}")

    def resolve_classes(self, classes: Optional[ClassesLike]) -> list[int]:
        """Checkpoint class indices (1-based) of the requested classes, in the requested order."""
        if classes is None or (isinstance(classes, str) and not classes.strip()):
            return list(range(1, len(self.classes) + 1))
        lookup: dict[str, int] = {}
        for k, spec in enumerate(self.classes, start=1):
            for synonym in spec.synonyms:
                lookup.setdefault(synonym.casefold(), k)
        picked: list[int] = []
        for spec in parse_classes(classes):
            index = next((lookup[s.casefold()] for s in spec.synonyms if s.casefold() in lookup), None)
            if index is None:
                raise InvalidInputError(
                    f"The student was not trained on {spec.name!r}; it knows: "
                    f"{', '.join(self.class_names)}. Leave the classes empty to use them all."
                )
            if index not in picked:
                picked.append(index)
        return picked

    def run_iter(
        self,
        image: np.ndarray,
        classes: Optional[ClassesLike] = None,
        *,
        background: Optional[ClassesLike] = None,
        channel_axis: Optional[int] = None,
        channels: Optional[Sequence[int]] = None,
        **_ignored: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Segment one 2D image; yields progress per window.

        ``classes``: None for every class of the checkpoint, or a subset of them (by name or
        synonym); pixels the student assigns to another class become background. ``background``
        and other MaskCLIP settings are accepted for call compatibility and ignored: the student's
        classes and background were fixed by training.
        """
        picked = self.resolve_classes(classes)
        unit = prepare_image(np.asarray(image), channel_axis=channel_axis, channels=channels)
        height, width = unit.shape[:2]
        logits = yield from predict_logits_iter(
            self.net, unit, window=self.window, stride=self.stride,
            max_whole_pixels=self.max_whole_pixels, device=self.device, precision=self.precision,
        )
        del unit
        label_dtype = np.uint8 if len(picked) <= 255 else np.uint16
        labels = np.zeros((height, width), dtype=label_dtype)
        probabilities = np.zeros((len(picked), height, width), dtype=np.float32)
        values = torch.zeros(self.net.num_classes, dtype=torch.int64)
        for j, k in enumerate(picked, start=1):
            values[k] = j
        rows = torch.tensor(picked, dtype=torch.long)
        for y0 in range(0, height, _ROW_BLOCK):
            y1 = min(height, y0 + _ROW_BLOCK)
            probs = torch.softmax(logits[:, y0:y1], dim=0)
            labels[y0:y1] = values[probs.argmax(dim=0)].numpy().astype(label_dtype)
            probabilities[:, y0:y1] = probs.index_select(0, rows).numpy()
        whole = height * width <= self.max_whole_pixels
        settings = {
            "model": "student",
            "student_checkpoint": self.path,
            "backbone": self.checkpoint.meta["settings"]["backbone"],
            "iteration": self.checkpoint.iteration,
            "teacher": (self.checkpoint.meta.get("teacher") or {}).get("model"),
            "device": str(self.device),
            "precision": self.precision,
            "image_shape": [height, width],
            "inference": "whole" if whole else "sliding",
            "window_used": None if whole else self.window,
            "stride_used": None if whole else (self.stride or max(1, self.window * 2 // 3)),
            "napari_maskclip_version": __version__,
        }
        return SegmentationResult(
            labels=labels,
            probabilities=probabilities,
            classes=[self.classes[k - 1] for k in picked],
            background=list(self.background),
            removed_classes=[],
            settings=settings,
        )

    def __call__(self, image: np.ndarray, classes: Optional[ClassesLike] = None, **kwargs: Any) -> SegmentationResult:
        """Segment ``image`` (see :meth:`run_iter`)."""
        return run_to_completion(self.run_iter(image, classes, **kwargs))
