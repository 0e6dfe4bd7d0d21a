"""Ctrl-C between units of work, never inside one.

A training iteration changes the network's weights, its batch-norm statistics and the optimiser
state one after the other; a ``KeyboardInterrupt`` in the middle would leave them disagreeing (the
statistics one forward pass ahead of the saved iteration), and a checkpoint of that state no
longer resumes exactly. :func:`interrupts_deferred` holds SIGINT back while such a unit runs and
delivers it, to whatever handler was installed, as soon as the unit is complete. A second Ctrl-C
during the same unit is delivered at once (the user insists); the caller must then treat the
unit's state as broken (it can tell: the block did not complete).

Signal handlers belong to the main thread: elsewhere (a widget's worker thread) the block runs
unchanged, which is fine because Python only ever raises ``KeyboardInterrupt`` in the main thread.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

__all__ = ["interrupts_deferred"]


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """Run the block with SIGINT held back; deliver a held SIGINT when the block completes.

    The block gets the list of held signals (empty until a Ctrl-C comes), so it can tell others
    (data-parallel ranks) that this unit is the last."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored, the OS default, or set outside Python: leave it alone
        yield []
        return
    held: list[int] = []

    def hold(signum: int, frame) -> None:
        if held:  # a second Ctrl-C: stop now, inside the unit
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
            return
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        previous(signal.SIGINT, sys._getframe())
