"""Death detection through the provisioner API: kernels with no local process to watch."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import KernelDied
from dspex_jupyter.core.pool import PROVISIONER_POLL_INTERVAL_S
from tests.integration import provisioner_helpers

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"


@pytest.fixture
def opaque_kernel(tmp_path, monkeypatch):
    """A kernelspec whose provisioner is not jupyter_client's LocalProvisioner."""
    provisioner_helpers.register(monkeypatch)
    provisioner_helpers.write_kernelspec(tmp_path, "dspex-opaque")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return "dspex-opaque"


def test_a_kernel_without_a_local_process_is_seen_dead_and_replaced(opaque_kernel):
    with PoolManager([PoolSpec("opaque", kernel=opaque_kernel, size=1)]) as manager:
        pool = manager["opaque"]
        assert pool.kernel_pids == []  # nothing local to watch: the provisioner is asked
        first = pool.call("os:getpid")
        session = pool.session(call_timeout=10)  # old code: never seen, a timeout
        assert session.call("os:getpid") == first
        os.kill(first, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(KernelDied):
            session.call(f"{H}:square", 2)  # fails once the provisioner's poll sees it
        # Seen within one poll interval (1 s); 5 s leaves room for a loaded machine.
        assert time.monotonic() - started < 5.0
        assert PROVISIONER_POLL_INTERVAL_S <= 1.0
        assert pool.wait_ready(timeout=60)
        second = pool.call("os:getpid")
        assert second != first
        events = [e["event"] for e in pool.kernel_events]
        assert events[-2:] == ["launched", "ready"] and "died" in events
        assert pool.health()["deaths"] == 1


def test_pool_stop_kills_a_kernel_without_a_local_process(opaque_kernel):
    """``kill`` goes through the provisioner when there is no pid: a memory breach or an
    ignored interrupt can still stop such a kernel."""
    with PoolManager([PoolSpec("opaque", kernel=opaque_kernel, size=1)]) as manager:
        pool = manager["opaque"]
        session = pool.session(call_timeout=10)  # old code: never seen, a timeout
        first = session.call("os:getpid")
        worker = pool.workers[0]
        assert worker.pid is None and not worker.is_local
        pool.runner.run(_kill(worker))
        with pytest.raises(KernelDied):
            session.call(f"{H}:square", 2)
        assert pool.wait_ready(timeout=60)
        assert pool.call("os:getpid") != first


async def _kill(worker):
    worker.kill()
