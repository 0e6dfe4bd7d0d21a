"""Progress reports shared by every long job (encoding, segmenting, exporting, training).

Long work in napari-maskclip is a generator that yields :class:`Progress` between units of work
(windows, slices, iterations) and returns its result. The napari widget runs it in a worker, the
CLI drives a tqdm bar with it, and tests step through it. Stopping the iteration (``close()``)
cancels the work at the next unit boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional, TypeVar

__all__ = ["Progress", "ProgressGenerator", "run_to_completion"]

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of ``stage`` are finished; ``info`` carries extras (e.g. loss)."""

    stage: str
    done: int
    total: int
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressGenerator = Generator[Progress, None, T]


def run_to_completion(
    gen: "Generator[Progress, None, T]",
    callback: Optional[Callable[[Progress], None]] = None,
) -> T:
    """Drive a progress generator to its end and return its result."""
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(step)
