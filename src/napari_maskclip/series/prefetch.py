"""Reading and labelling the next image while a person edits this one.

:class:`Prefetcher` runs read + predict of requested images on one background thread
(``concurrent.futures``), so Next finds the labels ready. It holds at most ``keep`` (2) images'
results: the one on screen and the next; a newer request drops the oldest (cancelling it if it
has not finished). Asking for an image that is not prepared cancels the work in flight for the
others (the person jumped elsewhere), between windows. An image that fails (unreadable, a model
error) fails alone: its :meth:`result` raises that error and nothing else is affected. An image the
dataset has saved is never predicted: its result holds the saved labels (``saved=True``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import Cancelled
from .predictor import Prediction, SeriesPredictor
from .session import SeriesSession

__all__ = ["Prefetcher", "SAVED_LABEL"]

#: ``Prediction.model_label`` of an image whose labels come from the dataset.
SAVED_LABEL = "saved"


@dataclass
class _Entry:
    future: Future
    cancel: threading.Event


class Prefetcher:
    """Prepares images of ``session`` with ``predictor`` in one background thread (see the module
    docstring). ``on_ready(i)`` is called when image ``i``'s result (or its error; not a
    cancellation) is ready, from the worker thread (or from the requesting thread if it was ready
    at once); it must be quick and thread-safe (e.g. emit a Qt signal), and may call
    :meth:`result`."""

    def __init__(self, session: SeriesSession, predictor: SeriesPredictor, *,
                 on_ready: Optional[Callable[[int], None]] = None, keep: int = 2) -> None:
        self.session = session
        self._predictor = predictor
        self.on_ready = on_ready
        self.keep = max(1, int(keep))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskclip-series")
        self._lock = threading.RLock()
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self._started: set[int] = set()
        self._closed = False

    # ---- the model -------------------------------------------------------------------------------
    @property
    def predictor(self) -> SeriesPredictor:
        return self._predictor

    @predictor.setter
    def predictor(self, predictor: SeriesPredictor) -> None:
        """Switch models (a new student, other classes): what the old one prepared is dropped."""
        with self._lock:
            self.cancel_all()
            self._predictor = predictor

    # ---- requests --------------------------------------------------------------------------------
    def request(self, i: int) -> None:
        """Start reading and labelling image ``i`` unless it is prepared or in flight."""
        with self._lock:
            if self._closed:
                raise RuntimeError("The prefetcher is closed.")
            i = int(i)
            entry = self._entries.get(i)
            if entry is not None and not self._stale(i, entry):
                self._entries.move_to_end(i)
                return
            self._drop(i)
            while len(self._entries) >= self.keep:
                oldest = next(iter(self._entries))
                self._drop(oldest)
            cancel = threading.Event()
            future = self._pool.submit(self._work, i, self._predictor, cancel)
            self._entries[i] = _Entry(future, cancel)
            future.add_done_callback(lambda f, i=i: self._done(i, f))

    def result(self, i: int, timeout: Optional[float] = None) -> Prediction:
        """Image ``i``'s prediction (with its image), waiting for it; raises that image's error.

        If ``i`` was not requested, the work in flight for other images is cancelled first (the
        person jumped elsewhere). Raises ``TimeoutError`` after ``timeout`` seconds and
        :class:`~napari_maskclip.errors.Cancelled` if it was cancelled meanwhile."""
        with self._lock:
            i = int(i)
            if i not in self._entries:
                for k, entry in list(self._entries.items()):
                    if not entry.future.done():
                        self._drop(k)
            self.request(i)
            entry = self._entries[i]
        try:
            return entry.future.result(timeout)
        except CancelledError as exc:
            raise Cancelled(f"Preparing image {i} was cancelled.") from exc
        except FutureTimeout as exc:
            raise TimeoutError(f"Image {i} is not ready after {timeout} s.") from exc

    def ready(self, i: int) -> bool:
        """Whether image ``i``'s result (or error) is ready now."""
        with self._lock:
            entry = self._entries.get(int(i))
            return entry is not None and entry.future.done() and not self._stale(int(i), entry)

    def started(self, i: int) -> bool:
        """Whether the worker has begun preparing image ``i`` (at any time so far)."""
        return int(i) in self._started

    def invalidate(self, i: int) -> None:
        """Forget image ``i``'s result (e.g. after saving it: its saved labels are read next time)."""
        with self._lock:
            self._drop(int(i))

    def cancel_all(self) -> None:
        """Cancel everything in flight and forget every result."""
        with self._lock:
            for i in list(self._entries):
                self._drop(i)

    def close(self) -> None:
        """Cancel, and wait for the worker to stop (at the next window boundary). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.cancel_all()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- inside --------------------------------------------------------------------------------
    def _stale(self, i: int, entry: _Entry) -> bool:
        """A finished model prediction of an image saved since: its saved labels are what counts."""
        if not entry.future.done() or entry.future.cancelled() or entry.future.exception() is not None:
            return False
        return not entry.future.result().saved and self.session.is_saved(i)

    def _drop(self, i: int) -> None:
        entry = self._entries.pop(i, None)
        if entry is not None:
            entry.cancel.set()
            entry.future.cancel()

    def _done(self, i: int, future: Future) -> None:
        if future.cancelled() or isinstance(future.exception(), Cancelled) or self.on_ready is None:
            return
        self.on_ready(i)

    def _work(self, i: int, predictor: SeriesPredictor, cancel: threading.Event) -> Prediction:
        self._started.add(i)
        if cancel.is_set():
            raise Cancelled(f"Preparing image {i} was cancelled.")
        session = self.session
        if session.is_saved(i):
            start = time.perf_counter()
            image = session.read_image(i)
            labels = session.saved_labels(i)
            sample = session.saved_sample(i)
            provenance = sample.provenance if sample is not None else {}
            return Prediction(labels=labels, probabilities=None, model_label=SAVED_LABEL,
                              provenance=provenance, classes=session.classes.names, image=image,
                              saved=True, seconds=time.perf_counter() - start)
        image = session.read_image(i)
        if cancel.is_set():
            raise Cancelled(f"Preparing image {i} was cancelled.")
        prediction = predictor.predict(image, cancel=cancel)
        prediction.image = image
        return prediction
