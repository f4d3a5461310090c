"""GEPA in a session kernel: fidelity to in-process DSPy, live progress, JSON checkpoints,
exact resume after the kernel is killed or the run cancelled (SIMULATED LM, offline)."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import dspy
import pytest

import dspex_jupyter as dspex
from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.notebook.optimizer_views import progress_items
from dspex_jupyter.testing import get_task
from tests.integration.lm_fixtures import OFFLINE_DSPY_ENV, TEST_KEY, http_lm

BUDGET = 120


def task() -> Any:
    return get_task("arithmetic", n_train=12, n_val=10)


def gepa(lm: Any) -> dspy.GEPA:
    return dspy.GEPA(
        metric=task().feedback_metric,
        reflection_lm=lm,
        max_metric_calls=BUDGET,
        seed=0,
        track_stats=True,
    )


def start(pool: Any, lm: Any, folder: Any, **kwargs: Any) -> Any:
    t = task()
    with dspy.context(lm=lm):
        return dspex.compile(
            gepa(lm),
            t.make_program(),
            trainset=t.trainset,
            valset=t.valset,
            pool=pool,
            checkpoint_dir=folder,
            **kwargs,
        )


def outcome(result: Any) -> tuple[Any, ...]:
    meta = result.metadata
    return (meta["candidates"], meta["parents"], meta["val_aggregate_scores"], result.state)


@pytest.fixture(scope="module")
def manager():
    # The key is for the loopback LM server of the outage test (read in the kernel only).
    env = {"OPENAI_API_KEY": TEST_KEY, **OFFLINE_DSPY_ENV}
    spec = PoolSpec("gepa", size=2, env_vars=env, warmup=["dspy", "dspex_jupyter.runtime.gepa"])
    with PoolManager([spec]) as m:
        yield m


def upstream(lm: Any) -> tuple[Any, ...]:
    """Upstream ``dspy.GEPA(...).compile`` in this process, same seed."""
    t = task()
    with dspy.context(lm=lm):
        program = gepa(lm).compile(t.make_program(), trainset=t.trainset, valset=t.valset)
    results = program.detailed_results
    candidates = [
        {name: p.signature.instructions for name, p in c.named_predictors()}
        for c in results.candidates
    ]
    return candidates, results.parents, results.val_aggregate_scores, program.dump_state()


@pytest.fixture(scope="module")
def reference() -> tuple[Any, ...]:
    return upstream(task().lm())


def test_run_equals_in_process_compile_and_reports_progress(manager, reference, tmp_path):
    t = task()
    run = start(manager["gepa"], t.lm(), tmp_path / "run")
    result = run.result(timeout=120)
    assert outcome(result) == reference
    assert run.optimizer == "GEPA"
    assert result.to_dspy(t.make_program()).dump_state() == reference[3]

    progress = [e for e in run.events if e["kind"] == "progress" and "iteration" in e]
    assert [e["iteration"] for e in progress] == list(range(len(progress)))
    last = progress[-1]
    assert last["metric_calls_used"] >= BUDGET and last["max_metric_calls"] == BUDGET
    assert last["candidates"] == len(reference[0])
    assert last["best_score"] == max(reference[2])
    assert 1 <= last["pareto_front"] <= last["candidates"]
    kept = [e["proposal"] for e in progress if e.get("proposal", {}).get("accepted")]
    assert len(kept) == len(reference[0]) - 1  # every candidate but the seed, in order
    for number, proposal in enumerate(kept, start=1):
        assert proposal["candidate"] == number
        assert proposal["parents"] == reference[1][number]
        assert proposal["score"] == reference[2][number]
    merged = run.metrics["progress"]
    assert merged["iteration"] == last["iteration"]
    # What the dashboard and the sidebar show of it.
    rows = dict(progress_items(run))
    assert rows["Iteration"] == str(last["iteration"])
    assert rows["Metric calls"].startswith(f"{last['metric_calls_used']} / {BUDGET}")
    assert rows["Pareto front"].startswith(str(last["pareto_front"]))
    assert rows["Best aggregate"].startswith(f"{max(reference[2]):.3f}")
    latest = [e["proposal"] for e in progress if "proposal" in e][-1]
    assert f"parent {latest['parents'][0]}: " in rows["Latest proposal"]

    # Checkpoints: one per iteration, JSON only; gepa's own pickle never written.
    checkpoints = [e for e in run.events if e["kind"] == "checkpoint" and e["phase"] == "search"]
    assert len(checkpoints) == len(progress)
    for path in (tmp_path / "run").rglob("*"):
        assert not path.name.endswith((".bin", ".pkl", ".pickle")), path
        if path.suffix == ".json":
            json.loads(path.read_text())
    newest = json.loads(sorted((tmp_path / "run").rglob("ckpt-*.json"))[-1].read_text())
    assert newest["body"]["gepa"]["checkpoint"]["iteration"] == last["iteration"]


def test_kernel_killed_twice_resumes_exactly(manager, reference, tmp_path):
    """Chaos: the run's kernel is killed at two iterations; the recovery policy resumes it
    each time from its newest checkpoint and it ends as an uninterrupted run does."""
    t = task()
    lm = t.lm(latency_s=0.003)  # iterations last long enough to be killed in
    run = start(manager["gepa"], lm, tmp_path / "run", recovery={"auto_resume": 3})
    killed: list[int] = []

    def kill_at(event: dict[str, Any]) -> None:
        number = event.get("iteration")
        if event["kind"] == "progress" and number in (2, 6) and number not in killed:
            killed.append(number)
            os.kill(run.session.pid, signal.SIGKILL)

    run.on_event(kill_at)
    result = run.result(timeout=180)
    assert killed == [2, 6] and run.auto_resumes == 2
    assert outcome(result) == reference
    resumed = [e for e in run.events if e["kind"] == "resumed"]
    assert len(resumed) == 2


def test_cancel_then_resume_goes_on_exactly(manager, reference, tmp_path):
    t = task()
    lm = t.lm(latency_s=0.003)
    run = start(manager["gepa"], lm, tmp_path / "run")
    run.wait_for_event(lambda e: e["kind"] == "progress" and e.get("iteration") == 3, timeout=120)
    run.cancel(timeout=60)
    assert run.status == "cancelled"
    resumed = dspex.resume(
        tmp_path / "run", manager["gepa"], teleprompter=gepa(lm), program=t.make_program(), lm=lm
    )
    result = resumed.result(timeout=120)
    assert outcome(result) == reference
    iterations = [
        e["iteration"] for e in resumed.events if e["kind"] == "progress" and "iteration" in e
    ]
    assert iterations and iterations[0] > 3  # nothing before the cancel is done again


def test_lm_outage_is_waited_out_and_the_iteration_redone(manager, lm_server, tmp_path):
    """Real HTTP: DSPy's client of the loopback SIMULATED server goes down at iteration 3.
    DSPy would score the failed calls as wrong answers; the run instead waits for the LM,
    goes back to the iteration before and ends as an undisturbed run does."""
    expected = upstream(http_lm(lm_server, num_retries=0))
    lm = dspy.LM("openai/arithmetic", api_base=lm_server.url, cache=False, num_retries=0)
    lm_server.set_latency(0.005)  # the outage starts inside an iteration
    run = start(manager["gepa"], lm, tmp_path / "run", recovery={"lm_outage_wait": "2m"})
    fired: list[str] = []

    def outage(event: dict[str, Any]) -> None:
        if event["kind"] == "progress" and event.get("iteration") == 3 and not fired:
            fired.append("down")
            lm_server.go_down()
        elif event["kind"] == "waiting" and fired == ["down"]:
            fired.append("back")
            lm_server.come_back()

    run.on_event(outage)
    result = run.result(timeout=180)
    assert fired == ["down", "back"]
    assert outcome(result) == expected
    waiting = next(e for e in run.events if e["kind"] == "waiting")
    assert waiting["phase"] == "search" and waiting["lm_failure"] == "unavailable"
    assert any(e["kind"] == "recovery" and e["action"] == "lm_back" for e in run.events)
