"""Ctrl-C in tests, whatever started the suite.

A suite started as a background job (``./run.sh test &``, e.g. beside another suite) runs with
SIGINT ignored: the shell sets that for background jobs, children inherit it, and Python then
installs no ``KeyboardInterrupt`` handler. Tests that send Ctrl-C give the code under test the
disposition a foreground process in a terminal has, and put the inherited one back afterwards.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["sigint_as_in_a_terminal", "TerminalSigint"]


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a child that gets Ctrl-C: SIGINT at its default, so the child's Python
    installs its ``KeyboardInterrupt`` handler as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class TerminalSigint:
    """In this process, for the block: SIGINT raises ``KeyboardInterrupt`` (Python's default
    handler); ``after`` is the handler the block left, checked before the inherited one is put
    back."""

    def __enter__(self) -> "TerminalSigint":
        self.previous: Any = signal.signal(signal.SIGINT, signal.default_int_handler)
        self.after: Any = None
        return self

    def __exit__(self, *exc) -> None:
        self.after = signal.signal(signal.SIGINT, self.previous)
