"""The one job runner of the panels, in a real viewer (whose progress bar pumps the event loop):
a flood of progress reports is coalesced and never handled re-entrantly, every report is still
recorded, the outcome comes after the progress, and cancel and teardown restore the buttons."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QPushButton, QWidget

from napari_maskclip.plugin._qt.job_runner import BarState, JobRunner
from napari_maskclip.plugin.jobs import JobOutcome
from napari_maskclip.progress import Progress

from hang_guard import HANG_GUARD_MS as TIMEOUT_MS  # noqa: E402  (a hang guard, not a duration)
FLOOD = 3000


class Probe:
    """A panel's three callbacks, recording what the runner does with them."""

    def __init__(self) -> None:
        self.recorded: list[int] = []
        self.shown: list[int] = []
        self.depth = 0
        self.max_depth = 0
        self.outcomes: list[JobOutcome] = []
        self.shown_at_finish: list[int] = []

    def record(self, step: Progress) -> None:
        self.recorded.append(step.done)

    def show(self, step: Progress) -> BarState:
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        try:
            self.shown.append(step.done)
            # A new description every time: napari's bar pumps events for each one.
            return BarState(done=step.done, total=step.total, description=f"step {step.done}")
        finally:
            self.depth -= 1

    def finish(self, outcome: JobOutcome) -> str:
        self.outcomes.append(outcome)
        self.shown_at_finish.append(len(self.shown))
        return "cancelled" if outcome.cancelled else "done"


@pytest.fixture
def runner_and_probe(make_napari_viewer):
    viewer = make_napari_viewer()  # its activity dialog shows the bar (and pumps events)
    panel = QWidget()
    start, cancel = QPushButton("Start", panel), QPushButton("Cancel", panel)
    probe = Probe()
    runner = JobRunner(panel, title="flood", start_button=start, cancel_button=cancel,
                       show=probe.show, finish=probe.finish, record=probe.record)
    yield runner, probe, start, cancel
    assert not runner.running
    viewer.close()


def flood(control):
    for i in range(1, FLOOD + 1):
        yield Progress("test", i, FLOOD, f"step {i}")
    return JobOutcome(result="finished")


def test_a_flood_of_progress_is_coalesced_and_never_reentrant(runner_and_probe, qtbot):
    runner, probe, start, cancel = runner_and_probe
    with qtbot.waitSignal(runner.ended, timeout=TIMEOUT_MS) as ended:
        runner.start(flood)
        assert runner.running and not start.isEnabled() and cancel.isEnabled()
    assert ended.args == ["done"]
    assert probe.max_depth == 1  # no handler ever ran inside another
    assert probe.recorded == list(range(1, FLOOD + 1))  # every report recorded, in order
    assert probe.shown == sorted(probe.shown) and probe.shown[-1] == FLOOD  # the latest won
    print(f"{FLOOD} reports, {len(probe.shown)} shown")
    assert len(probe.outcomes) == 1 and probe.outcomes[0].result == "finished"
    assert probe.shown_at_finish == [len(probe.shown)]  # the outcome came after the progress
    assert not runner.running and start.isEnabled() and not cancel.isEnabled()


def test_the_bar_is_the_panels_own_and_napari_shows_no_activity(runner_and_probe, qtbot):
    """The panel's bar shows the run and hides after; no napari progress is made (its animated
    activity indicator recomposed the whole OpenGL window many times a second)."""
    from napari.utils import progress

    runner, probe, start, cancel = runner_and_probe
    before = len(progress._all_instances)
    seen: list[tuple[bool, int, int]] = []

    def watched(control):
        for i in range(1, 6):
            yield Progress("test", i, 5, f"step {i}")
            seen.append((runner.bar.isVisibleTo(runner.bar.parentWidget() or runner.bar),
                         runner.bar.value(), len(progress._all_instances)))
        return JobOutcome(result="finished")

    with qtbot.waitSignal(runner.ended, timeout=TIMEOUT_MS):
        runner.start(watched)
        assert not runner.bar.isHidden() and runner.bar.maximum() >= 1
    assert runner.bar.isHidden()
    assert runner.bar.maximum() == 5 and runner.bar.value() == 5
    assert all(n == before for _, _, n in seen)


def test_cancel_stops_the_job_and_restores_the_buttons(runner_and_probe, qtbot):
    runner, probe, start, cancel = runner_and_probe

    def endless(control):
        i = 0
        while not control.cancel.is_set():
            i += 1
            yield Progress("test", i, 0, "working")
        return JobOutcome(cancelled=True)

    assert not runner.request_cancel()  # nothing to cancel yet
    with qtbot.waitSignal(runner.ended, timeout=TIMEOUT_MS) as ended:
        runner.start(endless)
        qtbot.waitUntil(lambda: len(probe.recorded) > 10, timeout=TIMEOUT_MS)
        assert runner.request_cancel()
    assert ended.args == ["cancelled"]
    assert len(probe.outcomes) == 1 and probe.outcomes[0].cancelled
    assert not runner.running and start.isEnabled() and not cancel.isEnabled()
    # The runner can run again after a cancelled job.
    with qtbot.waitSignal(runner.ended, timeout=TIMEOUT_MS) as ended:
        runner.start(flood)
    assert ended.args == ["done"] and probe.max_depth == 1
