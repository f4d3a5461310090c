"""``dspex.compile(..., eval_pool=...)``: a run's evaluations spread over another pool's
kernels give what the same run on one kernel gives (trials, scores, program, usage counted
once), a kernel killed while it holds a shard has that shard redone elsewhere, an LM outage
in an eval kernel is the run's outage, and bad ``eval_pool`` values are typed errors.

Real kernels, real DSPy runs with the SIMULATED LM (in process, or over real HTTP for the
outage), real SIGKILL. Nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import dspy
import pytest

import dspex_jupyter as dspex
from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import EvalPoolLost, InvalidEvalPool, PoolNotFound
from dspex_jupyter.testing.lm_server import SimulatedLMServer
from tests.integration import mipro_helpers as mh
from tests.integration import optimizer_fidelity_helpers as fx
from tests.integration import test_gepa as gepa_tests
from tests.integration.eval_pool_helpers import GatedMetric
from tests.integration.lm_fixtures import OFFLINE_DSPY_ENV, TEST_KEY

pytestmark = pytest.mark.integration

ENV = {"OPENAI_API_KEY": TEST_KEY, **OFFLINE_DSPY_ENV}
TIMEOUT = 240
SHARD_MODULE = "dspex_jupyter.runtime.eval_shard"


@pytest.fixture(scope="module")
def manager():
    """The run's pool (one kernel), an eval pool of two, and an eval pool whose kernel
    cannot load dspex's eval-shard module (its start-up code blocks the import)."""
    specs = [
        PoolSpec("opt", size=1, env_vars=ENV, warmup=["dspy"]),
        PoolSpec("eval", size=2, env_vars=ENV, warmup=["dspy"]),
        PoolSpec("broken", size=1, startup=f"import sys; sys.modules[{SHARD_MODULE!r}] = None"),
    ]
    with PoolManager(specs) as m:
        yield m


def mipro(metric: Any, lm: Any) -> Any:
    return dspy.teleprompt.MIPROv2(
        metric=metric, prompt_model=lm, task_model=lm, verbose=False, **mh.OPTIONS
    )


def run_mipro(manager, folder: Path, metric: Any = None, lm: Any = None, **options: Any):
    task = mh.task()
    lm = lm or task.lm()
    return dspex.compile(
        mipro(metric or task.metric, lm),
        task.make_program(),
        trainset=task.trainset,
        valset=task.valset,
        pool=manager["opt"],
        checkpoint_dir=folder,
        **mh.COMPILE,
        **options,
    )


def outcome(run) -> dict[str, Any]:
    """What two runs must share to count as the same run."""
    result = run.result(timeout=TIMEOUT)
    return {
        "trials": [(t["params"], t["value"]) for t in result.metadata["trials"]],
        "state": result.state,
        "score": result.score,
        "usage": run.metrics["usage"],
    }


def eval_kernels(run) -> set[int]:
    return {e["kernel_pid"] for e in run.events if e["kind"] == "eval_shard"}


@pytest.fixture(scope="module")
def one_kernel(manager, tmp_path_factory):
    """The MIPROv2 run on one kernel: what every eval-pool run must equal."""
    run = run_mipro(manager, tmp_path_factory.mktemp("one") / "run")
    return outcome(run)


def test_mipro_on_an_eval_pool_is_the_one_kernel_run(manager, one_kernel, tmp_path):
    run = run_mipro(manager, tmp_path / "run", eval_pool="eval")
    assert outcome(run) == one_kernel  # trials, best program and score, usage once
    assert one_kernel["usage"]["calls"] > 0
    pids = {k["pid"] for k in manager["eval"].health()["kernels"]}
    assert eval_kernels(run) == pids and len(pids) == 2  # both eval kernels took shards
    trials = mh.COMPILE["num_trials"]
    # Every minibatch and full evaluation went out: two shards each, none redone.
    shards = [e for e in run.events if e["kind"] == "eval_shard"]
    assert len(shards) >= 2 * trials and run.eval_dispatch.shards_redone == 0
    assert manager["eval"].health()["sessions"] == []  # given back when the run ended


def test_random_search_on_an_eval_pool_is_the_one_kernel_run(manager, tmp_path):
    small = fx.task()
    outcomes = []
    for name, options in (("one", {}), ("pool", {"eval_pool": "eval"})):
        lm = small.lm()
        with dspy.context(lm=lm):
            run = dspex.compile(
                fx.bootstrap_rs(small.metric),
                small.make_program(),
                trainset=small.trainset,
                valset=small.valset,
                pool=manager["opt"],
                checkpoint_dir=tmp_path / name,
                **options,
            )
        result = run.result(timeout=TIMEOUT)
        candidates = [
            [c["seed"], c["score"], c["program_state"]] for c in result.metadata["candidates"]
        ]
        outcomes.append((candidates, result.state, result.score, run.metrics["usage"]))
        shards = len(eval_kernels(run))
    assert outcomes[0] == outcomes[1]
    assert shards == 2  # the last run's candidates were scored on both eval kernels


def test_gepa_valset_evaluations_on_an_eval_pool_are_the_one_kernel_run(manager, tmp_path):
    """GEPA's valset evaluations go out; its reflective minibatches (traces) stay."""
    outcomes, shards = [], []
    for name, options in (("one", {}), ("pool", {"eval_pool": "eval"})):
        task = gepa_tests.task()
        lm = task.lm()
        with dspy.context(lm=lm):
            run = dspex.compile(
                gepa_tests.gepa(lm),
                task.make_program(),
                trainset=task.trainset,
                valset=task.valset,
                pool=manager["opt"],
                checkpoint_dir=tmp_path / name,
                **options,
            )
        outcomes.append((gepa_tests.outcome(run.result(timeout=TIMEOUT)), run.metrics["usage"]))
        shards.append([e for e in run.events if e["kind"] == "eval_shard"])
    assert outcomes[0] == outcomes[1]
    assert not shards[0] and {s["examples"] for s in shards[1]} == {len(task.valset) // 2}


def wait_for_gate(run, gate: Path) -> int:
    """The pid of the eval kernel that holds a shard at the gate (GatedMetric)."""
    run.wait_for_event(lambda e: e["kind"] == "eval_shard", timeout=TIMEOUT)
    claimed = gate / "claimed"
    deadline = time.monotonic() + TIMEOUT
    while not claimed.exists():  # the kernel holding a shard says so through the file
        assert time.monotonic() < deadline and not run.done, "no eval kernel took the gate"
        time.sleep(0.05)
    return int((gate / "claim").read_text())


def gated_mipro(manager, tmp_path: Path) -> tuple[Any, Any]:
    (tmp_path / "gate").mkdir()
    task = mh.task()
    lm = task.lm()
    tp = mipro(GatedMetric(task.metric, str(tmp_path / "gate")), lm)
    run = dspex.compile(
        tp,
        task.make_program(),
        trainset=task.trainset,
        valset=task.valset,
        pool=manager["opt"],
        checkpoint_dir=tmp_path / "run",
        eval_pool="eval",
        **mh.COMPILE,
    )
    return run, tp


def test_cancel_during_an_evaluation_then_resume_keeps_the_eval_pool(manager, one_kernel, tmp_path):
    run, tp = gated_mipro(manager, tmp_path)
    wait_for_gate(run, tmp_path / "gate")  # an eval kernel holds its shard: mid-evaluation
    assert run.cancel() is not None and run.status == "cancelled"
    assert manager["eval"].health()["sessions"] == []  # given back at once
    resumed = dspex.resume(tmp_path / "run", manager["opt"], teleprompter=tp)
    got = outcome(resumed)  # the gate is taken: the resumed run's shards all go through
    assert (got["trials"], got["state"], got["score"]) == (
        one_kernel["trials"],
        one_kernel["state"],
        one_kernel["score"],
    )
    assert resumed.eval_pool is manager["eval"] and eval_kernels(resumed)


def test_a_killed_eval_kernel_has_its_shard_redone_elsewhere(manager, one_kernel, tmp_path):
    run, _ = gated_mipro(manager, tmp_path)
    held_by = wait_for_gate(run, tmp_path / "gate")
    os.kill(held_by, signal.SIGKILL)
    assert outcome(run) == one_kernel  # redone, never scored 0; usage counted once
    assert run.eval_dispatch.shards_redone >= 1
    assert held_by in eval_kernels(run)
    assert manager["eval"].wait_ready(timeout=120)  # the pool replaced the killed kernel


def test_an_lm_outage_in_an_eval_kernel_is_the_runs_outage(manager, tmp_path):
    """The LM goes down while eval kernels evaluate: the run waits for it (never a 0.0),
    redoes that evaluation once it is back, and ends as the undisturbed run does."""
    with SimulatedLMServer(api_key=TEST_KEY, seed=0) as server:
        # DSPy's own client, no key here: the kernels read the pools' env_vars.
        lm = dspy.LM("openai/arithmetic", api_base=server.url, cache=False, num_retries=0)
        reference = outcome(run_mipro(manager, tmp_path / "ref", lm=lm))
        run = run_mipro(
            manager, tmp_path / "run", lm=lm, eval_pool="eval", recovery={"lm_outage_wait": 120}
        )
        run.wait_for_event(lambda e: e["kind"] == "eval_shard", timeout=TIMEOUT)
        server.go_down()  # from the search on, only eval kernels call the LM
        waiting = run.wait_for_event(lambda e: e["kind"] == "waiting", timeout=TIMEOUT)
        server.come_back()
        assert outcome(run) == reference
    assert waiting["lm_failure"] == "unavailable" and waiting["phase"] == "search"
    assert any(e["kind"] == "recovery" and e.get("action") == "lm_back" for e in run.events)


def test_an_eval_pool_that_cannot_evaluate_stops_the_run_resumably(manager, tmp_path):
    """Never a 0.0 for an evaluation nobody could do: the run stops with EvalPoolLost."""
    run = run_mipro(manager, tmp_path / "run", eval_pool="broken")
    with pytest.raises(EvalPoolLost) as caught:
        run.result(timeout=TIMEOUT)
    assert "eval_pool" in caught.value.hint and run.status == "failed"
    assert not [e for e in run.events if e["kind"] == "trial"]  # no trial was scored
    assert run.checkpoints()  # what to resume from (bootstrapping and proposals are kept)
    assert manager["broken"].health()["sessions"] == []


def test_bad_eval_pool_is_a_typed_error_before_any_session(manager, tmp_path):
    before = manager["opt"].health()["sessions"]
    with pytest.raises(PoolNotFound, match="no running pool named 'nope'") as missing:
        run_mipro(manager, tmp_path / "a", eval_pool="nope")
    assert missing.value.hint
    with pytest.raises(InvalidEvalPool, match="run's own pool and has one kernel") as same:
        run_mipro(manager, tmp_path / "b", eval_pool="opt")
    assert "PoolSpec('eval', size=2)" in same.value.hint
    assert manager["opt"].health()["sessions"] == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
