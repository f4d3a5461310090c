"""The run dashboard and its checkpoint controls, fed synthetic events (no kernel)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from dspex_jupyter.core.errors import SessionKernelLost
from dspex_jupyter.notebook import actions
from dspex_jupyter.notebook.checkpoint_controls import CheckpointControls
from dspex_jupyter.notebook.run_dashboard import RunDashboard, dashboard_for
from dspex_jupyter.notebook.run_progress import RunProgress, trials_from_snapshot
from dspex_jupyter.notebook.score_chart import score_chart_svg
from tests.unit.test_notebook_fakes import (
    INSTRUCTIONS,
    FakeRun,
    checkpoint_row,
    feed_typical_run,
    usage,
)

WAIT = 10.0


@pytest.fixture
def run():
    return FakeRun()


@pytest.fixture
def dashboard(run):
    board = RunDashboard(run)
    yield board
    board.close()


def drawn(board: RunDashboard) -> RunDashboard:
    assert board.wait_drawn(WAIT)
    return board


def test_dashboard_shows_phases_chart_candidates_and_usage(run, dashboard):
    feed_typical_run(run, trials=7)
    drawn(dashboard)
    bars, labels = dashboard.phase_bars, dashboard.phase_labels
    assert (bars["bootstrap"].value, bars["bootstrap"].max) == (4, 4)
    assert bars["bootstrap"].bar_style == "success" and labels["bootstrap"].value == "4/4 demo sets"
    assert labels["propose"].value == "4 candidate instructions"
    assert (bars["search"].value, bars["search"].max) == (7, 13)
    assert labels["search"].value == "trial 7/13"
    assert "status <b" in dashboard.header.value and "running" in dashboard.header.value
    # Seven trials: 1, 3, 6 are full evaluations, the others minibatches.
    chart = dashboard.chart.value
    assert chart.count('class="trial full"') == 3
    assert chart.count('class="trial minibatch"') == 4
    assert chart.count('class="best-so-far"') == 1
    assert "trial 7 (minibatch): 55" in chart
    # Candidates with their mean scores (instruction index = trial number % 4).
    table = dashboard.candidates.value
    for text in INSTRUCTIONS[:3]:
        assert text in table
    assert "Think about &lt;units&gt; &amp; answer" in table  # escaped
    rows = RunProgress()
    for event in run.events:
        rows.apply(event)
    by_index = {r["index"]: r for r in rows.candidate_rows()}
    assert by_index[1]["trials"] == 2 and by_index[1]["mean_score"] == 45.0  # trials 1 and 5
    assert by_index[3]["best_full_score"] == 55.0  # trial 3, full
    assert "LM calls</b> 70" in dashboard.usage.value
    assert "18,900" in dashboard.usage.value and "$0.0070" in dashboard.usage.value
    # One trial a second, 6 trials to go.
    assert dashboard.eta.value == "<b>ETA</b> 6s"
    assert dashboard.error.value == ""


def test_completed_run_fills_every_bar(run, dashboard):
    feed_typical_run(run, trials=13)
    run.emit("complete", best_score=55.0, usage=usage(300), trials=13)
    run.finish("completed")
    drawn(dashboard)
    assert all(bar.bar_style == "success" for bar in dashboard.phase_bars.values())
    assert dashboard.phase_bars["search"].value == 13
    assert "completed" in dashboard.header.value and "best 55" in dashboard.header.value
    assert dashboard.eta.value == "<b>ETA</b> -"
    assert "LM calls</b> 300" in dashboard.usage.value


def test_error_event_is_shown_with_its_remote_traceback(run, dashboard):
    feed_typical_run(run, trials=2)
    run.emit(
        "error",
        error_type="OutOfMemoryError",
        module="torch",
        message="CUDA out of memory. Tried to allocate 2.00 GiB",
        infrastructure=True,
        resumable=True,
        traceback=[
            "Traceback (most recent call last):\n",
            '  File "prog.py", line 3, in forward\n',
        ],
    )
    run.finish("failed")
    drawn(dashboard)
    error = dashboard.error.value
    assert "OutOfMemoryError: CUDA out of memory" in error
    assert "infrastructure, resumable" in error
    assert "remote traceback" in error and "prog.py" in error
    assert "failed" in dashboard.header.value


def test_a_run_that_dies_without_an_error_event_shows_why(run, dashboard):
    feed_typical_run(run, trials=2)
    run.finish("failed", SessionKernelLost("the kernel of session s1 died (exit code -9)"))
    drawn(dashboard)
    assert "the kernel of session s1 died" in dashboard.error.value
    assert "failed" in dashboard.header.value


def test_events_are_coalesced_into_at_most_ten_redraws_a_second(run, dashboard):
    started = time.monotonic()
    best = 0.0
    for number in range(1, 5001):
        best = max(best, number / 100)
        run.emit(
            "trial",
            number=number,
            eval="minibatch" if number % 5 else "full",
            score=number / 100,
            best_score=best,
            params={},
            usage=usage(number),
        )
    assert dashboard.wait_drawn(WAIT)
    elapsed = time.monotonic() - started
    assert dashboard.redraw_count <= elapsed * 10 + 2, (dashboard.redraw_count, elapsed)
    # The final state is drawn: every trial, the last usage.
    chart = dashboard.chart.value
    assert "trial 5000 (full): 50" in chart
    assert chart.count('class="trial') == 5000
    assert "LM calls</b> 5,000" in dashboard.usage.value


def test_a_second_display_is_the_same_live_widget(run):
    first = dashboard_for(run)
    assert dashboard_for(run) is first
    first.close()
    second = dashboard_for(run)
    assert second is not first  # a closed dashboard is replaced
    second.close()


def test_resumed_run_charts_the_trials_of_its_snapshot(tmp_path):
    from dspex_jupyter.checkpoint import CheckpointDir

    folder = CheckpointDir(tmp_path / "run")
    folder.create()
    trials = [
        {"params": {"0_predictor_instruction": 0}, "value": 40.0, "kind": "full"},
        {"params": {"0_predictor_instruction": 1}, "value": 60.0, "kind": "minibatch"},
        {"params": {"0_predictor_instruction": 1}, "value": 50.0, "kind": "full"},
    ]
    path = folder.write_snapshot({"phase": "search", "search": {"trials": trials}})
    assert [
        (t.number, t.best_score) for t in trials_from_snapshot({"search": {"trials": trials}})
    ] == [(1, 40.0), (2, 40.0), (3, 50.0)]
    run = FakeRun(checkpoint_dir=folder.path)
    run.emit("resumed", snapshot=path.name, phase="search", trial=3)
    run.emit("trial", number=4, eval="minibatch", score=70.0, best_score=50.0, params={})
    board = RunDashboard(run)
    try:
        drawn(board)
        chart = board.chart.value
        assert chart.count('class="trial') == 4
        assert "trial 2 (minibatch): 60" in chart and "trial 4 (minibatch): 70" in chart
    finally:
        board.close()


def test_score_chart_without_trials_says_so():
    assert "no trials yet" in score_chart_svg([])


# ---- checkpoint controls --------------------------------------------------------------
def states(controls: CheckpointControls) -> dict[str, bool]:
    return {
        "checkpoint": controls.checkpoint_button.disabled,
        "cancel": controls.cancel_button.disabled,
        "resume": controls.resume_button.disabled,
    }


def test_buttons_follow_the_run_status(run):
    controls = CheckpointControls(run)
    assert states(controls) == {"checkpoint": False, "cancel": False, "resume": True}
    assert controls.checkpoint_picker.disabled
    assert controls.checkpoint_picker.options == (("(listed once the run stops)", ""),)
    run.finish("completed")
    controls.refresh()
    assert states(controls) == {"checkpoint": True, "cancel": True, "resume": True}


def test_resume_needs_a_valid_checkpoint(run):
    run.checkpoint_rows = [checkpoint_row("ckpt-000001.json", 0, ok=False)]
    run.finish("cancelled")
    controls = CheckpointControls(run)
    assert states(controls) == {"checkpoint": True, "cancel": True, "resume": True}
    assert controls.checkpoint_picker.options[0][0] == "(no checkpoint to resume from)"

    other = FakeRun("fake02")
    other.checkpoint_rows = [
        checkpoint_row("ckpt-000001.json", 0, "bootstrapped"),
        checkpoint_row("ckpt-000002.json", 4),
        checkpoint_row("ckpt-000003.json", 5, "done"),
    ]
    other.finish("failed", RuntimeError("boom"))
    controls = CheckpointControls(other)
    assert states(controls) == {"checkpoint": True, "cancel": True, "resume": False}
    # Newest first; the final "done" snapshot cannot be resumed and is not offered.
    labels = [label for label, _ in controls.checkpoint_picker.options]
    assert len(labels) == 2 and "trial 4" in labels[0] and "ckpt-000002.json" in labels[0]
    assert "best 55" in labels[0]
    assert controls.checkpoint_picker.value == "ckpt-000002.json"


def test_checkpoint_button_runs_on_a_thread_and_reports(run):
    feed_typical_run(run, trials=5)
    controls = CheckpointControls(run)
    run.checkpoint_gate = threading.Event()
    controls.checkpoint_button.click()  # returns at once: the kernel is waited for elsewhere
    assert controls.busy
    assert states(controls) == {"checkpoint": True, "cancel": True, "resume": True}
    assert "waiting for the kernel" in controls.outcome.value
    run.checkpoint_gate.set()
    assert controls.wait_idle(WAIT)
    assert "checkpoint written: ckpt-000001.json" in controls.outcome.value
    assert "trial 5" in controls.outcome.value
    assert states(controls) == {"checkpoint": False, "cancel": False, "resume": True}


def test_cancel_button_reports_the_trial_and_enables_resume(run):
    feed_typical_run(run, trials=5)
    controls = CheckpointControls(run)
    controls.cancel_button.click()
    assert controls.wait_idle(WAIT)
    assert run.cancel_calls == 1
    assert "cancelled at trial 5" in controls.outcome.value
    assert "ckpt-000001.json" in controls.outcome.value
    assert states(controls) == {"checkpoint": True, "cancel": True, "resume": False}


def test_errors_of_actions_are_shown_not_raised(run):
    def broken(timeout=None):
        raise TimeoutError("no checkpoint within 120 s")

    run.checkpoint = broken
    controls = CheckpointControls(run)
    controls.checkpoint_button.click()
    assert controls.wait_idle(WAIT)
    assert "error: no checkpoint within 120 s" in controls.outcome.value
    assert not controls.checkpoint_button.disabled


def test_resume_button_makes_the_dashboard_follow_the_new_run(run, monkeypatch):
    feed_typical_run(run, trials=5)
    run.checkpoint_rows = [checkpoint_row("ckpt-000004.json", 3)]
    run.emit("cancelled", checkpoint="/tmp/fake-run/ckpt-000004.json")
    run.finish("cancelled")
    new_run = FakeRun("fake01")
    calls = []

    def fake_resume(old, snapshot=None, objects=None):
        calls.append((old, snapshot))
        return new_run, f"resumed run {old.run_id} from {snapshot}"

    monkeypatch.setattr(actions, "resume_run", fake_resume)
    board = RunDashboard(run)
    resumed = []
    board.controls.on_resumed(resumed.append)
    try:
        drawn(board)
        assert "cancelled" in board.error.value
        board.controls.resume_button.click()
        assert board.controls.wait_idle(WAIT)
        assert calls == [(run, "ckpt-000004.json")] and resumed == [new_run]
        assert board.run is new_run and board.controls.run is new_run
        assert "resumed run fake01 from ckpt-000004.json" in board.controls.outcome.value
        new_run.emit("resumed", snapshot=None, phase="search", trial=3)
        new_run.emit("trial", number=4, eval="minibatch", score=90.0, best_score=45.0, params={})
        drawn(board)
        chart = board.chart.value
        assert "trial 4 (minibatch): 90" in chart and "trial 5 (" not in chart
        assert not board.controls.cancel_button.disabled  # the new run runs
        assert re.search(r"status <b[^>]*>running", board.header.value)
    finally:
        board.close()
