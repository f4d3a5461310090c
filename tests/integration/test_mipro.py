"""MIPROv2 in a session kernel: fidelity to in-process DSPy, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading

import dspy
import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.checkpoint import CheckpointDir
from dspex_jupyter.core.errors import (
    GpuOutOfMemory,
    OptimizationDiverged,
    RemoteError,
    SessionKernelLost,
)
from dspex_jupyter.optimizers import RunCancelled
from dspex_jupyter.optimizers.mipro import _lm_spec
from tests.integration import mipro_helpers as mh

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("mipro", size=2)]) as m:
        yield m


def in_process_reference(task, lm, num_threads=1):
    """Upstream MIPROv2.compile in this process; its Optuna trials and final program."""
    with mh.captured_studies() as studies:
        optimizer = dspy.teleprompt.MIPROv2(
            metric=task.metric, prompt_model=lm, task_model=lm, num_threads=num_threads,
            verbose=False, **mh.OPTIONS,
        )  # fmt: skip
        best = optimizer.compile(task.make_program(), trainset=task.trainset,
                                 valset=task.valset, **mh.COMPILE)  # fmt: skip
    trials = [(t.params, t.value) for t in studies[0].trials]
    return trials, best.dump_state()


def start(pool, task, lm, folder, program=None, **options):
    optimizer = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm,
                        **{**mh.OPTIONS, **options})  # fmt: skip
    return optimizer.optimize(program or task.make_program(), task.trainset, task.valset,
                              checkpoint_dir=folder, **mh.COMPILE)  # fmt: skip


def trials_of(result):
    return [(t["params"], t["value"]) for t in result.metadata["trials"]]


@pytest.fixture(scope="module")
def reference():
    task = mh.task()
    return in_process_reference(task, task.lm())


def test_run_matches_in_process_mipro_exactly(manager, reference, tmp_path):
    task = mh.task()
    run = start(manager["mipro"], task, task.lm(), tmp_path / "run")
    assert run.status in ("starting", "running")  # optimize returned at once
    result = run.result(timeout=120)
    expected_trials, expected_state = reference
    assert trials_of(result) == expected_trials
    assert result.state == expected_state
    assert result.score == max(v for _, v in expected_trials)
    # The saved program is DSPy's own JSON, loadable into the same program class.
    saved = json.loads(result.save(tmp_path / "prog.json").read_text())
    assert {k: v for k, v in saved.items() if k != "metadata"} == expected_state
    loaded = task.make_program()
    loaded.load(tmp_path / "prog.json")  # DSPy's own loader reads it
    assert loaded.dump_state() == expected_state
    program = result.to_dspy()
    assert program.dump_state() == expected_state
    kinds = {e["kind"] for e in run.events}
    assert {"phase", "candidate", "trial", "checkpoint", "complete"} <= kinds
    trial_events = [e for e in run.events if e["kind"] == "trial"]
    assert [e["score"] for e in trial_events] == [v for _, v in expected_trials]
    assert {e["eval"] for e in trial_events} == {"minibatch", "full"}
    assert run.metrics["usage"]["calls"] > 0 and run.metrics["usage"]["total_tokens"] > 0
    # Snapshots after bootstrapping, after proposing, after every trial, at the end.
    phases = [c["phase"] for c in run.checkpoints()]
    assert phases[:2] == ["bootstrapped", "proposed"] and phases[-1] == "done"
    assert phases.count("search") == 9  # the default trial, then one per objective run
    assert not run.session.active  # a completed run gives its kernel back


def test_no_api_key_in_checkpoints_or_events(tmp_path):
    """Keys live in the pool's environment; none reaches a checkpoint or an event."""
    secret = "sk-very-secret-123"
    spec = _lm_spec(dspy.LM("openai/gpt-4o-mini", api_key=secret, temperature=0.5))
    assert secret not in json.dumps(spec) and spec["state"]["model"] == "openai/gpt-4o-mini"
    task = mh.task()
    score = task.metric

    def leaky_metric(example, prediction, trace=None):
        print("the key is", os.environ["OPENAI_API_KEY"])  # lands in the run's log, masked
        return score(example, prediction, trace)

    task = dataclasses.replace(task, metric=leaky_metric)
    with PoolManager([PoolSpec("keyed", env_vars={"OPENAI_API_KEY": secret})]) as m:
        assert m["keyed"].call("os:getenv", "OPENAI_API_KEY") == secret
        run = start(m["keyed"], task, task.lm(), tmp_path / "run")
        run.result(timeout=120)
    for path in (tmp_path / "run").iterdir():
        assert secret not in path.read_text(), path.name
    assert secret not in json.dumps(run.events)
    log = (tmp_path / "run" / "run.log").read_text()
    assert "the key is [secret]" in log and "Bootstrapping set" in log


def test_dspy_output_goes_to_the_run_log_not_the_kernel_output(manager, tmp_path):
    """DSPy's logs and progress bars (from worker threads too) land in run.log; the
    session's own cells still print to their cell."""
    task = mh.task()
    run = start(manager["mipro"], task, task.lm(), tmp_path / "run", num_threads=2)
    run.result(timeout=120)
    log = run.log_path
    assert log == tmp_path / "run" / "run.log"
    text = log.read_text()
    assert "Average Metric" in text  # tqdm, written by the executor's worker threads
    assert "INFO dspy.teleprompt.mipro_optimizer_v2" in text  # DSPy's logger
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    bootstrap = [
        e["step"] for e in run.events if e["kind"] == "phase" and e["phase"] == "bootstrap"
    ]
    assert bootstrap[-1] == bootstrap[0] + len(bootstrap) - 1 > 1  # parsed from the log
    pool = manager["mipro"]
    with pool.session() as first, pool.session() as second:  # the run's kernel is one
        assert run.session.pid in (first.pid, second.pid)
        for session in (first, second):
            result = session.execute("import sys; print(type(sys.stdout).__name__)", show=False)
            assert result.stdout == "OutStream\n"  # ipykernel's own again, after the run


def test_usage_is_the_same_with_threads(manager, tmp_path):
    """Two runs at once on a pool of two: one thread and four threads count alike."""
    task = mh.task()
    one = start(manager["mipro"], task, task.lm(), tmp_path / "one", num_threads=1)
    four = start(manager["mipro"], task, task.lm(), tmp_path / "four", num_threads=4)
    assert one.session.pid != four.session.pid  # each on its own kernel
    usage_one = one.result(timeout=120).metadata["metrics"]["usage"]
    usage_four = four.result(timeout=120).metadata["metrics"]["usage"]
    assert usage_one == usage_four
    assert usage_one["calls"] > 100 and usage_one["prompt_tokens"] > 10_000


KILL_POINTS = {
    "bootstrapping": lambda e: (
        e["kind"] == "phase" and e["phase"] == "bootstrap" and e.get("step") == 2
    ),
    "proposing": lambda e: e["kind"] == "phase" and e["phase"] == "propose",
    "trial-2": lambda e: e["kind"] == "trial" and e["number"] == 2,
    "trial-6": lambda e: e["kind"] == "trial" and e["number"] == 6,
    "trial-10": lambda e: e["kind"] == "trial" and e["number"] == 10,
}  # fmt: skip


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_after_sigkill_is_exact(manager, reference, tmp_path, point):
    task = mh.task()
    pool = manager["mipro"]
    # A little LM latency so each phase lasts long enough to be killed in.
    lm = task.lm(latency_s=0.002)
    run = start(pool, task, lm, tmp_path / "run", recovery={"auto_resume": 0})
    matches, pid, killed = KILL_POINTS[point], run.session.pid, threading.Event()

    def kill_at_point(event):  # runs as the event arrives, while the kernel works on
        if not killed.is_set() and matches(event):
            killed.set()
            os.kill(pid, signal.SIGKILL)

    run.on_event(kill_at_point)
    assert killed.wait(120)
    with pytest.raises(SessionKernelLost):
        run.result(timeout=60)
    assert pool.wait_ready(timeout=60)
    resumed = MIPROv2.resume(tmp_path / "run", pool, program=task.make_program(),
                             metric=task.metric, task_lm=lm, prompt_lm=lm)  # fmt: skip
    result = resumed.result(timeout=120)
    expected_trials, expected_state = reference
    assert trials_of(result) == expected_trials
    assert result.state == expected_state
    assert any(e["kind"] == "resumed" for e in resumed.events)


def test_checkpoint_on_demand_and_cancel_then_resume(manager, reference, tmp_path):
    task = mh.task()
    lm = task.lm(latency_s=0.002)
    run = start(manager["mipro"], task, lm, tmp_path / "run")
    run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 3, timeout=120)
    path = run.checkpoint(timeout=60)
    assert path.is_file()
    assert any(c["reason"] == "requested" for c in run.checkpoints() if c["ok"])
    cancelled_at = run.cancel(timeout=60)
    assert run.status == "cancelled" and cancelled_at is not None and cancelled_at.is_file()
    # Stopped within one trial: at most the trial in progress (a minibatch trial and the full
    # evaluation that may follow it) after the kernel got the cancel.
    assert run.metrics["trials"] <= run.cancelled_after_trials + 2
    with pytest.raises(RunCancelled, match="resume"):
        run.result(timeout=5)
    assert not run.session.active  # a cancelled run gave its kernel back
    resumed = MIPROv2.resume(tmp_path / "run", manager["mipro"], program=task.make_program(),
                             metric=task.metric, task_lm=lm, prompt_lm=lm)  # fmt: skip
    result = resumed.result(timeout=120)
    assert (trials_of(result), result.state) == reference


def test_damaged_checkpoints_are_refused_by_name_and_skipped_by_default(
    manager, reference, tmp_path
):
    """A damaged, truncated or foreign snapshot is refused whole when named; resume() with no
    name goes on from the newest one that reads back (every snapshot is a clean point), says
    which it skipped, and still ends exactly as an uninterrupted run."""
    task = mh.task()
    lm = task.lm()
    run = start(manager["mipro"], task, lm, tmp_path / "run")
    run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 3, timeout=120)
    run.cancel(timeout=60)
    folder = CheckpointDir(tmp_path / "run")
    newest = folder.snapshots()[-1]
    common = {"program": task.make_program(), "metric": task.metric, "task_lm": lm,
              "prompt_lm": lm}  # fmt: skip
    newest.write_text(newest.read_text().replace('"value":', '"value": 1', 1))
    listing = {c["name"]: c for c in folder.listing()}
    assert listing[newest.name]["ok"] is False and "checksum" in listing[newest.name]["error"]
    with pytest.raises(RemoteError, match="checksum"):
        MIPROv2.resume(folder.path, manager["mipro"], snapshot=newest.name, **common)
    newest.write_text(newest.read_text()[:100])  # truncated
    with pytest.raises(RemoteError, match="not valid JSON"):
        MIPROv2.resume(folder.path, manager["mipro"], snapshot=newest.name, **common)
    newest.write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(RemoteError, match="not a dspex MIPROv2 checkpoint"):
        MIPROv2.resume(folder.path, manager["mipro"], snapshot=newest.name, **common)
    before = folder.snapshots()[-2].name
    resumed = MIPROv2.resume(folder.path, manager["mipro"], **common)
    event = resumed.wait_for_event(lambda e: e["kind"] == "resumed", timeout=60)
    assert (event["snapshot"], event["skipped"]) == (before, [newest.name])
    result = resumed.result(timeout=120)
    assert (trials_of(result), result.state) == reference


def test_out_of_memory_is_never_a_silent_zero(manager, tmp_path):
    task = mh.task()
    lm = task.lm()
    optimizer = MIPROv2(manager["mipro"], metric=task.metric, task_lm=lm, prompt_lm=lm,
                        **mh.OPTIONS)  # fmt: skip
    run = optimizer.optimize(mh.OomOnNewInstructions(), task.trainset, task.valset,
                             checkpoint_dir=tmp_path / "run", **mh.COMPILE)  # fmt: skip
    with pytest.raises(GpuOutOfMemory, match="CUDA out of memory") as info:
        run.result(timeout=120)
    assert "hint" in str(info.value)
    scores = [e["score"] for e in run.events if e["kind"] == "trial"]
    assert 0.0 not in scores  # the abandoned trial was not recorded as a zero
    error = next(e for e in run.events if e["kind"] == "error")
    assert error["infrastructure"] and error["resumable"]
    # The policy cleared the GPU cache and halved the minibatch down to its floor first.
    sizes = [(e["from_size"], e["to_size"]) for e in run.events if e["kind"] == "recovery"]
    assert sizes == [(10, 5), (5, 2)]
    assert all(c["ok"] for c in run.checkpoints())
    assert not run.session.active  # a failed run gave its kernel back


def test_optimize_does_not_block_the_notebook(manager, tmp_path):
    task = mh.task()
    lm = task.lm(latency_s=0.01)  # a run of several seconds
    run = start(manager["mipro"], task, lm, tmp_path / "run")
    run_kernel = run.session.pid
    # While it runs, other work goes on in this process and in the other kernel.
    assert manager["mipro"].call("os:getpid") != run_kernel
    assert not run.done
    run.result(timeout=120)


def test_kernel_death_is_recovered_by_auto_resume(manager, reference, tmp_path):
    """Chaos: kill the run's kernel at two trials; the policy resumes it each time and the
    run ends with the same program as an uninterrupted one."""
    task = mh.task()
    pool = manager["mipro"]
    lm = task.lm(latency_s=0.002)
    run = start(pool, task, lm, tmp_path / "run", recovery={"auto_resume": 3})
    killed: list[int] = []

    def kill_at(event):
        if event["kind"] == "trial" and event["number"] in (3, 8) and event["number"] not in killed:
            killed.append(event["number"])
            os.kill(run.session.pid, signal.SIGKILL)

    run.on_event(kill_at)
    result = run.result(timeout=180)
    assert killed == [3, 8] and run.auto_resumes == 2
    assert [e["attempt"] for e in run.events if e["kind"] == "recovery"] == [1, 2]
    assert (trials_of(result), result.state) == reference


def test_a_search_that_scores_nothing_stops_as_diverged_when_asked(manager, tmp_path):
    task = mh.task()
    lm = task.lm()
    optimizer = MIPROv2(
        manager["mipro"],
        metric="tests.integration.mipro_helpers:always_zero",
        task_lm=lm,
        prompt_lm=lm,
        recovery={"diverged_after": 3, "stop_on_divergence": True},
        **mh.OPTIONS,
    )
    run = optimizer.optimize(
        task.make_program(),
        task.trainset,
        task.valset,
        checkpoint_dir=tmp_path / "run",
        **mh.COMPILE,
    )
    with pytest.raises(OptimizationDiverged, match="the last 3 trials all scored 0") as info:
        run.result(timeout=120)
    assert "another configuration" in str(info.value)
    assert [e["score"] for e in run.events if e["kind"] == "trial"][:3] == [0.0, 0.0, 0.0]
    assert all(c["ok"] for c in run.checkpoints())
    run.close()


def test_by_default_a_search_that_scores_nothing_warns_and_ends_as_dspy_does(manager, tmp_path):
    """The default policy never changes the result of a run that DSPy completes: an
    all-zero search warns once (an event) and ends with DSPy's own trials and program."""
    task = dataclasses.replace(mh.task(), metric=mh.always_zero)
    expected_trials, expected_state = in_process_reference(task, task.lm())
    assert {v for _, v in expected_trials} == {0.0}
    run = start(manager["mipro"], task, task.lm(), tmp_path / "run")
    result = run.result(timeout=120)
    assert (trials_of(result), result.state) == (expected_trials, expected_state)
    warnings = [e for e in run.events if e["kind"] == "warning"]
    assert [w["warning"] for w in warnings] == ["diverged"]
    assert "stop_on_divergence" in warnings[0]["hint"]
    assert run.status == "completed" and not run.session.active


def test_fifty_runs_leave_nothing_behind_in_a_long_lived_kernel(tmp_path):
    """One kernel, fifty short runs one after another: no run record, event list or run
    thread stays, and the thread count at run 50 is that at run 5 (RSS is printed)."""
    task, lm = mh.task(), mh.task().lm()
    options = {**mh.OPTIONS, "num_candidates": 2}
    settings = {**mh.COMPILE, "num_trials": 2}
    measured = {}
    with PoolManager([PoolSpec("flat", size=1)]) as m:
        pool = m["flat"]
        optimizer = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm, **options)
        for number in range(1, 51):
            folder = tmp_path / f"run{number}"
            run = optimizer.optimize(task.make_program(), task.trainset, task.valset,
                                     checkpoint_dir=folder, **settings)  # fmt: skip
            run.result(timeout=120)
            if number in (5, 50):
                here = pool.call("dspex_jupyter.runtime.mipro:runs_here")
                measured[number] = (here, pool.health()["kernels"][0]["rss"])
    for here, _ in measured.values():
        assert here["runs"] == [] and here["events"] == 0 and here["run_threads"] == []
    assert measured[5][0]["threads"] == measured[50][0]["threads"]
    print(f"kernel RSS at run 5: {measured[5][1] / 2**20:.1f} MiB, "
          f"at run 50: {measured[50][1] / 2**20:.1f} MiB")  # fmt: skip
