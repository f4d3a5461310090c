"""MIPROv2 runs whose LM goes away: an outage is never a score, a run waits for its LM or
stops resumably, cancel always returns, and every resume ends with the trials and program
of an uninterrupted run.

Real things only: the loopback SIMULATED LM server over HTTP (testing/lm_server.py),
DSPy's own ``dspy.LM("openai/...")`` client in the pool kernel, the key in the pool's
``env_vars``. The LMs use ``num_retries=0``: DSPy would otherwise retry each failed call
itself with 1 + 2 + 4 s of backoff before dspex sees the failure; what is tested here is
what dspex does once DSPy gives up, and DSPy's retries would only make each outage slower.
"""

from __future__ import annotations

import html
import time

import dspy
import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.checkpoint import CheckpointDir
from dspex_jupyter.core.errors import (
    LMAuthenticationFailed,
    LMUnavailable,
    NothingToResume,
    RemoteError,
)
from dspex_jupyter.notebook.run_dashboard import RunDashboard
from dspex_jupyter.notebook.run_progress import RunProgress, waiting_line
from dspex_jupyter.notebook.snapshot import run_summary
from dspex_jupyter.optimizers import RunCancelled
from dspex_jupyter.testing.lm_server import SimulatedLMServer
from tests.integration import mipro_helpers as mh
from tests.integration.lm_fixtures import OFFLINE_DSPY_ENV, TEST_KEY
from tests.integration.test_mipro import in_process_reference, trials_of

pytestmark = pytest.mark.integration


def server_lm(server: SimulatedLMServer, **kwargs) -> dspy.LM:
    """DSPy's client of the server; no key here: the kernel reads the pool's env_vars."""
    return dspy.LM("openai/arithmetic", api_base=server.url, cache=False, num_retries=0,
                   **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def manager():
    """One kernel: each run must give it back for the next test to start at all."""
    env = {"OPENAI_API_KEY": TEST_KEY, **OFFLINE_DSPY_ENV}
    with PoolManager([PoolSpec("outage", size=1, env_vars=env)]) as m:
        yield m


@pytest.fixture(scope="module")
def reference():
    """Upstream MIPROv2 in this process against an undisturbed server: trials, program."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_DSPY_ENV.items():
            patch.setenv(name, value)
        with SimulatedLMServer(api_key=TEST_KEY, seed=0) as server:
            return in_process_reference(mh.task(), server_lm(server, api_key=TEST_KEY))


def start(manager, server, folder, **recovery):
    task, lm = mh.task(), server_lm(server)
    optimizer = MIPROv2(manager["outage"], metric=task.metric, task_lm=lm, prompt_lm=lm,
                        recovery=recovery, session_timeout=10, **mh.OPTIONS)  # fmt: skip
    return optimizer.optimize(task.make_program(), task.trainset, task.valset,
                              checkpoint_dir=folder, **mh.COMPILE)  # fmt: skip


def resume(manager, server, folder, **kwargs):
    task, lm = mh.task(), server_lm(server)
    return MIPROv2.resume(folder, manager["outage"], program=task.make_program(),
                          metric=task.metric, task_lm=lm, prompt_lm=lm, session_timeout=10,
                          **kwargs)  # fmt: skip


def when(run, predicate, action):
    """Do ``action()`` once, as the first event matching ``predicate`` arrives."""
    done: list[bool] = []

    def hook(event):
        if not done and predicate(event):
            done.append(True)
            action()

    run.on_event(hook)
    return done


def scores_by_trial(run):
    return {e["number"]: e["score"] for e in run.events if e["kind"] == "trial"}


def assert_no_poisoned_trial(run, reference):
    """Every trial the run reported scored what the uninterrupted run's trial did."""
    expected = {i + 1: value for i, (_, value) in enumerate(reference[0])}
    for number, score in scores_by_trial(run).items():
        assert score == expected[number], f"trial {number} scored {score}, not {expected[number]}"


# Seconds per LM answer while an event triggers an outage: long enough that the rest of the
# run (or of the step) outlasts the event's trip to this process on a loaded machine.
TRIAL_LATENCY = 0.005
STEP_LATENCY = {"bootstrap": 0.02, "propose": 0.1}
AT_TRIAL_4 = lambda e: e["kind"] == "trial" and e["number"] == 4  # noqa: E731
IN_BOOTSTRAP = lambda e: e["kind"] == "phase" and e["phase"] == "bootstrap" and e["step"] == 2  # noqa: E731
IN_PROPOSE = lambda e: e["kind"] == "phase" and e["phase"] == "propose"  # noqa: E731


def test_outage_at_a_trial_stops_resumably_and_resume_is_exact(
    manager, reference, lm_server, tmp_path
):
    lm_server.set_latency(TRIAL_LATENCY)
    run = start(manager, lm_server, tmp_path / "run", lm_outage_wait=0)
    fired = when(run, AT_TRIAL_4, lm_server.go_down)
    with pytest.raises(LMUnavailable) as info:
        run.result(timeout=120)
    assert fired and run.status == "failed"
    assert info.value.details["lm_failure"] == "unavailable" and info.value.hint
    assert info.value.model == "openai/arithmetic"
    assert_no_poisoned_trial(run, reference)  # the abandoned trial was never recorded
    assert 4 <= max(scores_by_trial(run)) < len(reference[0])
    error = next(e for e in run.events if e["kind"] == "error")
    assert error["infrastructure"] and error["resumable"]
    assert not run.session.active  # its kernel went back to the pool
    lm_server.come_back()
    resumed = resume(manager, lm_server, tmp_path / "run")
    result = resumed.result(timeout=120)
    assert (trials_of(result), result.state) == reference


@pytest.mark.parametrize("point", ["bootstrap", "propose"])
def test_outage_in_a_step_checkpoints_nothing_of_it_and_resume_is_exact(
    manager, reference, lm_server, tmp_path, point
):
    # Long enough calls that the outage starts inside the step the event announces.
    lm_server.set_latency(STEP_LATENCY[point])
    run = start(manager, lm_server, tmp_path / "run", lm_outage_wait=0)
    when(run, IN_BOOTSTRAP if point == "bootstrap" else IN_PROPOSE, lm_server.go_down)
    with pytest.raises(RemoteError, match="LM"):
        run.result(timeout=120)
    phases = [c["phase"] for c in run.checkpoints()]
    # No snapshot of the step that met the outage (it would hold fewer sets/candidates).
    assert phases == ([] if point == "bootstrap" else ["bootstrapped"])
    assert not any(e["kind"] == "trial" for e in run.events)
    lm_server.come_back()
    lm_server.set_latency(0.0)
    result = resume(manager, lm_server, tmp_path / "run").result(timeout=120)
    assert (trials_of(result), result.state) == reference


@pytest.mark.parametrize("point", ["bootstrap", "trial"])
def test_the_run_waits_for_its_lm_and_goes_on_exactly(
    manager, reference, lm_server, tmp_path, point
):
    """The default policy waits: the dashboard's "waiting for the LM" event comes, the
    server comes back, the undone step or trial is redone, and nothing differs."""
    lm_server.set_latency(STEP_LATENCY[point] if point == "bootstrap" else TRIAL_LATENCY)
    run = start(manager, lm_server, tmp_path / "run", lm_outage_wait="2m")
    when(run, IN_BOOTSTRAP if point == "bootstrap" else AT_TRIAL_4, lm_server.go_down)
    sidebar: list[dict] = []

    def back() -> None:
        sidebar.append(run_summary(run))  # what the sidebar shows while the run waits
        lm_server.come_back()

    when(run, lambda e: e["kind"] == "waiting", back)
    result = run.result(timeout=180)
    assert (trials_of(result), result.state) == reference
    waiting = next(e for e in run.events if e["kind"] == "waiting")
    assert waiting["lm_failure"] == "unavailable" and waiting["next_try_in"] > 0
    assert waiting["phase"] == ("bootstrap" if point == "bootstrap" else "search")
    assert any(e["kind"] == "recovery" and e["action"] == "lm_back" for e in run.events)
    assert_no_poisoned_trial(run, reference)
    line = sidebar[0]["notice"]
    assert line.startswith("waiting for the LM: ") and line.endswith("next try in 1 s")
    assert waiting["reason"][:60] in line  # the LM client's own words: refused, closed, ...
    progress = RunProgress()  # the dashboard's state, folded from the same events
    for event in run.events[: run.events.index(waiting) + 1]:
        progress.apply(event)
    assert progress.waiting == waiting and waiting_line(progress.waiting) == line
    assert html.escape(line) in RunDashboard._notice_html(progress)  # shown in the dashboard
    for event in run.events[run.events.index(waiting) + 1 :]:
        progress.apply(event)
    assert progress.waiting is None and run.notice is None


def test_cancel_returns_within_seconds_while_the_lm_hangs_and_resume_is_exact(
    manager, reference, lm_server, tmp_path
):
    lm_server.set_latency(TRIAL_LATENCY)
    run = start(manager, lm_server, tmp_path / "run")
    when(run, AT_TRIAL_4, lm_server.hang)
    assert lm_server.wait_for_hung(1, timeout=120)  # the run now waits on a silent server
    started = time.monotonic()
    path = run.cancel()
    assert time.monotonic() - started < 5
    assert run.status == "cancelled" and path is not None and path.is_file()
    with pytest.raises(RunCancelled):
        run.result(timeout=5)
    cancelled = next(e for e in run.events if e["kind"] == "cancelled")
    assert cancelled["kernel_killed"]  # no safe point came: its kernel was replaced
    assert_no_poisoned_trial(run, reference)
    lm_server.release()
    result = resume(manager, lm_server, tmp_path / "run").result(timeout=120)
    assert (trials_of(result), result.state) == reference


def test_cancel_during_a_wait_returns_at_once(manager, lm_server, tmp_path):
    run = start(manager, lm_server, tmp_path / "run", lm_outage_wait="10m")
    when(run, IN_BOOTSTRAP, lm_server.go_down)
    run.wait_for_event(lambda e: e["kind"] == "waiting", timeout=120)
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 5 and run.status == "cancelled"
    cancelled = next(e for e in run.events if e["kind"] == "cancelled")
    assert not cancelled.get("kernel_killed")  # the wait itself stopped, at once


def test_a_failed_run_frees_its_kernel_for_the_next_run_at_once(manager, lm_server, tmp_path):
    """A pool of one kernel: the next optimize starts right away (session_timeout is 10 s;
    a kept kernel would make it wait those 10 s and raise PoolExhausted)."""
    lm_server.go_down()
    failed = start(manager, lm_server, tmp_path / "failed", lm_outage_wait=0)
    with pytest.raises(RemoteError):
        failed.result(timeout=60)
    lm_server.come_back()
    started = time.monotonic()
    second = start(manager, lm_server, tmp_path / "second")
    assert time.monotonic() - started < 5
    assert second.result(timeout=120).score is not None


def test_nothing_to_resume_is_one_error_with_one_hint(manager, lm_server, tmp_path):
    run = start(manager, lm_server, tmp_path / "run")
    run.result(timeout=120)
    assert CheckpointDir(tmp_path / "run").listing()[-1]["phase"] == "done"
    with pytest.raises(NothingToResume, match="completed") as info:
        resume(manager, lm_server, tmp_path / "run")
    assert "start a new run" in info.value.hint
    done = CheckpointDir(tmp_path / "run").snapshots()[-1].name
    with pytest.raises(NothingToResume, match="completed"):  # the same error when named
        resume(manager, lm_server, tmp_path / "run", snapshot=done)


def test_a_refused_key_never_waits_and_never_scores(manager, reference, lm_server, tmp_path):
    """Even with a long outage wait, a key the provider refuses stops the run at once
    (waiting would not bring the LM back), with the error that names the key to set."""
    lm_server.set_latency(TRIAL_LATENCY)
    run = start(manager, lm_server, tmp_path / "run", lm_outage_wait="10m")

    def revoke() -> None:
        lm_server.api_key = "sk-another-key"

    when(run, AT_TRIAL_4, revoke)
    with pytest.raises(LMAuthenticationFailed, match="LMAuthError") as info:
        run.result(timeout=120)
    assert "OPENAI_API_KEY" in info.value.hint
    assert not any(e["kind"] == "waiting" for e in run.events)
    assert_no_poisoned_trial(run, reference)
