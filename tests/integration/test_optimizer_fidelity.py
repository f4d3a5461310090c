"""BootstrapFewShotWithRandomSearch, COPRO and SIMBA through ``dspex.compile`` in a pool
kernel (real kernels, real DSPy, the SIMULATED LM): an uninterrupted run gives what
upstream's in-process ``compile`` gives (candidates, scores, final state), and a run whose
kernel is killed (SIGKILL) mid-run and resumed ends the same."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import dspy
import pytest
from dspy.teleprompt import COPRO, SIMBA, BootstrapFewShotWithRandomSearch

import dspex_jupyter as dspex
from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import SessionKernelLost
from dspex_jupyter.notebook.optimizer_views import run_state, view_for
from tests.integration import optimizer_fidelity_helpers as fx

pytestmark = pytest.mark.integration

# LM latency for the runs that get killed: each step then lasts long enough (tenths of a
# second) for the kill to land inside the run. Answers do not depend on it.
KILL_LATENCY_S = 0.02


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("opt", size=2, warmup=["dspy"])]) as m:
        yield m


@pytest.fixture(scope="module")
def small():
    return fx.task()


# ---- one kind of run per optimizer: (teleprompter, compile arguments, upstream outcome)
def _bootstrap_rs(small, lm):
    return fx.bootstrap_rs(small.metric), {"valset": small.valset}


def _copro(small, lm):
    return fx.copro(small.metric, lm), {"eval_kwargs": fx.COPRO_EVAL_KWARGS}


def _simba(small, lm):
    return fx.simba(small.metric, lm), {"seed": fx.SIMBA_SEED}


RUNS = {
    "BootstrapFewShotWithRandomSearch": (_bootstrap_rs, BootstrapFewShotWithRandomSearch),
    "COPRO": (_copro, COPRO),
    "SIMBA": (_simba, SIMBA),
}


def upstream(name: str, small) -> dict[str, Any]:
    """Upstream's compile in this process, as the run's result would report it."""
    make, _ = RUNS[name]
    lm = small.lm()
    teleprompter, kwargs = make(small, lm)
    with dspy.context(lm=lm):
        program = teleprompter.compile(small.make_program(), trainset=small.trainset, **kwargs)
    return outcome(name, program)


def outcome(name: str, program: Any) -> dict[str, Any]:
    """Candidates (with their scores and program states) and the final state."""
    if name == "BootstrapFewShotWithRandomSearch":
        found = fx.bootstrap_rs_outcome(program)
        candidates = [[seed, score, state] for seed, score, _, state in found["candidates"]]
    elif name == "COPRO":
        found = fx.copro_outcome(program)
        candidates = found["candidates"]
    else:
        found = fx.simba_outcome(program)
        candidates = found["candidates"]
    return {"candidates": candidates, "final": found["final"]}


def reported(name: str, result: Any) -> dict[str, Any]:
    """The same from a run's result (``result.metadata["candidates"]``, ``result.state``)."""
    rows = result.metadata["candidates"]
    if name == "BootstrapFewShotWithRandomSearch":
        candidates = [[c["seed"], c["score"], c["program_state"]] for c in rows]
    elif name == "COPRO":
        candidates = [
            [c["score"], c["instruction"], c["prefix"], c["depth"], c["program_state"]]
            for c in rows
        ]
    else:
        candidates = [[c["score"], c["program_state"]] for c in rows]
    return {"candidates": candidates, "final": result.state}


def start(manager, name, small, lm, folder, **options):
    make, _ = RUNS[name]
    teleprompter, kwargs = make(small, lm)
    with dspy.context(lm=lm):
        run = dspex.compile(
            teleprompter,
            small.make_program(),
            trainset=small.trainset,
            pool=manager["opt"],
            checkpoint_dir=folder,
            **kwargs,
            **options,
        )
    return run, teleprompter


# ---- fidelity: one test per optimizer ----------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_run_gives_what_upstream_compile_gives(manager, small, name, tmp_path):
    run, _ = start(manager, name, small, small.lm(), tmp_path / "run")
    result = run.result(timeout=120)
    expected = upstream(name, small)
    assert reported(name, result) == expected
    assert result.to_dspy().dump_state() == expected["final"]
    assert result.optimizer == name == run.optimizer
    score_at = 1 if name == "BootstrapFewShotWithRandomSearch" else 0
    assert result.score == max(c[score_at] for c in expected["candidates"])
    # The optimizer's own progress, one event per step, and a snapshot after each step.
    steps = [e for e in run.progress_events if e.get("step") is not None]
    assert [e["step"] for e in steps] == list(range(steps[0]["step"], steps[-1]["total"] + 1))
    if name != "SIMBA":  # SIMBA's progress shows mini-batch averages, its result full scores
        assert steps[-1]["best_score"] == result.score
    phases = [c["phase"] for c in run.checkpoints() if c["ok"]]
    assert phases[-1] == "done" and len(phases) == len(steps) + 1
    assert run.resume_kind == "exact"
    # What the dashboard and the sidebar show of it (the view itself, not the wrapper that
    # hides a failing view).
    state = run_state(run)
    rows = dict(view_for(name).progress_items(state))
    assert rows[VIEW_ROWS[name][0]] == VIEW_ROWS[name][1]
    assert len(view_for(name).chart_points(state)) == len([e for e in steps if e["step"]])


VIEW_ROWS = {  # a row each view shows at the end of these runs
    "BootstrapFewShotWithRandomSearch": ("Candidate seed", "6 of 6"),
    "COPRO": ("Depth", "3 of 3"),
    "SIMBA": ("Mini-batch", "4 examples"),
}


# ---- kill the run's kernel mid-run, resume: the same result -------------------------------
KILL_AFTER = {  # the step whose snapshot is on disk when the kernel is killed
    "BootstrapFewShotWithRandomSearch": 2,  # of 6 candidate seeds
    "COPRO": 1,  # of 3 depths
    "SIMBA": 1,  # of 3 mini-batch steps
}


@pytest.mark.parametrize("name", list(RUNS))
def test_killed_run_resumes_to_the_same_result(manager, small, name, tmp_path):
    pool = manager["opt"]
    lm = small.lm(latency_s=KILL_LATENCY_S)
    folder = tmp_path / "run"
    run, teleprompter = start(manager, name, small, lm, folder, recovery={"auto_resume": 0})
    pid, killed = run.session.pid, threading.Event()

    def kill_after_step(event: dict[str, Any]) -> None:  # as the event arrives
        if (
            not killed.is_set()
            and event["kind"] == "checkpoint"
            and event.get("phase") in ("seed", "depth", "step")
            and event.get("trial") == KILL_AFTER[name]
        ):
            killed.set()
            os.kill(pid, signal.SIGKILL)

    run.on_event(kill_after_step)
    assert killed.wait(120)
    with pytest.raises(SessionKernelLost):
        run.result(timeout=60)
    assert pool.wait_ready(timeout=60)
    resumed = dspex.resume(folder, pool, teleprompter=teleprompter, lm=lm)
    result = resumed.result(timeout=120)
    assert reported(name, result) == upstream(name, small)
    assert any(e["kind"] == "resumed" for e in resumed.events)
    # It went on from the snapshot of that step: the steps before were not redone.
    done_again = [e["step"] for e in resumed.progress_events if e.get("step") is not None]
    assert done_again[0] == KILL_AFTER[name] + 1


# ---- an LM outage inside a step: waited out, the step redone, never a score --------------
def test_an_outage_inside_a_copro_depth_is_waited_out_and_the_result_is_unchanged(
    lm_server, tmp_path
):
    """In this process, under the real run machinery (``RunContext``) and DSPy's own HTTP
    client of the loopback SIMULATED server: the server goes down during depth 2; the run
    waits, redoes the depth from its start once the server is back, and ends with
    upstream's candidates and scores (none of them scored during the outage)."""
    from dspex_jupyter.checkpoint import CheckpointDir
    from dspex_jupyter.runtime import runs
    from dspex_jupyter.runtime.copro import ADAPTER
    from tests.integration.lm_fixtures import http_lm

    small = fx.task()
    lm = http_lm(lm_server, task="sentiment", num_retries=0)
    expected = fx.with_lm(
        lm,
        lambda: outcome(
            "COPRO",
            fx.copro(small.metric, lm).compile(
                small.make_program(), trainset=small.trainset, eval_kwargs=fx.COPRO_EVAL_KWARGS
            ),
        ),
    )
    folder = CheckpointDir(tmp_path / "run")
    folder.create()
    rec = runs.RunRecorder("outage", folder, None)
    run = runs.RunContext(rec, ADAPTER, {"lm_outage_wait": 60}, None)
    optimizer = ADAPTER.make_optimizer(fx.copro(small.metric, lm), run)
    found: dict[str, Any] = {}

    def compile_here() -> None:  # the run's thread, as in a kernel
        try:
            with dspy.context(lm=lm, usage_tracker=rec.usage):
                found["program"] = ADAPTER.compile(
                    optimizer,
                    small.make_program(),
                    run,
                    trainset=small.trainset,
                    valset=None,
                    eval_kwargs=fx.COPRO_EVAL_KWARGS,
                )
        except BaseException as exc:  # shown by the assertion below
            found["error"] = exc

    def first_event(predicate, start: int = 0) -> int:
        with rec.cond:
            assert rec.cond.wait_for(
                lambda: any(predicate(e) for e in rec.events[start:]) or "error" in found,
                timeout=60,
            ), "the event never came"
            return len(rec.events)

    lm_server.set_latency(0.02)  # depth 2 lasts ~1 s: the outage starts inside it
    thread = threading.Thread(target=compile_here, name="copro-run")
    thread.start()
    try:
        seen = first_event(
            lambda e: e["kind"] == "phase" and e["phase"] == "depth" and e["step"] == 2
        )
        lm_server.go_down()
        first_event(lambda e: e["kind"] == "waiting", seen)
        lm_server.come_back()
    finally:
        lm_server.come_back()
        thread.join(120)
        rec.finish("completed")
    assert "error" not in found, found.get("error")
    assert outcome("COPRO", found["program"]) == expected
    waits = [e for e in rec.events if e["kind"] == "waiting"]
    assert waits and {e["phase"] for e in waits} == {"depth"}
    assert waits[0]["lm_failure"] == "unavailable"
    assert any(e["kind"] == "recovery" and e["action"] == "lm_back" for e in rec.events)
    # Each depth reported once: the one the outage hit was redone whole, not cut short.
    depths = [e for e in rec.events if e["kind"] == "progress" and e.get("phase") == "depth"]
    assert [e["step"] for e in depths] == [1, 2, 3]
