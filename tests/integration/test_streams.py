"""Streams out of a session's kernel: lossless, ordered, backpressured, cancellable."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal

import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import RemoteError, SessionKernelLost

pytestmark = pytest.mark.integration
S = "tests.integration.stream_helpers"


@pytest.fixture(scope="module")
def pool():
    with PoolManager([PoolSpec("streams", size=1)]) as m:
        yield m["streams"]


def slow_down(item: int) -> None:
    """A deliberately slow consumer: real work on every thousandth item."""
    if item % 1000 == 0:
        data = b"x" * 10_000
        for _ in range(300):
            data = hashlib.sha256(data).digest() * 300


def test_200k_events_to_a_slow_consumer_arrive_complete_and_in_order(pool):
    window, batch = 4, 500
    bound = (window + 1) * batch + 2 * batch  # in flight + the kernel's queue
    with pool.session() as session:
        stream = session.open_stream(f"{S}:count", (200_000,), window=window, batch_items=batch)
        received = 0
        max_ahead = 0
        for item in stream:
            assert item == received
            received += 1
            slow_down(item)
            if item % 20_000 == 0:
                # The kernel's main thread is free while it streams: ask how far it got.
                ahead = session.call(f"{S}:progress")["produced"] - received
                max_ahead = max(max_ahead, ahead)
        assert received == 200_000
        assert 0 < max_ahead <= bound, f"the generator ran {max_ahead} items ahead"


def test_async_for(pool):
    async def consume():
        async with await pool.asession() as session:
            return [item async for item in session.stream(f"{S}:count", 2500)]

    assert asyncio.run(consume()) == list(range(2500))


def test_leaving_the_loop_stops_the_generator_and_session_stays_usable(pool):
    with pool.session() as session:
        for item in session.stream(f"{S}:forever"):
            if item == 100:
                break
        state = session.call(f"{S}:progress")
        assert state["closed"] is True
        produced = state["produced"]
        assert session.call(f"{S}:progress")["produced"] == produced  # it stopped
        stream = session.stream(f"{S}:forever")
        iterator = iter(stream)
        assert next(iterator) == 0
        stream.close()
        assert session.call(f"{S}:progress")["closed"] is True
        assert session.call("os:getpid") == session.pid


def test_generator_error_arrives_after_its_items(pool):
    received = []
    with pool.session() as session, pytest.raises(RemoteError) as info:
        for item in session.stream(f"{S}:fail_after", 2345):
            received.append(item["i"])
    assert received == list(range(2345))
    assert info.value.remote_type == "ValueError"
    assert "generator failed after 2345 items" in info.value.remote_message
    assert any("raise ValueError" in line for line in info.value.remote_traceback)


def test_a_lost_batch_is_detected_and_resent(pool):
    """IOPub can drop messages: drop one batch on arrival and check it comes back."""
    with pool.session() as session:
        stream = session.open_stream(f"{S}:count", (5000,), window=4, batch_items=100)
        worker = session._worker
        dropped = []

        async def install_drop():
            original = worker._read_iopub_message

            def dropping(msg):
                data = msg["content"].get("data") or {}
                if data.get("seq") == 3 and not dropped:
                    dropped.append(3)
                    return
                original(msg)

            worker._read_iopub_message = dropping

        session._runner.run(install_drop())
        try:
            assert list(stream) == list(range(5000))
        finally:
            del worker._read_iopub_message
        assert dropped == [3] and stream.gaps >= 1


def test_kernel_death_mid_stream_raises_never_hangs():
    with PoolManager([PoolSpec("doomed", size=1)]) as m, m["doomed"].session() as session:
        stream = session.stream(f"{S}:forever")
        with pytest.raises(SessionKernelLost):
            for item in stream:
                if item == 10:
                    os.kill(session.pid, signal.SIGKILL)
