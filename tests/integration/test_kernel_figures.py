"""Health and max_memory of kernels that are not on this machine come from the figures the
kernels report about themselves (runtime/health.py), not from this machine's /proc.

The kernels here run on this machine, behind a provisioner that hides their process (the
opaque provisioner of provisioner_helpers, as an SSH, Kubernetes or Docker one would): the
pool has no pid to read, so it must use the kernel-reported path, and psutil can check the
figures from outside.
"""

from __future__ import annotations

import socket
import time

import psutil
import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core import memory_limits
from dspex_jupyter.core.errors import MemoryLimitExceeded
from tests.integration import provisioner_helpers

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"
MB = 1_000_000


@pytest.fixture
def opaque_kernel(tmp_path, monkeypatch):
    provisioner_helpers.register(monkeypatch)
    provisioner_helpers.write_kernelspec(tmp_path, "dspex-opaque")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return "dspex-opaque"


def _tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def _agrees(pool, pid: int, timeout: float = 10.0) -> tuple[int, int]:
    """The kernel's reported RSS and psutil's, once they agree within 10 % (or 10 MB): the
    kernel reports every 0.5 s, so a figure may be up to that old."""
    deadline = time.monotonic() + timeout
    while True:
        reported = pool.health()["kernels"][0]["rss"]
        measured = _tree_rss(pid)
        if reported and abs(reported - measured) <= max(0.1 * measured, 10 * MB):
            return reported, measured
        assert time.monotonic() < deadline, (reported, measured)
        time.sleep(0.1)  # poll: health() has no event to wait on


def test_health_of_a_kernel_elsewhere_is_what_it_reports(opaque_kernel):
    with PoolManager([PoolSpec("away", kernel=opaque_kernel, size=1)]) as manager:
        pool = manager["away"]
        pid = pool.call("os:getpid")
        row = pool.health()["kernels"][0]
        assert row["figures"] == "kernel"
        assert row["pid"] is None  # nothing local: its pid would name another machine's process
        assert row["remote_pid"] == pid and row["host"] == socket.gethostname()
        assert row["gpu"]["available"] is False and row["gpu"]["reason"]  # no GPU here
        before, _ = _agrees(pool, pid)
        pool.call(f"{H}:hog", 150)  # kept by the kernel
        after, _ = _agrees(pool, pid)
        assert after - before > 120 * MB
        assert pool.health()["kernels"][0]["rss_text"].endswith("MiB")


@pytest.fixture(params=["proc", "cgroup"])
def limits(request, monkeypatch):
    if request.param == "cgroup" and memory_limits.own_memory_cgroup() is None:
        pytest.skip("no writable cgroup v1 memory controller here")
    monkeypatch.setenv(memory_limits.ENV_VAR, request.param)
    return request.param


def test_max_memory_of_a_kernel_elsewhere_is_enforced_from_its_figures(opaque_kernel, limits):
    spec = PoolSpec("away", kernel=opaque_kernel, size=1, max_memory="300MB")
    with PoolManager([spec]) as manager:
        pool = manager["away"]
        session = pool.session(call_timeout=60)
        first = session.call("os:getpid")
        started = time.monotonic()
        # The kernel's main thread is blocked in the call: only its own figures (sent from
        # its stream threads) can show the breach.
        with pytest.raises(MemoryLimitExceeded, match="over the pool's max_memory"):
            session.call(f"{H}:hog_and_wait", 400)
        assert time.monotonic() - started < 5.0
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        assert pool.wait_ready(timeout=60)
        health = pool.health()
        assert "max_memory" in health["last_error"]
        assert health["kernels"][0]["figures"] == "kernel"
        assert pool.call(f"{H}:square", 3) == 9
        session.release()
