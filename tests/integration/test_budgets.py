"""Budgets and honest usage of MIPROv2 runs in session kernels.

A run with ``max_calls``/``max_tokens``/``max_cost`` stops before the trial that would pass
it, resumably, and a resume with a bigger budget ends exactly as an uninterrupted run.
Usage counts the calls DSPy's cache answered apart from those sent, and pool kernels share
DSPy's cache under ``$DSPEX_HOME/dspy-cache`` by default.
"""

from __future__ import annotations

import dspy
import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.core.errors import BudgetExceeded, InvalidSpec
from dspex_jupyter.core.launch import dspy_cache_dir
from dspex_jupyter.notebook.run_progress import budget_lines
from dspex_jupyter.notebook.snapshot import run_summary
from tests.integration import mipro_helpers as mh
from tests.integration.lm_fixtures import OFFLINE_DSPY_ENV, TEST_KEY
from tests.integration.test_mipro import in_process_reference, trials_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("budget", size=1)]) as m:
        yield m


def start(pool, folder, lm=None, **options):
    task = mh.task()
    lm = lm or task.lm()
    optimizer = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm,
                        **{**mh.OPTIONS, **options})  # fmt: skip
    return optimizer.optimize(task.make_program(), task.trainset, task.valset,
                              checkpoint_dir=folder, **mh.COMPILE)  # fmt: skip


def test_a_budget_stops_the_run_before_it_is_passed_and_a_bigger_one_resumes_exactly(
    manager, tmp_path
):
    task = mh.task()
    reference = in_process_reference(task, task.lm())
    full = start(manager["budget"], tmp_path / "full").result(timeout=120)
    assert (trials_of(full), full.state) == reference
    total = full.metadata["metrics"]["usage"]["calls"]
    budget = int(total * 0.7)
    run = start(manager["budget"], tmp_path / "run", max_calls=budget)
    with pytest.raises(BudgetExceeded, match="max_calls") as info:
        run.result(timeout=120)
    assert "bigger budget" in info.value.hint and run.status == "failed"
    used = run.metrics["usage"]["calls"]
    assert 0 < used <= budget  # stopped before the trial that would have passed it
    stop = next(e for e in run.events if e["kind"] == "budget")
    assert stop["limit"] == "max_calls" and stop["used"] + stop["next_trial_needs"] > budget
    status = next(e for e in run.events if e["kind"] == "status")
    assert status["budget"] == {"max_calls": budget}  # shown next to the usage, live
    assert run_summary(run)["budget"] == {"max_calls": budget}  # the sidebar's
    assert budget_lines(run.metrics["usage"], run.metrics["budget"]) == [
        f"calls {used:,} / {budget:,}"
    ]
    assert 1 < run.metrics["trials"] < len(reference[0])
    assert not run.session.active
    resumed = MIPROv2.resume(tmp_path / "run", manager["budget"], program=task.make_program(),
                             metric=task.metric, task_lm=task.lm(), prompt_lm=task.lm(),
                             max_calls=total * 2)  # fmt: skip
    result = resumed.result(timeout=120)
    assert (trials_of(result), result.state) == reference
    assert result.metadata["metrics"]["usage"]["calls"] == total  # nothing spent twice


def test_budgets_must_be_positive_numbers(manager):
    task = mh.task()
    for bad in ({"max_calls": 0}, {"max_tokens": -5}, {"max_cost": "1 dollar"}):
        with pytest.raises(InvalidSpec, match=next(iter(bad))) as info:
            MIPROv2(manager["budget"], metric=task.metric, task_lm=task.lm(), **bad)
        assert info.value.hint


def test_cached_calls_are_counted_apart_and_kernels_share_the_cache(
    lm_server, tmp_path, monkeypatch
):
    """Two kernels, DSPy's default cache place for pool kernels: the cold run sends its
    calls, the warm one (the other kernel) is answered by the cache; same result."""
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DSPY_CACHEDIR")  # set by the lm_server fixture for this process
    env = {"OPENAI_API_KEY": TEST_KEY, **OFFLINE_DSPY_ENV}
    lm = dspy.LM("openai/arithmetic", api_base=lm_server.url, cache=True, num_retries=0)
    with PoolManager([PoolSpec("cached", size=2, env_vars=env)]) as m:
        cold = start(m["cached"], tmp_path / "cold", lm=lm)
        cold_result = cold.result(timeout=120)
        sent = lm_server.requests
        warm = start(m["cached"], tmp_path / "warm", lm=lm)
        assert warm.session.pid != cold.session.pid
        warm_result = warm.result(timeout=120)
    assert (trials_of(warm_result), warm_result.state) == (
        trials_of(cold_result),
        cold_result.state,
    )
    cold_usage = cold_result.metadata["metrics"]["usage"]
    warm_usage = warm_result.metadata["metrics"]["usage"]
    assert cold_usage["calls"] == sent > 0
    assert lm_server.requests == sent  # the warm run sent nothing: all from the cache
    assert warm_usage["calls"] == 0 and warm_usage["total_tokens"] == 0
    assert warm_usage["cached_calls"] == cold_usage["calls"] + cold_usage["cached_calls"]
    assert oct((tmp_path / "home" / "dspy-cache").stat().st_mode & 0o777) == "0o700"
    assert dspy_cache_dir() == tmp_path / "home" / "dspy-cache"
