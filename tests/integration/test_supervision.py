"""Supervision: memory limits, crash loops, and a pool that keeps its size."""

from __future__ import annotations

import time

import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import (
    GpuOutOfMemory,
    KernelDied,
    MemoryLimitExceeded,
    ModelNotFound,
)

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"


def test_memory_limit_stops_only_the_offending_kernel():
    with PoolManager([PoolSpec("mem", size=2, max_memory="300MB")]) as manager:
        pool = manager["mem"]
        hungry, other = pool.session(), pool.session()
        other.call(f"{H}:remember", "kept")
        started = time.monotonic()
        with pytest.raises(MemoryLimitExceeded, match="over the pool's max_memory") as info:
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


def test_soft_warning_at_ninety_percent():
    with PoolManager([PoolSpec("warm", size=1, max_memory="300MB")]) as manager:
        pool = manager["warm"]
        baseline = pool.health()["kernels"][0]["rss"]
        pool.call(f"{H}:hog", int((285_000_000 - baseline) / 1_000_000))
        deadline = time.monotonic() + 5
        while not pool.health()["warnings"] and time.monotonic() < deadline:
            time.sleep(0.05)  # poll: the monitor checks every 0.2 s
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
