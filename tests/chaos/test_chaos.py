"""Chaos: kernels killed under load, and start/shutdown cycles. Bounded in time."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import time

import psutil
import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import CallTimeout, KernelDied

pytestmark = [pytest.mark.chaos, pytest.mark.integration]
H = "tests.integration.helpers"


def test_crash_storm_every_call_ends_once_and_the_pool_heals():
    """30 SIGKILLs of random kernels during 2,000 calls at concurrency 16 on a pool of 4,
    and after every 6th of them, a SIGKILL of its replacement while it is still starting."""
    rng = random.Random(7)
    outcomes: dict[int, list[str]] = collections.defaultdict(list)
    with PoolManager([PoolSpec("storm", size=4, call_timeout=30)]) as manager:
        pool = manager["storm"]
        assert pool.wait_ready(timeout=60)
        armed, starting_killed = [False], []

        def kill_a_starting_kernel(event: dict) -> None:
            if event["event"] == "launched" and armed[0]:
                armed[0] = False
                os.kill(event["pid"], signal.SIGKILL)
                starting_killed.append(event["kernel"])

        pool.add_kernel_listener(kill_a_starting_kernel)

        async def storm() -> tuple[int, float]:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(2000):
                queue.put_nowait(i)
            slowest = 0.0

            async def caller() -> None:
                nonlocal slowest
                while not queue.empty():
                    i = queue.get_nowait()
                    started = time.monotonic()
                    try:
                        result = await asyncio.wait_for(pool.acall(f"{H}:square", i), 60)
                        outcomes[i].append("ok" if result == i * i else f"wrong {result}")
                    except (KernelDied, CallTimeout) as exc:
                        outcomes[i].append(type(exc).__name__)
                    slowest = max(slowest, time.monotonic() - started)

            async def killer() -> int:
                kills = 0
                while kills < 30:
                    await asyncio.sleep(0.05)  # poll: pace the kills through the storm
                    pids = pool.kernel_pids
                    if len(pids) != 4:
                        raise AssertionError(f"pool has {len(pids)} kernels, not 4")
                    victim = rng.choice(pids)
                    armed[0] = kills % 6 == 5  # its replacement dies while it starts
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                    while victim in pool.kernel_pids:  # the pool noticed the death
                        await asyncio.sleep(0.01)  # poll
                    assert await pool.await_ready(timeout=60)  # back to 4 after each kill
                return kills

            kill_task = asyncio.ensure_future(killer())
            await asyncio.gather(*(caller() for _ in range(16)))
            kills = await kill_task
            return kills, slowest

        kills, slowest = asyncio.run(storm())
        assert kills == 30
        assert sorted(outcomes) == list(range(2000)), "a call was lost"
        twice = {i: o for i, o in outcomes.items() if len(o) != 1}
        assert not twice, f"calls answered more than once: {twice}"
        kinds = collections.Counter(o[0] for o in outcomes.values())
        assert set(kinds) <= {"ok", "KernelDied"}, kinds
        assert kinds["ok"] >= 1500
        assert slowest < 60
        assert pool.wait_ready(timeout=60) and len(pool.kernel_pids) == 4
        assert len(starting_killed) == 5
        assert pool.health()["deaths"] == 30 + 5
        # After every start and every death, never more than 4 kernels, starting included.
        assert max(e["kernels"] for e in pool.kernel_events) <= 4


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_start_shutdown_cycles_leak_nothing(tmp_path):
    """100 cycles of pool start and shutdown: no process, file, socket or fd left."""
    me = psutil.Process()
    baseline_fds = None
    runtime_dirs = []
    for cycle in range(100):
        with PoolManager([PoolSpec("cycle", size=1)]) as manager:
            assert manager["cycle"].call(f"{H}:square", cycle) == cycle * cycle
            runtime_dirs.append(manager.runtime_dir)
        if cycle == 4:
            baseline_fds = _open_fds()  # after imports and caches have settled
    assert not [p for p in me.children(recursive=True) if p.is_running()]
    assert not [d for d in runtime_dirs if d.exists()]
    assert baseline_fds is not None and _open_fds() <= baseline_fds + 2
    inet = [c for c in me.net_connections(kind="all") if c.status == psutil.CONN_LISTEN]
    assert not inet
