"""Pools of real kernels started from the test's own Python: calls, map, sessions, death."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path

import psutil
import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import (
    CallTimeout,
    DependencyMissing,
    PoolExhausted,
    PoolNotFound,
    RemoteError,
    SessionClosed,
    SessionKernelLost,
)

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"


@pytest.fixture(scope="module")
def manager():
    with PoolManager(
        [
            PoolSpec("main", size=2, env_vars={"POOL_MARK": "main"}, warmup=["json"]),
            PoolSpec("other", size=1, env_vars={"POOL_MARK": "other"}, startup="BOOT = 7"),
        ]
    ) as m:
        yield m


def test_call_runs_by_import_path_and_by_value(manager):
    pool = manager["main"]
    assert pool.call(f"{H}:square", 7) == 49
    assert pool.call(f"{H}:echo", 1, (2, 3), key=b"x") == ((1, (2, 3)), {"key": b"x"})

    offset = 10

    def add_offset(x):  # defined here, shipped by value
        return x + offset

    assert pool.call(add_offset, 5) == 15
    assert pool.call(lambda: os.getpid()) in pool.kernel_pids


def test_map_keeps_order_and_spreads_over_kernels(manager):
    pool = manager["main"]
    assert pool.map(f"{H}:square", range(50)) == [x * x for x in range(50)]
    pids = set(pool.map(f"{H}:getpid", range(40), chunksize=1))
    assert pids <= set(pool.kernel_pids)
    assert len(pids) == 2
    assert pool.map(f"{H}:square", []) == []


def test_remote_error_is_typed_with_remote_traceback(manager):
    with pytest.raises(RemoteError) as info:
        manager["main"].call(f"{H}:fail", "boom")
    err = info.value
    assert err.remote_type == "ValueError"
    assert err.remote_message == "boom"
    assert err.where.pool == "main"
    assert any("def fail" in line or "raise ValueError" in line for line in err.remote_traceback)
    rendered = "\n".join(err._render_traceback_())
    assert "Remote traceback" in rendered and "ValueError: boom" in rendered


def test_missing_module_is_dependency_missing_with_install_command(manager):
    with pytest.raises(DependencyMissing) as info:
        manager["main"].call("no_such_module_dspex:f")
    assert info.value.package == "no_such_module_dspex"
    assert info.value.install_command == f"{sys.executable} -m pip install no_such_module_dspex"


def test_bad_function_reference_is_a_clear_error(manager):
    with pytest.raises(ValueError, match=r"package\.module:function"):
        manager["main"].call("os.getpid")
    with pytest.raises(RemoteError, match="has no attribute"):
        manager["main"].call("os:no_such_function")


def test_env_vars_and_startup_reach_only_their_own_pool(manager):
    assert set(manager["main"].map(f"{H}:env", ["POOL_MARK"] * 4, chunksize=1)) == {"main"}
    assert manager["other"].call(f"{H}:env", "POOL_MARK") == "other"
    with manager["other"].session() as s:
        assert s.execute("BOOT", show=False).result == "7"
    with manager["main"].session() as s, pytest.raises(RemoteError, match="NameError"):
        s.execute("BOOT", show=False)


def test_session_keeps_state_in_one_kernel(manager):
    pool = manager["main"]
    with pool.session(state={"seed": 3}) as session:
        pids = {session.call(f"{H}:getpid") for _ in range(10)}
        assert pids == {session.pid}
        assert session.call(f"{H}:remember", "a") == ["a"]
        assert session.call(f"{H}:remember", "b") == ["a", "b"]
        session.execute("counter = 41", show=False)
        assert session.execute("counter + 1", show=False).result == "42"
        assert session.call(
            lambda: __import__("dspex_jupyter.runtime").runtime.session_state()
        ) == {
            "seed": 3,
            "items": ["a", "b"],
        }
    with pytest.raises(SessionClosed):
        session.call(f"{H}:getpid")


def test_session_state_must_be_a_dict(manager):
    with pytest.raises(TypeError, match="must be a dict"):
        manager["main"].session(state=[1, 2])


def test_execute_forwards_stdout_stderr_and_rich_output(manager, capsys):
    with manager["main"].session() as session:
        result = session.execute(
            "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\n"
            "from IPython.display import display, HTML\ndisplay(HTML('<b>rich</b>'))\n6*7"
        )
    captured = capsys.readouterr()
    assert "to out" in captured.out and "to err" in captured.err
    assert result.stdout == "to out\n" and result.stderr == "to err\n"
    kinds = [o["output_type"] for o in result.outputs]
    assert "display_data" in kinds and result.result == "42"
    html = next(o for o in result.outputs if o["output_type"] == "display_data")
    assert html["data"]["text/html"] == "<b>rich</b>"


def test_execute_error_raises_remote_error(manager):
    with manager["main"].session() as session, pytest.raises(RemoteError) as info:
        session.execute("1/0", show=False)
    assert info.value.remote_type == "ZeroDivisionError"
    assert any("1/0" in line for line in info.value.remote_traceback)


def test_exhausted_pool_names_pool_and_occupancy(manager):
    pool = manager["other"]
    with pool.session() as held:
        with pytest.raises(PoolExhausted) as info:
            pool.session(timeout=0.2)
        message = str(info.value)
        assert "'other'" in message and held.id in message and "1 in sessions" in message
    # Released: the kernel is free again.
    with pool.session(timeout=5):
        pass


def test_waiting_session_gets_the_kernel_when_released(manager):
    pool = manager["other"]
    held = pool.session()

    async def scenario():
        waiting = asyncio.ensure_future(pool.asession(timeout=30))
        await held.arelease()
        session = await waiting
        await session.arelease()
        return session

    session = asyncio.run(scenario())
    assert session.kernel_id == held.kernel_id


def test_unknown_pool_is_a_clear_error(manager):
    with pytest.raises(PoolNotFound, match=r"(?s)no pool named 'nope'.*running pools: main, other"):
        manager.pool("nope")


def test_async_twins():
    async def scenario():
        async with PoolManager([PoolSpec("asy", size=2)]) as m:
            pool = m["asy"]
            results = await asyncio.gather(*(pool.acall(f"{H}:square", i) for i in range(6)))
            assert results == [i * i for i in range(6)]
            assert await pool.amap(f"{H}:square", [1, 2]) == [1, 4]
            async with await pool.asession() as s:
                out = await s.aexecute("print('x'); 2+2", show=False)
                assert out.result == "4" and out.stdout == "x\n"
                assert await s.acall(f"{H}:getpid") == s.pid
            health = await m.ahealth()
            assert health["kernels"] == 2

    asyncio.run(scenario())


def test_call_timeout_interrupts_and_pool_recovers():
    with PoolManager([PoolSpec("slow", size=1, call_timeout=0.5)]) as m:
        pool = m["slow"]
        with pytest.raises(CallTimeout, match="interrupted"):
            pool.call("time:sleep", 30)
        assert pool.call(f"{H}:square", 3) == 9  # same kernel, interrupted, usable again
        assert pool.health()["deaths"] == 0


def test_session_kernel_death_raises_and_pool_replaces_kernel():
    with PoolManager([PoolSpec("fragile", size=2)]) as m:
        pool = m["fragile"]
        session = pool.session()
        other = pool.session()
        pid = session.pid

        async def kill_while_calling():
            call = asyncio.ensure_future(session.acall(f"{H}:block_forever"))
            # The call is on its way: kill the kernel under it.
            os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(call, timeout=10)

        with pytest.raises(SessionKernelLost, match="died"):
            asyncio.run(kill_while_calling())
        with pytest.raises(SessionKernelLost):
            session.call(f"{H}:getpid")
        assert other.call(f"{H}:getpid") == other.pid  # the other session is untouched
        assert pool.wait_ready(timeout=30)
        health = pool.health()
        assert len(health["kernels"]) == 2 and health["deaths"] == 1
        assert pid not in pool.kernel_pids
        session.release()  # releasing a lost session is harmless
        other.release()
        assert pool.call(f"{H}:square", 4) == 16


def test_idle_kernel_death_is_replaced():
    with PoolManager([PoolSpec("solo", size=1)]) as m:
        pool = m["solo"]
        pid = pool.kernel_pids[0]
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(timeout=10) if psutil.pid_exists(pid) else None
        assert pool.wait_ready(timeout=30)
        assert pool.call(f"{H}:getpid") not in (pid, None)


def test_health_reports_each_kernel(manager):
    health = manager.health()
    kernels = health["pools"]["main"]["kernels"]
    assert len(kernels) == 2
    for kernel in kernels:
        assert psutil.pid_exists(kernel["pid"])
        assert kernel["rss"] > 10_000_000
        assert kernel["state"] in ("idle", "busy", "session")
        assert kernel["uptime"] > 0
        assert set(kernel) >= {"pid", "state", "session", "rss", "uptime", "calls_served"}
    assert sum(k["calls_served"] for k in kernels) > 0


def test_secure_defaults(manager):
    runtime_dir = manager.runtime_dir
    assert stat.S_IMODE(runtime_dir.stat().st_mode) & 0o777 == 0o700  # jupyter adds +t
    for pool in manager.pools.values():
        for worker in pool._workers:
            path = worker.connection_file
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            info = json.loads(Path(path).read_text())
            assert info["transport"] == "ipc" and info["key"] and info["signature_scheme"]
            # ipykernel's only TCP socket is its IOPub pipe for forked children, on loopback.
            sockets = psutil.Process(worker.pid).net_connections(kind="inet")
            listening = [c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN]
            assert all(ip in ("127.0.0.1", "::1") for ip in listening), listening


def test_shutdown_leaves_nothing_behind():
    m = PoolManager([PoolSpec("tmp", size=3)])
    m.start()
    pids = m["tmp"].kernel_pids
    runtime_dir = m.runtime_dir
    assert len(list(runtime_dir.glob("*.json"))) == 3
    assert list(runtime_dir.glob("*-ipc-*"))
    m.shutdown()
    _gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], 10)
    assert not alive
    assert not runtime_dir.exists()
    assert not any(p.pid in pids for p in psutil.Process().children(recursive=True))


class _FailsToUnpickle:
    def __reduce__(self):
        return (eval, ("1/0",))


def test_failed_init_session_surfaces_on_first_use(manager):
    session = manager["main"].session(state={"bad": _FailsToUnpickle()})
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        session.call(f"{H}:getpid")
    session.release()
    with manager["main"].session() as fresh:
        assert fresh.call(f"{H}:getpid") == fresh.pid


def test_kernel_output_goes_to_its_log_not_to_the_notebook(manager, capfd):
    manager["main"].call(lambda: __import__("os").write(2, b"low-level kernel noise\n"))
    assert "low-level kernel noise" not in capfd.readouterr().err
    logs = [k["log"] for k in manager.health()["pools"]["main"]["kernels"]]
    assert any("low-level kernel noise" in Path(log).read_text() for log in logs)
    assert all(stat.S_IMODE(os.stat(log).st_mode) == 0o600 for log in logs)


def test_a_pool_whose_kernels_fail_to_start_says_why_once():
    """The kernel's own error is the message and its hint the hint: neither is repeated."""
    from dspex_jupyter.core.errors import PoolStartError

    manager = PoolManager([PoolSpec("broken", startup="raise ValueError('no config here')")])
    try:
        with pytest.raises(PoolStartError) as caught:
            manager.start()
    finally:
        manager.shutdown()
    text = str(caught.value)
    assert "1 of 1 kernels failed to start" in text
    assert text.count("ValueError: no config here") >= 1
    assert text.count("hint:") == 1
    assert caught.value.hint
