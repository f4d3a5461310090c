"""dspex.sweep: K configurations as K real runs on a pool (SIMULATED LM, real kernels), at
most pool-size at once, a budget for the whole sweep that stops runs resumably, the
comparison widget, and a sweep that survives its notebook process being killed."""

from __future__ import annotations

import html
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from dspy.teleprompt import BootstrapFewShotWithRandomSearch
from IPython.core.interactiveshell import InteractiveShell

import dspex_jupyter as dspex
from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.checkpoint import CheckpointDir
from dspex_jupyter.core import history
from dspex_jupyter.core.errors import InvalidSpec, InvalidTeleprompter, RunNotFound, SweepInUse
from dspex_jupyter.core.history import RunHistory
from dspex_jupyter.notebook import registry
from dspex_jupyter.notebook.sweep_view import SweepView
from dspex_jupyter.optimizers.sweep import live_sweeps
from tests.integration import optimizer_fidelity_helpers as fh

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAST = {"num_threads": 1, "max_labeled_demos": 2}  # BootstrapFewShotWithRandomSearch options


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("sweep", size=2)]) as m:
        yield m


def _dspex_widgets() -> list:
    from ipywidgets.widgets.widget import _instances

    return [w for w in list(_instances.values()) if type(w).__module__.startswith("dspex_jupyter.")]


def _interval(run) -> tuple[float, float]:
    """When the run's kernel started and ended it (its own event times)."""
    times = [e["time"] for e in run.events if isinstance(e.get("time"), int | float)]
    return min(times), max(times)


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_a_sweep_runs_its_configs_pool_size_at_once_and_compares_them(manager, tmp_path):
    task = fh.task()
    configs = dspex.grid(max_bootstrapped_demos=[1, 2], max_labeled_demos=[1, 2],
                         num_candidate_programs=1, num_threads=1)  # fmt: skip
    assert len(configs) == 4 and configs[1] == {"max_bootstrapped_demos": 1,
        "max_labeled_demos": 2, "num_candidate_programs": 1, "num_threads": 1}  # fmt: skip
    sweep = dspex.sweep(configs, task.make_program(), trainset=task.trainset,
                        valset=task.valset, metric=task.metric, pool="sweep",
                        optimizer=BootstrapFewShotWithRandomSearch, lm=task.lm(),
                        name="grid", checkpoint_dir=tmp_path / "grid")  # fmt: skip
    view = sweep.widget()
    sweep.wait(timeout=240)

    assert sweep.state == "completed" and sweep.counts() == {"completed": 4}
    runs = sweep.runs
    assert len({run.run_id for run in runs}) == 4
    assert _most_at_once([_interval(run) for run in runs]) == 2  # the pool's size, no more
    for index, run in enumerate(runs):  # each an ordinary checkpointed run in its folder
        assert run.checkpoint_dir == tmp_path / "grid" / f"{index:02d}"
        assert CheckpointDir(run.checkpoint_dir).listing()
    scores = [run.result().score for run in runs]
    assert sweep.best().run_id == runs[scores.index(max(scores))].run_id
    usage = sweep.usage()
    assert usage["calls"] == sum(run.metrics["usage"]["calls"] for run in runs)

    assert history.writer.flush(30)
    store = RunHistory()
    record = store.get_sweep("grid")
    assert record.status == "completed" and record.pool == "sweep"
    assert [r["run_id"] for r in record.runs] == [run.run_id for run in runs]
    assert record.configs[1]["options"]["max_labeled_demos"] == 2
    for run in runs:  # BootstrapFewShotWithRandomSearch's seeds are trials in the history
        trials = store.trials(run.run_id)
        assert trials and store.get(run.run_id).trials == len(trials)
        assert trials[-1]["best_score"] == run.result().score
    best = sweep.best_program()
    assert best.dump_state() == sweep.best().result().state

    assert view.wait_drawn(30)
    assert "completed" in view.header.value and "grid" in view.header.value
    assert view.chart.value.count("<polyline") == 4
    for run in runs:
        assert run.run_id in view.table.value
    assert "max_bootstrapped_demos=2" in view.table.value
    assert view.table.value.count(" demos</td>") + view.table.value.count(" demo</td>") == 4
    # each run's best program against the sweep's best: instructions and demos
    records = {run.run_id: store.get(run.run_id) for run in runs}
    best_record = records[sweep.best().run_id]
    differs = False
    for run_id, other in records.items():
        if run_id == best_record.run_id:
            continue
        lines = history.program_diff(best_record, other)
        differs = differs or any(line.endswith("/demos") for line in lines)
        assert html.escape("\n".join(lines or ["(same program)"])) in view.diff.value
    assert differs  # demo counts differ by config (1 or 2 labeled demos)
    view.close()


def test_the_whole_budget_stops_runs_in_flight_resumably(manager, tmp_path):
    task = fh.task()
    lm = task.lm()
    configs = [
        {"max_bootstrapped_demos": k, "num_candidate_programs": 8, **FAST} for k in (1, 2, 3)
    ]  # fmt: skip  (each needs about 150 calls alone)
    sweep = dspex.sweep(configs, task.make_program(), trainset=task.trainset,
                        valset=task.valset, metric=task.metric, pool="sweep",
                        optimizer=BootstrapFewShotWithRandomSearch, lm=lm, name="budgeted",
                        budget={"max_calls": 80}, checkpoint_dir=tmp_path / "b")  # fmt: skip
    sweep.wait(timeout=240)

    status = sweep.status()
    assert status["state"] == "budget_spent" and status["reason"].startswith("budget spent")
    started, never = sweep.entries[:2], sweep.entries[2]
    assert never.status == "pending" and never.run is None  # no new run once it was spent
    for entry in started:  # each stopped, resumably: by its own budget or by the sweep
        assert entry.stopped_by_budget and entry.status in ("cancelled", "failed")
        assert entry.usage.get("calls", 0) <= 80 + 2  # its budget: what was left at its start
    assert history.writer.flush(30)
    recorded = RunHistory().get_sweep("budgeted")
    assert recorded.status == "budget_spent"
    assert [r["stopped_by_budget"] for r in recorded.runs] == [True, True, False]

    # a stopped run resumes from its checkpoint, with a bigger budget of its own
    stopped = max(started, key=lambda e: e.usage.get("calls", 0)).run
    assert CheckpointDir(stopped.checkpoint_dir).listing()
    resumed = dspex.resume(stopped.checkpoint_dir, manager["sweep"], metric=task.metric, lm=lm,
                           max_calls=10_000)  # fmt: skip
    assert resumed.run_id == stopped.run_id
    assert resumed.result(timeout=180).score is not None
    assert resumed.metrics["usage"]["calls"] > stopped.metrics["usage"]["calls"]


def test_cancel_checkpoints_and_stops_the_runs_in_flight(manager, tmp_path):
    task = fh.task()

    def slow_metric(example, prediction, trace=None):  # 20 ms of work per example
        deadline = time.perf_counter() + 0.02
        while time.perf_counter() < deadline:
            pass
        return task.metric(example, prediction, trace)

    configs = dspex.grid(max_bootstrapped_demos=[1, 2, 3], num_candidate_programs=30, **FAST)
    sweep = dspex.sweep(configs, task.make_program(), trainset=task.trainset,
                        valset=task.valset, metric=slow_metric, pool="sweep",
                        optimizer=BootstrapFewShotWithRandomSearch, lm=task.lm(),
                        name="cancelled", checkpoint_dir=tmp_path)  # fmt: skip
    stepped = threading.Event()

    def on_change():  # both runs in flight have finished a step
        runs = [e.run for e in sweep.entries[:2]]
        if all(r is not None and any(e.get("reason") == "step" for e in list(r.events))
               for r in runs):  # fmt: skip
            stepped.set()

    sweep.on_change(on_change)
    on_change()
    assert stepped.wait(120), sweep.status()
    sweep.cancel(timeout=120)

    assert sweep.done and sweep.state == "cancelled" and sweep.reason is None
    first, second, third = sweep.entries
    assert third.status == "pending" and third.run is None
    for entry in (first, second):
        assert entry.status == "cancelled" and not entry.stopped_by_budget
        assert entry.run.status == "cancelled"
        path, body, _ = CheckpointDir(entry.run.checkpoint_dir).newest_readable()
        assert path is not None and body.get("phase") != "done"  # resumable from there
    assert history.writer.flush(30)
    assert RunHistory().get_sweep("cancelled").status == "cancelled"


HOST = textwrap.dedent(
    """
    import os, signal, sys, time
    from dspy.teleprompt import BootstrapFewShotWithRandomSearch
    import dspex_jupyter as dspex
    from dspex_jupyter import PoolManager, PoolSpec
    from dspex_jupyter.core import history
    from tests.integration import optimizer_fidelity_helpers as fh

    folder = sys.argv[1]
    task = fh.task()

    def slow_metric(example, prediction, trace=None):  # 20 ms of work per example
        deadline = time.perf_counter() + 0.02
        while time.perf_counter() < deadline:
            pass
        return task.metric(example, prediction, trace)

    fast = {"num_threads": 1, "max_labeled_demos": 2, "max_bootstrapped_demos": 1}
    configs = [{**fast, "num_candidate_programs": n} for n in (1, 10, 2)]
    manager = PoolManager([PoolSpec("restart", size=1)])
    manager.start()
    sweep = dspex.sweep(configs, task.make_program(), trainset=task.trainset,
                        valset=task.valset, metric=slow_metric, pool=manager["restart"],
                        optimizer=BootstrapFewShotWithRandomSearch, lm=task.lm(),
                        name="restart", checkpoint_dir=folder)

    def killed_mid_run():  # the notebook's kernel dies: the first run done, the second going
        first, second = sweep.entries[0], sweep.entries[1]
        run = second.run
        if first.status == "completed" and run is not None and any(
            e["kind"] == "checkpoint" and e.get("reason") == "step" for e in list(run.events)
        ):
            history.writer.flush(30)
            print(first.run_id, second.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    sweep.on_change(killed_mid_run)
    sweep.wait(300)
    print("the sweep ended before the kill", flush=True)
    """
)


def test_a_sweep_survives_its_notebook_process_and_attaches_in_a_new_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    host = subprocess.run([sys.executable, "-c", HOST, str(tmp_path / "s")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert host.returncode == -signal.SIGKILL, host.stdout + host.stderr[-3000:]
    first_id, second_id = host.stdout.split()[-2:]
    store = RunHistory()
    recorded = store.get_sweep("restart")
    assert recorded.status == "running"  # its process died without saying so
    assert store.get(first_id).status == "completed"
    assert store.get(second_id).status != "completed"

    # A new notebook kernel: %dspex attach finds the sweep in the history by its name.
    task = fh.task()
    ip = InteractiveShell.instance()
    ip.user_ns.update(metric=task.metric, lm=task.lm(), train=task.trainset, val=task.valset)
    ip.run_line_magic("load_ext", "dspex_jupyter")
    try:
        ip.run_line_magic("dspex", "start restart --size 1")  # the pool it ran on, by name
        ip.run_line_magic("dspex", "attach restart --metric metric --lm lm --trainset train "
                          "--valset val --name restarted")  # fmt: skip
        sweep = ip.user_ns["restarted"]
        (view,) = [w for w in _dspex_widgets() if isinstance(w, SweepView) and w.sweep is sweep]
        sweep.wait(timeout=240)
        first, second, third = sweep.entries
        assert first.run is None and first.record.run_id == first_id  # from the history
        assert second.run.run_id == second_id  # resumed from its checkpoint, same run
        assert second.run.resume_kind == "exact"
        assert any(e["kind"] == "resumed" for e in second.run.events)
        assert third.run is not None and third.run_id not in (first_id, second_id)
        assert sweep.state == "completed" and sweep.counts() == {"completed": 3}
        assert view.wait_drawn(30)
        for run_id in (first_id, second_id, third.run_id):
            assert run_id in view.table.value
        assert view.chart.value.count("<polyline") == 3
        ip.run_line_magic("dspex", "attach restart")  # the live one again, not a second
        assert ip.user_ns["sweep"] is sweep
    finally:
        registry.shutdown_default_manager()
        for widget in _dspex_widgets():
            widget.close()
    assert history.writer.flush(30)
    final = RunHistory().get_sweep("restart")
    assert final.status == "completed" and final.pid == os.getpid()
    assert [r["status"] for r in final.runs] == ["completed"] * 3
    assert json.dumps(final.runs).count(second_id) == 1


def test_bad_sweeps_are_clear_errors_before_anything_starts(manager):
    task = fh.task()
    start = {"trainset": task.trainset, "metric": task.metric, "pool": manager["sweep"],
             "optimizer": BootstrapFewShotWithRandomSearch}  # fmt: skip
    program = task.make_program()
    cases = [
        (([], program), {}, InvalidSpec, "non-empty list"),
        (({"seed": 1}, program), {}, InvalidSpec, "non-empty list"),
        ((["fast"], program), {}, InvalidTeleprompter, "config 0 is a str"),
        (([{"bogus": 1}], program), {}, InvalidSpec, "BootstrapFewShotWithRandomSearch(bogus"),
        (([{}], program), {"optimizer": dict}, InvalidTeleprompter, "not a DSPy optimizer"),
        (([{}], program), {"metric": None}, InvalidSpec, "config 0 has no metric"),
        (([{}], program), {"budget": {"max_calls": -1}}, InvalidSpec, "max_calls must be"),
        (([{}], program), {"budget": {"max_trials": 3}}, InvalidSpec, "unknown budget limit"),
    ]
    before = {id(s) for s in live_sweeps()}
    for args, extra, error, message in cases:
        with pytest.raises(error) as caught:
            dspex.sweep(*args, **{**start, **extra})
        assert message in str(caught.value) and caught.value.hint, (args, extra)
    assert {id(s) for s in live_sweeps()} <= before  # none was started

    with pytest.raises(RunNotFound, match="no sweep 'nope'"):
        dspex.attach_sweep("nope", manager["sweep"])
    # a sweep still scheduled by a live process is attached there, not twice
    RunHistory().record_sweep("live0000beef", name="elsewhere", status="running",
                              pid=os.getppid(), host=socket.gethostname())  # fmt: skip
    with pytest.raises(SweepInUse, match=f"process {os.getppid()}") as in_use:
        dspex.attach_sweep("elsewhere", manager["sweep"])
    assert "that notebook" in in_use.value.hint
