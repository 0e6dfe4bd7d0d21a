"""One intra-op thread for a small model's forward passes.

Torch splits each CPU op over its intra-op threads, which wait for each other at the end of every
op. A small model (the demo's: 4 M parameters, 64 px windows) does so little per op that the
waiting is most of the time, and on a busy CPU a thread often waits for a partner that is not
running: the demo scene's first widget run spent 17-24 s segmenting with 2 threads on 2 loaded
cores, 2.6 s with one (``benchmarks/bench_widget.py --model demo``), for the same CPU work. A
large model (ViT-B-16: 150 M) keeps the threads it was given.

:func:`small_model_threads` sets one thread for the block and gives the number back after it
(``torch.set_num_threads``; with OpenMP the count is mostly the calling thread's own).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["SMALL_MODEL_PARAMETERS", "is_small_model", "small_model_threads"]

#: Models with at most this many parameters run their passes on one intra-op thread.
SMALL_MODEL_PARAMETERS = 20_000_000

_lock = threading.Lock()
_inside = 0
_saved: Optional[int] = None
_local = threading.local()  # this thread's nesting depth


def is_small_model(model: nn.Module) -> bool:
    """True when ``model`` is small enough that one thread is faster than several."""
    total = 0
    for p in model.parameters():
        total += p.numel()
        if total > SMALL_MODEL_PARAMETERS:
            return False
    return True


@contextmanager
def small_model_threads(model: nn.Module) -> Iterator[None]:
    """Run the block on one intra-op thread when ``model`` is small (see the module doc); a
    large model, or a process already on one thread, is left as it is. Blocks may nest and
    several threads may be inside at once: the count is given back when a thread leaves its
    outermost block."""
    global _inside, _saved
    if not is_small_model(model):
        yield
        return
    depth = getattr(_local, "depth", 0)
    with _lock:
        if _inside == 0:
            _saved = torch.get_num_threads()
        _inside += 1
        saved = _saved or 1
    if depth == 0 and saved > 1:
        torch.set_num_threads(1)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        with _lock:
            _inside -= 1
        if depth == 0 and saved > 1:
            torch.set_num_threads(saved)  # this thread's count back (and the process's)
