"""Ctrl-C on pool.call / pool.map (and cancelling acall / amap) interrupts the kernel's work,
as Ctrl-C does in a notebook: the kernel and what calls loaded into it are kept. Only a
kernel that ignores the interrupt for the grace period is replaced.

Real kernels, a real SIGINT: the test's main thread gets SIGINT (``pthread_kill``) while it
waits in ``pool.call``, exactly where a notebook's Ctrl-C lands. It is sent once the kernel
said the call started (it connects to a Unix socket the test listens on): no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core import pool as pool_module

pytestmark = pytest.mark.integration
IH = "tests.integration.interrupt_helpers"
H = "tests.integration.helpers"
STARTED_TIMEOUT_S = 60.0


def listen(address: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(address))
    server.listen(4)
    return server


@contextlib.contextmanager
def ctrl_c_once_started(address: Path, calls: int = 1) -> Iterator[threading.Event]:
    """Send SIGINT to the main thread once ``calls`` kernel calls said they started."""
    server = listen(address)
    server.settimeout(STARTED_TIMEOUT_S)
    sent = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    def wait_then_interrupt() -> None:
        try:
            for _ in range(calls):
                conn, _ = server.accept()
                with conn:
                    conn.recv(16)
        except OSError:  # timed out, or the test ended first: interrupt nothing
            return
        sent.set()
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=wait_then_interrupt, name="ctrl-c", daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes a pending accept
        server.close()
        thread.join(10)


def assert_kernel_kept(pool, pid: int) -> None:
    """Same process, no death, what was loaded is still there, and it takes work."""
    assert pool.call(f"{IH}:loaded", "model") == "weights"
    assert pool.kernel_pids == [pid]
    health = pool.health()
    assert health["deaths"] == 0
    assert health["kernels"][0]["state"] == "idle"
    assert pool.call(f"{H}:square", 6) == 36


@pytest.fixture
def single():
    with PoolManager([PoolSpec("intr", size=1)]) as manager:
        pool = manager["intr"]
        pool.call(f"{IH}:load", "model", "weights")  # state beyond the warm-up
        yield pool


def test_ctrl_c_on_call_interrupts_the_kernel_and_keeps_it(single, tmp_path):
    pid = single.kernel_pids[0]
    address = tmp_path / "started.sock"
    with ctrl_c_once_started(address) as sent, pytest.raises(KeyboardInterrupt):
        single.call(f"{IH}:work_until_interrupted", str(address))
    assert sent.is_set()
    assert_kernel_kept(single, pid)


def test_ctrl_c_on_map_interrupts_running_chunks_and_drops_waiting_ones(single, tmp_path):
    pid = single.kernel_pids[0]
    address = tmp_path / "started.sock"
    items = [str(address)] * 3  # one chunk runs, two wait for the only kernel
    with ctrl_c_once_started(address) as sent, pytest.raises(KeyboardInterrupt):
        single.map(f"{IH}:work_until_interrupted", items, chunksize=1)
    assert sent.is_set()
    assert_kernel_kept(single, pid)
    assert single.health()["waiting"] == 0  # the waiting chunks left no waiter behind
    assert single.map(f"{H}:square", range(5)) == [0, 1, 4, 9, 16]


async def started(server: socket.socket, calls: int = 1) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(calls):
        conn, _ = await asyncio.wait_for(loop.sock_accept(server), STARTED_TIMEOUT_S)
        with conn:
            await loop.sock_recv(conn, 16)


def test_cancelling_acall_and_amap_interrupts_the_kernel_and_keeps_it(single, tmp_path):
    pid = single.kernel_pids[0]
    address = tmp_path / "started.sock"

    async def cancel_once_started(make_call) -> None:
        with listen(address) as server:
            server.setblocking(False)
            task = asyncio.ensure_future(make_call())
            await started(server)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        address.unlink()

    asyncio.run(
        cancel_once_started(lambda: single.acall(f"{IH}:work_until_interrupted", str(address)))
    )
    assert_kernel_kept(single, pid)
    asyncio.run(
        cancel_once_started(
            lambda: single.amap(f"{IH}:work_until_interrupted", [str(address)] * 2, chunksize=1)
        )
    )
    assert_kernel_kept(single, pid)


def test_cancelling_a_session_call_interrupts_and_keeps_the_session(single, tmp_path):
    address = tmp_path / "started.sock"
    with single.session(state={"seed": 3}) as session:
        session.execute("resident = 'still here'", show=False)

        async def cancel_once_started() -> None:
            with listen(address) as server:
                server.setblocking(False)
                task = asyncio.ensure_future(
                    session.acall(f"{IH}:work_until_interrupted", str(address))
                )
                await started(server)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(cancel_once_started())
        # Interrupted, the kernel answers at once (not after the 120 s the call would take).
        assert session.execute("resident", show=False, timeout=30).result == "'still here'"
        address.unlink()
        code = f"import {IH} as ih\nih.work_until_interrupted({str(address)!r})"
        with ctrl_c_once_started(address) as sent, pytest.raises(KeyboardInterrupt):
            session.execute(code)  # shows its outputs here: Ctrl-C lands in that loop
        assert sent.is_set()
        assert session.execute("resident", show=False, timeout=30).result == "'still here'"
        assert session.active and single.health()["deaths"] == 0


def test_a_kernel_that_ignores_the_interrupt_is_replaced_after_the_grace(
    single, tmp_path, monkeypatch
):
    monkeypatch.setattr(pool_module, "INTERRUPT_GRACE_S", 1.0)
    pid = single.kernel_pids[0]
    address = tmp_path / "started.sock"
    with ctrl_c_once_started(address) as sent, pytest.raises(KeyboardInterrupt):
        single.call(f"{IH}:ignore_interrupts_and_work", str(address))
    assert sent.is_set()
    # The next call waits for the replacement: the old kernel is killed after the grace.
    new_pid = single.call(f"{H}:getpid")
    assert new_pid != pid and single.kernel_pids == [new_pid]
    health = single.health()
    assert health["deaths"] == 1
    assert "ignored an interrupt" in health["last_error"]
    assert single.call(f"{IH}:loaded", "model") is None  # a new kernel: its state is gone
