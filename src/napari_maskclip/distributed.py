"""Batches on dask.distributed: the same :class:`~napari_maskclip.batch.Task` objects, run on a
cluster's workers instead of one after another.

The client checks every input and output up front (as for one process) and sends each task to a
worker: the worker reads its image, runs the model it loaded once (:func:`worker_cached`) and
writes the result files itself, atomically, with the same writers. Only a short outcome (the line
to print, or one error message) comes back. At most ``window`` tasks (twice the workers by
default) are in flight, so a long batch never queues thousands of images on the scheduler.

Needs the ``distributed`` extra (``pip install napari-maskclip[distributed]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from .batch import SetupFailed, Task
from .errors import InvalidInputError, MaskClipError
from .messages import one_line

__all__ = ["Outcome", "open_client", "map_tasks", "stream_futures", "worker_cached",
           "threads_per_worker"]

T = TypeVar("T")

_CACHE: dict[Any, Any] = {}
_CACHE_LOCK = threading.Lock()


def worker_cached(key: Any, factory: Callable[[], Any]) -> Any:
    """``factory()`` once per process for ``key`` (a model spec): each worker loads its model on
    its first image and reuses it for every later one."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = factory()
        return _CACHE[key]


@dataclass(frozen=True)
class Outcome:
    """What a worker sends back for one task: ``kind`` is ``ok`` (``text`` is the line to print),
    ``error`` (this input failed; ``text`` is the one-line reason), ``stop`` (a file-system error:
    later inputs would fail alike) or ``setup`` (the model could not be loaded)."""

    kind: str
    text: str


def run_task(task: Task) -> Outcome:
    """Run one task where it lands (a worker) and turn its expected failures into an Outcome."""
    try:
        return Outcome("ok", task.run(lambda step: None))
    except SetupFailed as exc:
        return Outcome("setup", one_line(exc.error) or str(exc.error))
    except OSError as exc:
        return Outcome("stop", one_line(exc) or str(exc))
    except (MaskClipError, MemoryError) as exc:
        return Outcome("error", one_line(exc) or str(exc))


def threads_per_worker(workers: int) -> int:
    """Torch/BLAS threads for each of ``workers`` processes on this machine: its cores shared."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _thread_env(threads: int) -> dict[str, str]:
    value = str(threads)
    return {"OMP_NUM_THREADS": value, "MKL_NUM_THREADS": value, "OPENBLAS_NUM_THREADS": value}


@contextlib.contextmanager
def open_client(
    scheduler: Optional[str] = None,
    workers: Optional[int] = None,
    *,
    timeout: float = 30.0,
) -> Iterator[Any]:
    """A dask ``Client`` on the cluster at ``scheduler``, or on a new LocalCluster of ``workers``
    single-threaded worker processes (torch threads: this machine's cores shared among them).
    Everything it started is shut down on exit, also after an error or Ctrl-C."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise InvalidInputError(
            "--scheduler/--workers need dask.distributed: pip install 'napari-maskclip[distributed]'"
        ) from exc
    if (scheduler is None) == (workers is None):
        raise InvalidInputError("Give either --scheduler ADDRESS or --workers N, not both.")
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise InvalidInputError(
                f"Cannot reach the dask scheduler at {scheduler}: {one_line(exc) or exc}. Start "
                "one with 'dask scheduler' and workers with 'dask worker ADDRESS'."
            ) from exc
        try:
            _wait_for_workers(client, scheduler, timeout)
            yield client
        finally:
            client.close(timeout=timeout)
        return
    if workers < 1:
        raise InvalidInputError(f"--workers {workers}: give at least 1 worker.")
    # No dashboard, but the scheduler's HTTP server (health, metrics) always starts: without an
    # address of its own it takes :8787 on every interface, and a second cluster on this machine
    # then warns and moves; on loopback and a free port it neither collides nor listens outside.
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        silence_logs=logging.CRITICAL, env=_thread_env(threads_per_worker(workers)),
    )
    try:
        client = Client(cluster, timeout=timeout, set_as_default=False)
        try:
            yield client
        finally:
            client.close(timeout=timeout)
    finally:
        cluster.close(timeout=timeout)


def _wait_for_workers(client: Any, address: str, timeout: float) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise InvalidInputError(
            f"The dask scheduler at {address} has no workers after {timeout:g} s: start some "
            "with 'dask worker ADDRESS'."
        ) from exc


def _n_workers(client: Any) -> int:
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))


def map_tasks(client: Any, tasks: Sequence[Task], *, window: Optional[int] = None
              ) -> Iterator[tuple[Task, Outcome]]:
    """Run ``tasks`` on the cluster, at most ``window`` (default twice the workers) in flight;
    yield ``(task, outcome)`` as each finishes. Closing the generator cancels the rest."""
    batch = uuid.uuid4().hex[:8]
    return stream_futures(
        client, tasks,
        lambda task: client.submit(run_task, task, pure=False, key=f"maskclip-{batch}-{task.name}"),
        window=window,
    )


def stream_futures(client: Any, items: Iterable[T], submit: Callable[[T], Any], *,
                   window: Optional[int] = None) -> Iterator[tuple[T, Any]]:
    """``submit(item)`` (a future) for every item, at most ``window`` (default twice the
    workers) in flight so memory stays bounded; yield ``(item, result)`` as each finishes and
    release its future. Closing the generator cancels what is still pending."""
    from distributed import as_completed

    window = window or 2 * _n_workers(client)
    queue = iter(items)
    pending: dict[Any, T] = {}
    done = as_completed(loop=client.loop)

    def start(item: T) -> None:
        future = submit(item)
        pending[future] = item
        done.add(future)

    try:
        for item in islice(queue, window):
            start(item)
        for future in done:
            item = pending.pop(future)
            result = future.result()
            future.release()
            yield item, result
            following = next(queue, None)
            if following is not None:
                start(following)
    finally:
        if pending:
            client.cancel(list(pending), force=True)
