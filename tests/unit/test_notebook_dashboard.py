"""The run dashboard and its checkpoint controls, fed synthetic events (no kernel)."""

from __future__ import annotations

import datetime
import re
import threading
import time
from types import SimpleNamespace

import pytest

from dspex_jupyter.core.errors import SessionKernelLost
from dspex_jupyter.notebook import actions
from dspex_jupyter.notebook.checkpoint_controls import CheckpointControls
from dspex_jupyter.notebook.run_dashboard import RunDashboard, dashboard_for, predictor_names
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


# What OptimizationRun.spec holds for `MIPROv2(...).optimize(dspy.ChainOfThought("q -> a"),
# num_trials=8)`: the compile options, and the program as its dump_state().
SPEC = {
    "compile": {"num_trials": 8, "minibatch": True},
    "program": {"kind": "dspy", "state": {"predict": {"demos": [], "signature": {}}}},
}


@pytest.fixture
def planned_run():
    run = FakeRun()
    run.spec = SPEC
    return run


def test_dashboard_shows_phases_chart_candidates_and_usage(planned_run):
    run = planned_run
    dashboard = RunDashboard(run)
    feed_typical_run(run, trials=7)
    drawn(dashboard)
    bars, labels = dashboard.phase_bars, dashboard.phase_labels
    assert (bars["bootstrap"].value, bars["bootstrap"].max) == (4, 4)
    assert bars["bootstrap"].bar_style == "success" and labels["bootstrap"].value == "4/4 demo sets"
    assert labels["propose"].value == "4 candidate instructions"
    # Seven evaluations: 1, 3 and 6 full, so 4 of the 8 minibatch trials num_trials asks for.
    assert (bars["search"].value, bars["search"].max) == (4, 8)
    assert labels["search"].value == "trial 4/8 · 3 full evaluations"
    assert "status <b" in dashboard.header.value and "running" in dashboard.header.value
    assert "phase search · trials 4 · best 55</div>" in dashboard.header.value
    # Seven trials: 1, 3, 6 are full evaluations, the others minibatches.
    chart = dashboard.chart.value
    assert chart.count('class="trial full"') == 3
    assert chart.count('class="trial minibatch"') == 4
    assert chart.count('class="best-so-far"') == 1
    # Placed on the trial axis as the header counts: the baseline at 0, minibatch trial k at
    # k, a full evaluation at the trial it follows (evaluation 7 is minibatch trial 4).
    assert "trial 4 (minibatch): 55" in chart and "trial 5 (" not in chart
    assert "baseline (full evaluation): 45" in chart
    assert "full evaluation after trial 1: 55" in chart
    assert re.findall(r'class="x-tick"[^>]*>(\d+)<', chart) == ["0", "1", "2", "3", "4"]
    # Candidates with their mean scores (instruction index = trial number % 4), under the
    # predictor's name; the best full evaluation (trial 3: instruction 3, demo set 0) wins.
    table = dashboard.candidates.value
    for text in INSTRUCTIONS[:3]:
        assert text in table
    assert "Think about &lt;units&gt; &amp; answer" in table  # escaped
    cells = re.findall(r"<td[^>]*>(.*?)</td>", table)
    assert cells[:2] == ["predict", "0"] and cells[6:8] == ["predict", "1"]
    assert cells[10:12] == ["45", "45"]  # instruction 1: trials 1 (full) and 5, both 45
    assert table.count("★ best") == 1
    assert re.search(r"★ best</b> <span title=\"Think about", table)
    assert "<b>best program</b> predict: instruction #3, demo set #0</div>" in table
    rows = RunProgress()
    for event in run.events:
        rows.apply(event)
    by_index = {r["index"]: r for r in rows.candidate_rows()}
    assert by_index[1]["trials"] == 2 and by_index[1]["mean_score"] == 45.0  # trials 1 and 5
    assert by_index[3]["best_full_score"] == 55.0  # trial 3, full
    assert "<b>LM calls</b> 70 sent, 0 from the cache · " in dashboard.usage.value
    assert "18,900 tokens (17,500 prompt, 1,400 completion)" in dashboard.usage.value
    assert "<b>cost</b> $0.0070" in dashboard.usage.value
    # One trial a second, 6 trials to go.
    assert dashboard.eta.value == "<b>ETA</b> 6s"
    assert dashboard.error.value == ""
    dashboard.close()


def test_without_the_runs_spec_the_dashboard_counts_evaluations(run, dashboard):
    feed_typical_run(run, trials=7)
    drawn(dashboard)
    assert dashboard.phase_labels["search"].value == "evaluation 7/13"
    assert (dashboard.phase_bars["search"].value, dashboard.phase_bars["search"].max) == (7, 13)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", dashboard.candidates.value)
    assert cells[0] == "predictor 0"
    assert "<b>best program</b> predictor 0: instruction #3, demo set #0" in (
        dashboard.candidates.value
    )


def test_predictor_names_come_from_the_program():
    import dspy

    class TwoSteps(dspy.Module):
        def __init__(self):
            super().__init__()
            self.gen = dspy.ChainOfThought("question -> answer")
            self.check = dspy.Predict("answer -> verdict")

    given = SimpleNamespace(resume_objects={"program": TwoSteps()}, spec={})
    assert predictor_names(given) == ["gen.predict", "check"]
    shipped = dspy.ChainOfThought("question -> answer").dump_state()
    assert predictor_names(SimpleNamespace(spec={"program": {"state": shipped}})) == ["predict"]
    lone = dspy.Predict("question -> answer").dump_state()
    assert predictor_names(SimpleNamespace(spec={"program": {"state": lone}})) == ["self"]
    assert predictor_names(SimpleNamespace()) == []


def test_completed_run_fills_every_bar(planned_run):
    run = planned_run
    dashboard = RunDashboard(run)
    # 13 evaluations for num_trials=8: 8 minibatch trials, 5 full evaluations (1, 3, 6, 9, 12).
    feed_typical_run(run, trials=13)
    run.emit("complete", best_score=55.0, usage=usage(300), trials=13)
    run.finish("completed")
    drawn(dashboard)
    assert all(bar.bar_style == "success" for bar in dashboard.phase_bars.values())
    assert (dashboard.phase_bars["search"].value, dashboard.phase_bars["search"].max) == (8, 8)
    assert dashboard.phase_labels["search"].value == "trial 8/8 · 5 full evaluations"
    assert re.search(
        r"status <b[^>]*>completed</b> · phase done · trials 8 · best 55<", (dashboard.header.value)
    )
    assert dashboard.eta.value == "<b>ETA</b> -"
    assert "LM calls</b> 300" in dashboard.usage.value
    dashboard.close()


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
    assert "full evaluation after trial 4000: 50" in chart  # 1000 of the 5000 are full
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
        assert "trial 1 (minibatch): 60" in chart and "trial 2 (minibatch): 70" in chart
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
    when = [clock(row) for row in other.checkpoint_rows]
    assert controls.checkpoint_picker.options == (
        (f"trial 4 · best 55 · {when[1]}", "ckpt-000002.json"),
        (f"bootstrapped · {when[0]}", "ckpt-000001.json"),
    )
    assert controls.checkpoint_picker.value == "ckpt-000002.json"
    assert controls.resume_button.tooltip == "go on from the chosen checkpoint"


def clock(row: dict) -> str:
    return datetime.datetime.fromtimestamp(row["written_at"]).strftime("%H:%M:%S")


def test_checkpoint_entries_that_would_read_the_same_get_their_snapshot_number(run):
    rows = [checkpoint_row(f"ckpt-{n:06d}.json", trial) for n, trial in ((9, 7), (10, 8), (11, 8))]
    for row in rows:
        row["written_at"] = rows[0]["written_at"]  # the same second
    run.checkpoint_rows = rows
    run.finish("cancelled")
    controls = CheckpointControls(run)
    when = clock(rows[0])
    assert [label for label, _ in controls.checkpoint_picker.options] == [
        f"trial 8 · best 55 · {when} · snapshot 11",
        f"trial 8 · best 55 · {when} · snapshot 10",
        f"trial 7 · best 55 · {when}",
    ]


def test_the_dashboards_checkpoint_list_counts_trials_as_its_header(planned_run):
    run = planned_run
    feed_typical_run(run, trials=7)  # evaluations 1, 3 and 6 are full
    run.checkpoint_rows = [
        checkpoint_row("ckpt-000003.json", 3),  # after evaluation 3: trial 1
        checkpoint_row("ckpt-000004.json", 6),  # after evaluation 6: trial 3
        checkpoint_row("ckpt-000005.json", 9),  # never seen here: shown as it is
    ]
    run.finish("cancelled")
    board = RunDashboard(run)
    try:
        drawn(board)
        labels = [label for label, _ in board.controls.checkpoint_picker.options]
        assert [label.split(" · ")[0] for label in labels] == ["trial 9", "trial 3", "trial 1"]
    finally:
        board.close()


def test_a_disabled_control_says_why(run):
    controls = CheckpointControls(run)
    assert controls.resume_button.tooltip == "the run is still running: cancel it first"
    assert controls.cancel_button.tooltip == "stop within one trial, resumably (asks first)"
    run.finish("completed")
    controls.refresh()
    assert controls.resume_button.tooltip == "the run completed: nothing to resume"
    assert controls.cancel_button.tooltip == "the run completed: nothing to cancel"
    assert controls.checkpoint_button.tooltip == "the run completed: nothing to checkpoint"
    failed = FakeRun("fake03")
    failed.finish("failed", RuntimeError("boom"))
    assert CheckpointControls(failed).resume_button.tooltip == "no valid checkpoint to resume from"


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
    # Five evaluations, two of them full: trial 3, as the dashboard's header counts.
    assert "(trial 3, run" in controls.outcome.value
    assert states(controls) == {"checkpoint": False, "cancel": False, "resume": True}


def test_cancel_asks_first(run):
    controls = CheckpointControls(run)
    assert controls.keep_button.layout.display == "none"
    controls.cancel_button.click()
    assert run.cancel_calls == 0 and controls.cancel_button.description == "Confirm cancel?"
    assert controls.cancel_button.button_style == "danger"
    assert controls.keep_button.layout.display == ""
    controls.refresh()  # a redraw while asking keeps the question
    assert controls.cancel_button.description == "Confirm cancel?"
    controls.keep_button.click()
    assert controls.cancel_button.description == "Cancel"
    assert controls.keep_button.layout.display == "none"
    controls.cancel_button.click()
    controls.cancel_button.click()
    assert controls.wait_idle(WAIT)
    assert run.cancel_calls == 1 and controls.cancel_button.description == "Cancel"


def test_cancel_button_reports_the_trial_and_enables_resume(run):
    feed_typical_run(run, trials=5)
    controls = CheckpointControls(run)
    controls.cancel_button.click()
    controls.cancel_button.click()  # confirmed
    assert controls.wait_idle(WAIT)
    assert run.cancel_calls == 1
    assert "cancelled at trial 3;" in controls.outcome.value  # as the header counts
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
        # Evaluations 1-3 of the snapshot (trial 1), then minibatch trial 2 of the new run.
        assert "trial 2 (minibatch): 90" in chart and chart.count('class="trial') == 4
        assert not board.controls.cancel_button.disabled  # the new run runs
        assert re.search(r"status <b[^>]*>running", board.header.value)
    finally:
        board.close()


def test_a_cancel_in_the_dashboard_is_reported_once(run, dashboard):
    feed_typical_run(run, trials=5)
    drawn(dashboard)
    dashboard.controls.cancel_button.click()
    dashboard.controls.cancel_button.click()
    assert dashboard.controls.wait_idle(WAIT)
    drawn(dashboard)
    assert run.cancel_calls == 1
    assert dashboard.controls.outcome.value == ""
    everything = dashboard.header.value + dashboard.error.value + dashboard.notice.value
    assert everything.count("cancelled at") == 1
    # Trials 2, 4 and 5 were minibatch trials; 1 and 3 full evaluations.
    assert "cancelled at trial 3; resumable checkpoint: ckpt-000001.json</div>" in (
        dashboard.error.value
    )
