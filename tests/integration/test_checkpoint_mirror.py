"""Checkpoints land where the user is: a run whose kernel writes another folder (its own, on
its machine) sends its snapshots and run.log back into the notebook's checkpoint_dir, and a
resume from that folder into a fresh kernel, writing yet another folder, is exact.

The kernels run on this machine: one pool's kernels write a kernel-side folder the test
names (as a kernel on an SSH host would write its own), the other pool's kernels are behind
a provisioner that hides their process, so dspex treats them as remote and mirrors by itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import threading

import dspy
import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.checkpoint import CheckpointDir
from dspex_jupyter.core.errors import SessionKernelLost
from dspex_jupyter.trust import verify_checkpoint
from tests.integration import mipro_helpers as mh
from tests.integration import provisioner_helpers, remote_fixtures

pytestmark = pytest.mark.integration


def _reference(task, lm):
    """Upstream MIPROv2.compile in this process: its trials and final program."""
    with mh.captured_studies() as studies:
        optimizer = dspy.teleprompt.MIPROv2(metric=task.metric, prompt_model=lm, task_model=lm,
                                            verbose=False, **mh.OPTIONS)  # fmt: skip
        best = optimizer.compile(task.make_program(), trainset=task.trainset,
                                 valset=task.valset, **mh.COMPILE)  # fmt: skip
    return [(t.params, t.value) for t in studies[0].trials], best.dump_state()


def _start(pool, task, lm, folder, recovery=None, **options):
    optimizer = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm, recovery=recovery,
                        **mh.OPTIONS)  # fmt: skip
    return optimizer.optimize(task.make_program(), task.trainset, task.valset,
                              checkpoint_dir=folder, **mh.COMPILE, **options)  # fmt: skip


def _snapshots(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in CheckpointDir(folder).snapshots()}


def test_snapshots_come_back_and_a_resume_from_the_notebook_folder_is_exact(tmp_path):
    task = mh.task()
    lm = task.lm(latency_s=0.002)
    notebook, kernel_a, kernel_b = tmp_path / "notebook", tmp_path / "kernel-a", tmp_path / "kb"
    with PoolManager([PoolSpec("mirror", size=1)]) as manager:
        pool = manager["mirror"]
        run = _start(pool, task, lm, notebook, {"auto_resume": 0}, kernel_checkpoint_dir=kernel_a)
        pid, killed = run.session.pid, threading.Event()

        def kill_at_trial_6(event):  # the kernel is killed mid-run, as a host that goes away
            if event["kind"] == "trial" and event["number"] == 6 and not killed.is_set():
                killed.set()
                os.kill(pid, signal.SIGKILL)

        run.on_event(kill_at_trial_6)
        assert killed.wait(120)
        with pytest.raises(SessionKernelLost):
            run.result(timeout=60)
        # Every snapshot the notebook got is the kernel's, byte for byte (one committed as
        # the kill came may not have been sent).
        mine, theirs = _snapshots(notebook), _snapshots(kernel_a)
        assert len(mine) >= 3 and all(theirs[name] == body for name, body in mine.items())
        checkpoints = [e for e in run.events if e["kind"] == "checkpoint"]
        assert checkpoints and all(e["path"].startswith(str(notebook)) for e in checkpoints)
        assert not any(e["kind"] == "mirror" for e in run.events)  # files, not events
        assert (notebook / "run.log").stat().st_size > 0
        assert verify_checkpoint(notebook).trusted  # signed here, as a local run's folder
        shutil.rmtree(kernel_a)  # the host is gone: only the notebook's folder is left
        assert pool.wait_ready(timeout=60)
        resumed = MIPROv2.resume(notebook, pool, program=task.make_program(),
                                 metric=task.metric, task_lm=lm, prompt_lm=lm,
                                 kernel_checkpoint_dir=kernel_b)  # fmt: skip
        result = resumed.result(timeout=180)
    trials = [(t["params"], t["value"]) for t in result.metadata["trials"]]
    assert (trials, result.state) == _reference(task, lm)
    # The new kernel's folder started from the notebook's; everything it wrote came back.
    mine, theirs = _snapshots(notebook), _snapshots(kernel_b)
    assert set(theirs) <= set(mine) and all(mine[name] == theirs[name] for name in theirs)
    assert CheckpointDir(notebook).newest_readable()[1]["phase"] == "done"
    log = (notebook / "run.log").read_bytes()
    assert log.endswith((kernel_b / "run.log").read_bytes())  # appended after the first's
    for path in [notebook, *notebook.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_a_kernel_elsewhere_mirrors_by_itself(tmp_path, monkeypatch):
    provisioner_helpers.register(monkeypatch)
    provisioner_helpers.write_kernelspec(tmp_path / "specs", "dspex-opaque")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "specs"))
    task = mh.task()
    lm = task.lm()
    with PoolManager([PoolSpec("away", kernel="dspex-opaque", size=1)]) as manager:
        run = _start(manager["away"], task, lm, tmp_path / "notebook")
        run.result(timeout=180)
    mine = _snapshots(tmp_path / "notebook")
    # The kernel's own folder, under its DSPEX_HOME (this process's: it runs here).
    theirs = _snapshots(os.path.join(os.environ["DSPEX_HOME"], "kernel-runs", run.run_id))
    assert theirs and mine == theirs
    assert CheckpointDir(tmp_path / "notebook").newest_readable()[1]["phase"] == "done"


@pytest.fixture
def ssh_kernel_name(tmp_path):
    """A kernelspec for kernels on an SSH host of this machine (remote_fixtures: sshd on
    127.0.0.2), with this process set up as the notebook's machine."""
    reason = remote_fixtures.missing_reason()
    if reason:
        pytest.skip(reason)
    _fresh_response_listener()
    try:
        with remote_fixtures.ssh_host(tmp_path / "ssh") as host, host.client_env():
            yield host.write_kernelspec(os.environ["DSPEX_HOME"], "ssh-mirror")
    finally:
        _fresh_response_listener()


def _fresh_response_listener() -> None:
    """gateway_provisioners' response listener is a process-wide singleton that accepts on
    the event loop of the first manager that used it: a manager of an earlier test leaves it
    on a loop that is gone. Each test here gets its own (and leaves none behind)."""
    import sys

    module = sys.modules.get("gateway_provisioners.response_manager")
    if module is not None and module.ResponseManager.initialized():
        module.ResponseManager.instance().stop_response_manager()
        module.ResponseManager.clear_instance()


def test_killed_on_an_ssh_host_resumed_here_is_exact(ssh_kernel_name, tmp_path):
    """A run on a kernel over a real SSH hop (127.0.0.2) writes its folder on the host; the
    host's kernel is killed; the run resumes from the notebook's folder in a local kernel."""
    kernel = ssh_kernel_name
    task = mh.task()
    lm = task.lm(latency_s=0.002)
    notebook = tmp_path / "notebook"
    with PoolManager([PoolSpec("away", kernel=kernel, size=1)]) as manager:
        run = _start(manager["away"], task, lm, notebook, {"auto_resume": 0})
        remote_pid = run.session.call("os:getpid")  # the run goes on on a thread
        assert run.session.pid is None  # not a process of this machine's, as far as dspex knows
        killed = threading.Event()

        def kill_at_trial_4(event):
            if event["kind"] == "trial" and event["number"] == 4 and not killed.is_set():
                killed.set()
                os.kill(remote_pid, signal.SIGKILL)  # the host goes away

        run.on_event(kill_at_trial_4)
        assert killed.wait(120)
        with pytest.raises(SessionKernelLost):
            run.result(timeout=60)
    assert _snapshots(notebook)  # came back over the SSH kernel's channels
    with PoolManager([PoolSpec("here", size=1)]) as manager:
        resumed = MIPROv2.resume(notebook, manager["here"], program=task.make_program(),
                                 metric=task.metric, task_lm=lm, prompt_lm=lm)  # fmt: skip
        result = resumed.result(timeout=180)
    trials = [(t["params"], t["value"]) for t in result.metadata["trials"]]
    assert (trials, result.state) == _reference(task, lm)
