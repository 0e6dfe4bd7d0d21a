"""The models the widget has loaded, kept and reused so that re-queries are instant.

One :class:`~napari_maskclip.engine.Segmenter` per (model, weights, device): its feature cache
holds the encoded slices and its text cache the class embeddings, so asking the same image for
other class names runs no image encoder. Loading happens inside the worker (first use of an
open_clip tag downloads the weights), as a progress generator like every other long job.

A trained MaskCLIP+ student is a model choice too (``kind="student"``, loaded as a
:class:`~napari_maskclip.student.StudentSegmenter`); its key includes the checkpoint file's
modification time and size, so a retrained checkpoint at the same path is never served stale.

Qt-free; torch is imported only when a model is actually loaded.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generator, Optional

from ..engine.names import DEFAULT_MODEL, DEMO_MODEL, RANDOM_WEIGHTS
from ..errors import ModelLoadError
from ..progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Segmenter
    from ..student import StudentSegmenter

__all__ = ["STUDENT", "ModelChoice", "SegmenterPool", "import_student", "preload_engine"]

#: Encoded slices kept per model: enough for re-querying a typical stack without re-encoding
#: (the engine also bounds the cache by memory, 2 GiB).
FEATURE_CACHE_ITEMS = 256
#: ``ModelChoice.kind`` of a trained MaskCLIP+ student.
STUDENT = "student"


@dataclass(frozen=True)
class ModelChoice:
    """What the user picked in the model section."""

    model: str
    pretrained: Optional[str]
    device: str = "auto"
    #: ``"clip"`` (MaskCLIP on an open_clip model) or :data:`STUDENT` (``model`` = checkpoint).
    kind: str = "clip"
    #: For a student: (modification time in ns, size) of the checkpoint when it was chosen.
    stamp: Optional[tuple[int, int]] = None

    @classmethod
    def student(cls, path: str, device: str = "auto") -> "ModelChoice":
        """A student checkpoint as the model (the file must exist)."""
        p = Path(path).expanduser()
        try:
            st = p.stat()
        except OSError as exc:
            raise ModelLoadError(f"Student checkpoint not found: {p}") from exc
        return cls(model=str(p), pretrained=None, device=device.strip() or "auto", kind=STUDENT,
                   stamp=(st.st_mtime_ns, st.st_size))

    @property
    def is_student(self) -> bool:
        return self.kind == STUDENT

    @classmethod
    def from_fields(cls, model: str, pretrained: str, device: str) -> "ModelChoice":
        model = model.strip()
        if not model:
            raise ModelLoadError(
                f"No model given: type an open_clip name (e.g. {DEFAULT_MODEL}), pick '{DEMO_MODEL}', "
                "or choose a model-config JSON."
            )
        weights = pretrained.strip() or None
        if model == DEMO_MODEL:
            weights = None
        return cls(model=model, pretrained=weights, device=device.strip() or "auto")

    @property
    def may_download(self) -> bool:
        """True when loading may download weights (an open_clip tag, not a file or 'random')."""
        if self.is_student or self.model == DEMO_MODEL or self.pretrained in (None, RANDOM_WEIGHTS):
            return False
        return not Path(self.pretrained).expanduser().is_file()

    def describe(self) -> str:
        if self.is_student:
            return f"student {Path(self.model).name}"
        if self.model == DEMO_MODEL:
            return "the demo model"
        model = Path(self.model).name if self.model.lower().endswith(".json") else self.model
        weights = self.pretrained or "no weights"
        if weights != RANDOM_WEIGHTS and Path(weights).expanduser().is_file():
            weights = Path(weights).name
        return f"{model} ({weights})"


_preload: Optional[threading.Thread] = None
_preload_lock = threading.Lock()


def _import_engine():
    """Import the engine (torch, open_clip) into a running napari, safely.

    On Linux, importing Triton (pulled in by torch's compiler stack via torchvision/open_clip)
    after napari's canvas has loaded Mesa's LLVM (software rendering, AMD drivers) crashes the
    process: both bring their own LLVM. The engine never uses Triton (no ``torch.compile``), so
    when napari is running and Triton is not loaded yet, it is hidden from this process
    (``torch`` then reports no Triton). Set ``NAPARI_MASKCLIP_ALLOW_TRITON=1`` to opt out.
    """
    preload = _preload
    if preload is not None and preload is not threading.current_thread():
        preload.join()  # one thread imports torch at a time (no concurrent circular imports)
    if (
        sys.platform.startswith("linux")
        and "triton" not in sys.modules
        and "vispy" in sys.modules
        and not os.environ.get("NAPARI_MASKCLIP_ALLOW_TRITON")
    ):
        sys.modules["triton"] = None  # type: ignore[assignment]  # makes `import triton` fail
    from .. import engine

    return engine


def _preload_modules() -> None:
    try:
        _import_engine().Segmenter  # noqa: B018 - the attribute imports the segmenter (torch)
        import open_clip  # noqa: F401  (every CLIP loader imports it: seconds on its own)
    except Exception:  # noqa: BLE001 - a broken install says why on the run that needs it
        pass


def preload_engine() -> threading.Thread:
    """Import torch, open_clip and the engine in a background thread (once per process), the
    safe way (:func:`_import_engine`), so the first run does not wait for them: that import is
    most of a small model's first run. A run started meanwhile waits for it
    (:func:`_import_engine` joins the thread: one thread imports torch at a time). Returns the
    thread."""
    global _preload
    with _preload_lock:
        if _preload is None:
            _preload = threading.Thread(target=_preload_modules, name="maskclip-preload",
                                        daemon=True)
            _preload.start()
        return _preload


def import_student():
    """Import the student package (torch, torchvision) the same safe way as the engine."""
    _import_engine()
    from .. import student

    return student


class SegmenterPool:
    """A small LRU of loaded segmenters (each model costs its weights in memory)."""

    def __init__(self, max_models: int = 2, feature_cache_items: int = FEATURE_CACHE_ITEMS) -> None:
        self.max_models = max_models
        self.feature_cache_items = feature_cache_items
        self._items: "OrderedDict[ModelChoice, Segmenter]" = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, choice: ModelChoice) -> "Optional[Segmenter]":
        with self._lock:
            seg = self._items.get(choice)
            if seg is not None:
                self._items.move_to_end(choice)
            return seg

    def get_iter(
        self, choice: ModelChoice
    ) -> Generator[Progress, None, "Segmenter | StudentSegmenter"]:
        """The segmenter for ``choice``, loading it (with a progress report) if needed."""
        seg = self.cached(choice)
        if seg is not None:
            return seg
        note = " (first use downloads the weights once)" if choice.may_download else ""
        yield Progress("load", 0, 0, f"loading {choice.describe()}{note}...")
        if choice.is_student:
            seg = import_student().StudentSegmenter(choice.model, device=choice.device)
            loaded = seg.describe()
        else:
            Segmenter = _import_engine().Segmenter
            seg = Segmenter(
                choice.model,
                choice.pretrained,
                device=choice.device,
                feature_cache_items=self.feature_cache_items,
            )
            loaded = seg.loaded.describe()
        with self._lock:
            self._items[choice] = seg
            while len(self._items) > self.max_models:
                self._items.popitem(last=False)
        yield Progress("load", 1, 1, f"loaded {loaded}")
        return seg

    def __len__(self) -> int:
        return len(self._items)
