"""One Train-panel run as a Qt-free generator over :func:`napari_maskclip.student.train_iter`.

:class:`TrainRequest` holds the panel's choices (the core's torch-free
:class:`~napari_maskclip.student.settings.TrainSettings` among them), checked on the main thread
(:meth:`TrainRequest.check`), so a missing folder, an existing checkpoint or an impossible
setting is refused before any thread starts. :func:`training_iter` runs in the worker: it imports torch there, then delegates
to the core generator, whose progress (``info``: loss, lr, stage, validation mIoU, it/s) drives
the panel. Closing it (Cancel) closes ``train_iter``, which saves the last completed iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Optional

from ..engine.names import default_pretrained
from ..errors import InvalidInputError
from ..progress import Progress
from ..student.settings import TrainSettings
from .models import import_student

__all__ = ["TrainRequest", "TrainSummary", "training_iter"]


@dataclass
class TrainRequest:
    """What the Train panel asks for."""

    datasets: list[str]
    checkpoint: str
    #: The run's settings; a resumed run takes its own from the checkpoint, all but iterations.
    settings: TrainSettings = field(default_factory=TrainSettings)
    teacher: Optional[str] = None
    pretrained: Optional[str] = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    @property
    def path(self) -> Path:
        return Path(self.checkpoint).expanduser()

    def check(self) -> "TrainRequest":
        """Refuse what cannot work, with messages that say what to do in the panel."""
        if not self.datasets:
            raise InvalidInputError(
                "Add at least one dataset folder (made with Export, or 'napari-maskclip export')."
            )
        for folder in self.datasets:
            if not Path(folder).expanduser().is_dir():
                raise InvalidInputError(f"Dataset folder not found: {folder}")
        if not self.checkpoint.strip():
            raise InvalidInputError("Choose where to save the student (a .safetensors file).")
        path = self.path
        if path.suffix.lower() != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
            self.checkpoint = str(path)
        if path.is_dir():
            raise InvalidInputError(f"{path} is a folder; give a file name ending in .safetensors.")
        if not path.parent.is_dir():
            raise InvalidInputError(f"The folder {path.parent} does not exist.")
        if self.resume and not path.is_file():
            raise InvalidInputError(
                f"Nothing to resume: {path.name} does not exist. Untick 'resume' to start training."
            )
        if not self.resume and path.exists() and not self.overwrite:
            raise InvalidInputError(
                f"{path.name} exists already: tick 'resume' to continue it, or 'replace' to train "
                "a new student in its place."
            )
        if self.pretrained and not self.teacher:
            raise InvalidInputError("Teacher weights need a teacher model; give both, or neither.")
        self.settings.validate()
        return self


@dataclass
class TrainSummary:
    """What a finished run left (the network itself stays in the worker and is freed)."""

    checkpoint: Path
    iteration: int
    complete: bool
    loss: Optional[float]
    val_miou: Optional[float]


def training_iter(request: TrainRequest) -> Generator[Progress, None, TrainSummary]:
    """Train (or resume) as ``request`` says; yields the core's progress; returns a summary."""
    yield Progress("setup", 0, 0, "loading torch and the student code...")
    student = import_student()
    teacher, pretrained = request.teacher or None, request.pretrained or None
    if teacher and pretrained is None:
        pretrained = default_pretrained(teacher, None)
    if request.resume:
        gen = student.train_iter(
            request.datasets, request.path, resume=True, teacher=teacher, pretrained=pretrained,
            device=request.device, iterations=request.settings.iterations,
        )
    else:
        gen = student.train_iter(
            request.datasets, request.path, settings=request.settings, teacher=teacher,
            pretrained=pretrained, overwrite=request.overwrite, device=request.device,
        )
    result = yield from gen
    loss = result.history[-1]["loss"] if result.history else None
    return TrainSummary(request.path, result.iteration, result.complete, loss, result.val_miou)
