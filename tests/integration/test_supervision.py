"""Supervision: memory limits, crash loops, and a pool that keeps its size."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core import memory_limits
from dspex_jupyter.core.errors import (
    GpuOutOfMemory,
    KernelDied,
    MemoryLimitExceeded,
    ModelNotFound,
)

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"
S = "tests.integration.supervision_helpers"


@pytest.fixture(params=["cgroup", "proc"])
def limits(request, monkeypatch):
    """Run a memory-limit test on both paths: the OS's cgroup, and the /proc watch."""
    if request.param == "cgroup" and memory_limits.own_memory_cgroup() is None:
        pytest.skip("no writable cgroup v1 memory controller here")
    monkeypatch.setenv(memory_limits.ENV_VAR, request.param)
    return request.param


def _memory_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if "memory" in line.split(":")[1].split(","):
            return line.split(":", 2)[2]
    return ""


def test_memory_limit_stops_only_the_offending_kernel(limits):
    with PoolManager([PoolSpec("mem", size=2, max_memory="300MB")]) as manager:
        pool = manager["mem"]
        hungry, other = pool.session(), pool.session()
        in_own_cgroup = "/dspex-" in _memory_cgroup(hungry.pid)
        assert in_own_cgroup == (limits == "cgroup")
        other.call(f"{H}:remember", "kept")
        started = time.monotonic()
        # The limit reads back as it was typed, the usage in the same decimal unit.
        with pytest.raises(
            MemoryLimitExceeded, match=r"used [\d.]+MB, over the pool's max_memory of 300MB"
        ) as info:
            hungry.call(f"{H}:hog_and_wait", 400)
        # The allocation itself takes a moment; the kill follows within the check interval.
        assert time.monotonic() - started < 3.0
        assert info.value.where.pool == "mem"
        assert other.call(f"{H}:remember", "still") == ["kept", "still"]  # untouched
        assert pool.wait_ready(timeout=60)
        health = pool.health()
        assert len(health["kernels"]) == 2 and "max_memory" in health["last_error"]
        hungry.release()
        other.release()


def test_soft_warning_at_ninety_percent(limits):
    with PoolManager([PoolSpec("warm", size=1, max_memory="300MB")]) as manager:
        pool = manager["warm"]
        baseline = pool.health()["kernels"][0]["rss"]
        # 292 MB of RSS: over 270 MB (90 %) on both paths (a cgroup does not count the
        # ~16 MB of shared library pages that RSS does), under the 300 MB limit.
        pool.call(f"{H}:hog", int((292_000_000 - baseline) / 1_000_000))
        deadline = time.monotonic() + 5
        while not pool.health()["warnings"] and time.monotonic() < deadline:
            time.sleep(0.05)  # poll: health() has no event to wait on
        assert any("over 90%" in w for w in pool.health()["warnings"])
        assert pool.call(f"{H}:square", 3) == 9  # warned, not stopped


def test_a_kernel_that_keeps_dying_is_backed_off_and_reported():
    with PoolManager([PoolSpec("loop", size=1)]) as manager:
        pool = manager["loop"]
        for _ in range(3):
            assert pool.wait_ready(timeout=60)
            with pytest.raises(KernelDied):
                pool.call("os:_exit", 3)
        health = pool.health()
        assert any("keep dying" in w for w in health["warnings"])
        assert health["backoff_until"] is not None
        assert pool.wait_ready(timeout=30)  # it does come back, just not in a tight loop
        assert pool.call(f"{H}:square", 4) == 16


def test_out_of_memory_call_is_retried_with_half_the_batch():
    with PoolManager([PoolSpec("gpuish", size=1, recovery={"min_batch_size": 2})]) as manager:
        pool = manager["gpuish"]
        result = pool.call(f"{H}:embed_batch", ["a"] * 40, batch_size=32)
        assert result == {"embedded": 40, "batch_size": 8}
        steps = [(r["from_size"], r["to_size"]) for r in pool.health()["recoveries"]]
        assert steps == [(32, 16), (16, 8)]
    strict = PoolSpec("strict", size=1, recovery={"oom_retry": False})
    with PoolManager([strict]) as manager, pytest.raises(GpuOutOfMemory, match="CUDA out of"):
        manager["strict"].call(f"{H}:embed_batch", ["a"], batch_size=32)


def test_a_missing_model_file_is_model_not_found():
    with PoolManager([PoolSpec("models", size=1)]) as manager:
        with pytest.raises(ModelNotFound, match=r"model\.safetensors") as info:
            manager["models"].call("builtins:open", "/no/such/dir/model.safetensors")
        assert "no model hub is reachable offline" in str(info.value)


def test_memory_of_the_kernels_children_counts(limits):
    """A subprocess of the kernel that passes the limit stops the kernel (the cgroup's
    OOM killer stops the child; the pool then stops the kernel, as the /proc watch does)."""
    with PoolManager([PoolSpec("tree", size=1, max_memory="300MB")]) as manager:
        pool = manager["tree"]
        with pytest.raises(MemoryLimitExceeded, match="over the pool's max_memory"):
            pool.call(f"{S}:child_hogs", 400)
        assert pool.wait_ready(timeout=60)
        assert pool.call(f"{H}:square", 3) == 9


def test_a_bad_memory_limits_setting_is_a_typed_error(monkeypatch):
    monkeypatch.setenv(memory_limits.ENV_VAR, "magic")
    manager = PoolManager([PoolSpec("bad", size=1, max_memory="300MB")])
    try:
        with pytest.raises(memory_limits.MemoryLimitsUnavailable, match="not one of auto"):
            manager.start()
        assert "bad" not in manager.pools
    finally:
        manager.shutdown()


def _kill_starting_kernels(pool, kills: int) -> threading.Event:
    """Kill each replacement kernel the moment it is launched (still starting), and with it
    one kernel that is up, until ``kills`` kernels are killed."""
    done = threading.Event()
    left = [kills]

    def on_event(event: dict) -> None:
        if event["event"] != "launched" or left[0] <= 0:
            return
        victims = [event["pid"]]
        victims += [w.pid for w in pool.workers if w.state == "idle" and w.pid][:1]
        for pid in victims[: left[0]]:
            os.kill(pid, signal.SIGKILL)
            left[0] -= 1
        if left[0] <= 0:
            done.set()

    pool.add_kernel_listener(on_event)
    return done


@pytest.mark.parametrize("size", [1, 3])
def test_a_pool_never_holds_more_kernels_than_its_size(size):
    """Kernels killed while their replacements start, and replacements killed while they
    start: one place decides how many to start, so the count never passes the size."""
    with PoolManager([PoolSpec("steady", size=size)]) as manager:
        pool = manager["steady"]
        done = _kill_starting_kernels(pool, kills=4)
        os.kill(pool.kernel_pids[0], signal.SIGKILL)  # the first replacement starts it all
        assert done.wait(timeout=120)
        assert pool.wait_ready(timeout=120)
        counts = [e["kernels"] for e in pool.kernel_events]
        assert max(counts) <= size, list(pool.kernel_events)
        assert len(pool.kernel_pids) == size
        assert pool.health()["deaths"] == 5
        assert pool.map(f"{H}:square", range(6)) == [i * i for i in range(6)]
