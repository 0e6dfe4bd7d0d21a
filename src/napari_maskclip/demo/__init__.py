"""The offline demo model: a tiny CLIP trained from scratch on synthetic scenes.

Package data, no weights download: ``toy_clip.json`` (open_clip model config),
``toy_clip.safetensors`` (fp16 weights) and ``toy_vocab.json`` (class names, prompt template,
background name(s), image size, normalisation, and the command that reproduces the weights).
It is trained by ``tools/train_toy_clip.py`` on scenes from :mod:`napari_maskclip.synthetic`.
``toy_student.safetensors`` is a MaskCLIP+ student of it, trained by ``benchmarks/quality.py``
on its pseudo-labels of unlabeled scenes (the command is in the checkpoint's metadata).

Importing this module loads neither torch nor open_clip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["WINDOW_BATCH", "DemoModelFiles", "demo_model_files", "recommended_settings"]

_HERE = Path(__file__).resolve().parent
#: Windows per encoder pass for the demo model. Its 64 px windows are tiny: one per pass spends
#: the time in per-call overhead and, with several threads on a busy CPU, in threads waiting on
#: each other (the 256x192 demo scene's 117 windows: 14 s one at a time, 0.9 s 32 at a time on 2
#: loaded cores). The labels are the same in fp32; in bf16 (``precision="auto"`` on a CPU with
#: native bf16) rounding differs with the batch: 0.01 % of the demo scene's pixels. Memory
#: stays small (32 x 64 x 64 px).
WINDOW_BATCH = 32


class DemoModelFiles(NamedTuple):
    """Paths of the demo model's three files."""

    config: Path  # toy_clip.json: open_clip model config (kwargs of open_clip.CLIP)
    weights: Path  # toy_clip.safetensors: fp16 state dict of open_clip.CLIP
    vocab: Path  # toy_vocab.json: classes, templates, background names, sizes, provenance
    student: Path  # toy_student.safetensors: a MaskCLIP+ student of the toy CLIP


def demo_model_files(check: bool = True) -> DemoModelFiles:
    """Return the paths of the demo model's config, weights and vocabulary files.

    With ``check`` (default), raise ``FileNotFoundError`` naming the missing file(s) and the
    command that recreates them (the student is checked last, so a fresh toy CLIP can be scored
    with ``check=False`` before its student exists).
    """
    files = DemoModelFiles(
        config=_HERE / "toy_clip.json",
        weights=_HERE / "toy_clip.safetensors",
        vocab=_HERE / "toy_vocab.json",
        student=_HERE / "toy_student.safetensors",
    )
    if check:
        missing = [str(p) for p in files[:3] if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                "demo model file(s) missing: " + ", ".join(missing)
                + " (recreate them with: python tools/train_toy_clip.py)"
            )
        if not files.student.is_file():
            raise FileNotFoundError(
                f"demo student missing: {files.student} (recreate it with: python "
                f"benchmarks/quality.py --save-student {files.student})"
            )
    return files


def recommended_settings() -> dict[str, Any]:
    """MaskCLIP settings that suit the demo model: its one prompt template, and sliding windows
    of its training size (64 px), overlapping by three quarters.

    The toy CLIP saw only 64 px scenes; read whole, a larger image lets every patch attend to
    many more objects than in training and the background is lost (on the demo scene: 1 % pixel
    accuracy whole, 87 % with these windows).
    """
    try:
        size = int(json.loads(demo_model_files(check=False).vocab.read_text())["image_size"])
    except (FileNotFoundError, KeyError, ValueError):
        size = 64
    return {"templates": "single", "window": size, "stride": max(8, size // 4)}
