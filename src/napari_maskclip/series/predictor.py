"""The model that labels each image of a series: MaskCLIP (the page's classes and settings) or a
trained student, behind one small interface.

:class:`SeriesPredictor` turns an image into a :class:`Prediction` (labels, class probabilities,
which model made them and its provenance, in the form the exporter records). It is used from one
background thread (:mod:`.prefetch`) while the GUI thread may ask too, so a lock lets one
prediction run at a time; a prediction can be cancelled between windows.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from ..classes import ClassesLike
from ..demo import WINDOW_BATCH
from ..errors import Cancelled, InvalidInputError

__all__ = ["Prediction", "SeriesPredictor", "CancelLike", "DEMO_WINDOW_BATCH"]

#: Windows per encoder pass for the demo model (see :data:`napari_maskclip.demo.WINDOW_BATCH`).
DEMO_WINDOW_BATCH = WINDOW_BATCH

#: Something that says whether to stop: a ``threading.Event`` or a callable returning True.
CancelLike = Union[None, threading.Event, Callable[[], bool]]


def _cancelled(cancel: CancelLike) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


@dataclass
class Prediction:
    """One image's labels and where they came from."""

    #: ``H x W`` ints: 0 background, k = class k.
    labels: np.ndarray
    #: float32 ``C x H x W`` (one map per class, in class order), or None (saved labels).
    probabilities: Optional[np.ndarray]
    #: What the progress line says: ``MaskCLIP demo``, ``student (iteration 600)``, ``saved``.
    model_label: str
    #: What the exporter records as the sample's provenance (model, pretrained, settings...).
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Class names, label k = ``classes[k - 1]``.
    classes: list[str] = field(default_factory=list)
    #: The image the labels belong to (the prefetcher reads it with them), or None.
    image: Optional[np.ndarray] = None
    #: True when the labels are the dataset's saved ones (no prediction was made).
    saved: bool = False
    #: Seconds the prediction took (0 for saved labels).
    seconds: float = 0.0
    #: CPU seconds of the predicting thread (what it costs on an idle machine, single-threaded).
    cpu_seconds: float = 0.0


class SeriesPredictor:
    """MaskCLIP or a student, used one image at a time (see the module docstring).

    Build with :meth:`teacher` or :meth:`student`; :meth:`predict` labels an image.
    """

    def __init__(self, segmenter: Any, classes: Optional[ClassesLike], *, label: str,
                 background: Optional[ClassesLike] = None, kind: str = "teacher",
                 lock: Optional[threading.Lock] = None, options: Optional[dict[str, Any]] = None) -> None:
        self.segmenter = segmenter
        self.classes = classes
        self.background = background
        self.kind = kind
        self._label = label
        self._lock = lock or threading.Lock()
        self._options = dict(options or {})

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def teacher(
        cls,
        segmenter_or_settings: Any,
        classes: ClassesLike,
        *,
        background: Optional[ClassesLike] = None,
        pretrained: Optional[str] = None,
        device: str = "auto",
        label: Optional[str] = None,
        **overrides: Any,
    ) -> "SeriesPredictor":
        """MaskCLIP with ``classes``. ``segmenter_or_settings``: a loaded
        :class:`~napari_maskclip.engine.Segmenter` (the page's, settings included), a model name
        (``"demo"`` uses :func:`~napari_maskclip.demo.recommended_settings`), or a dict with
        ``model``, ``pretrained`` and MaskCLIP settings. ``overrides`` are settings used per call."""
        from ..engine import Segmenter

        if isinstance(segmenter_or_settings, Segmenter):
            segmenter = segmenter_or_settings
        else:
            if isinstance(segmenter_or_settings, (str, os.PathLike)):
                spec: dict[str, Any] = {"model": str(segmenter_or_settings)}
            elif isinstance(segmenter_or_settings, dict):
                spec = dict(segmenter_or_settings)
            else:
                raise InvalidInputError(
                    "Give the teacher as a Segmenter, a model name (e.g. 'demo', 'ViT-B-16') or a "
                    f"dict of settings with 'model'; got {type(segmenter_or_settings).__name__}."
                )
            model = spec.pop("model", None)
            if not model:
                raise InvalidInputError("The teacher settings name no model (add 'model').")
            spec_pretrained = spec.pop("pretrained", pretrained)
            if model == "demo":
                from ..demo import recommended_settings

                # Its 64 px windows are tiny: 32 per encoder pass cost a third of the CPU time of
                # one at a time (256 px scene: 0.5 s instead of 1.4 s), same labels.
                spec = {**recommended_settings(), "window_batch": DEMO_WINDOW_BATCH, **spec}
            spec = {**spec, **overrides}
            overrides = {}
            # One image at a time: keep the features of the image on screen and of the next one.
            segmenter = Segmenter(model, spec_pretrained, device=spec.pop("device", device),
                                  feature_cache_items=2, **spec)
        name = segmenter.loaded.name
        text = label or ("MaskCLIP demo" if name == "demo" else f"MaskCLIP {name}")
        return cls(segmenter, classes, label=text, background=background, kind="teacher",
                   options=overrides)

    @classmethod
    def student(
        cls,
        checkpoint_path: Any,
        classes: Optional[ClassesLike] = None,
        *,
        device: str = "auto",
        label: Optional[str] = None,
    ) -> "SeriesPredictor":
        """A trained MaskCLIP+ student (a checkpoint path or a loaded
        :class:`~napari_maskclip.student.StudentSegmenter`). ``classes``: the page's, in its order
        (each must be one the student knows); None: all of the student's."""
        from ..student.predict import StudentSegmenter

        segmenter = (checkpoint_path if isinstance(checkpoint_path, StudentSegmenter)
                     else StudentSegmenter(checkpoint_path, device=device))
        text = label or f"student (iteration {segmenter.checkpoint.iteration})"
        if classes is not None:
            segmenter.resolve_classes(classes)  # refuse unknown classes now, not per image
        return cls(segmenter, classes, label=text, kind="student")

    def with_classes(self, classes: ClassesLike, *, background: Optional[ClassesLike] = None) -> "SeriesPredictor":
        """The same model (and lock) with another class list: no reload."""
        if self.kind == "student":
            self.segmenter.resolve_classes(classes)
        return SeriesPredictor(self.segmenter, classes, label=self._label,
                               background=background if background is not None else self.background,
                               kind=self.kind, lock=self._lock, options=self._options)

    # ---- use -------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """``MaskCLIP demo``, ``MaskCLIP ViT-B-16``, ``student (iteration 600)``..."""
        return self._label

    def predict(self, image: np.ndarray, *, cancel: CancelLike = None) -> Prediction:
        """Label ``image`` (gray, RGB(A), any dtype). ``cancel`` is checked between windows:
        when set, raises :class:`~napari_maskclip.errors.Cancelled` and returns nothing partial."""
        with self._lock:
            if _cancelled(cancel):
                raise Cancelled("Prediction cancelled.")
            start, cpu_start = time.perf_counter(), time.thread_time()
            kwargs = dict(self._options)
            if self.background is not None:
                kwargs["background"] = self.background
            gen = self.segmenter.run_iter(np.asarray(image), self.classes, **kwargs)
            try:
                while True:
                    try:
                        next(gen)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    if _cancelled(cancel):
                        raise Cancelled("Prediction cancelled.")
            finally:
                gen.close()
            seconds = time.perf_counter() - start
            cpu_seconds = time.thread_time() - cpu_start
        settings = dict(getattr(result, "settings", {}) or {})
        provenance = {
            "model": settings.get("model"),
            "pretrained": settings.get("pretrained"),
            "settings": settings,
            "removed_by_denoising": list(getattr(result, "removed_classes", [])),
            "labelled_by": self._label,
        }
        return Prediction(labels=result.labels, probabilities=result.probabilities,
                          model_label=self._label, provenance=provenance,
                          classes=[c.name for c in result.classes], seconds=seconds,
                          cpu_seconds=cpu_seconds)
