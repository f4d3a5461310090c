"""Pools whose kernels a Jupyter Enterprise Gateway 3.3 or Kernel Gateway 3.0.1 runs (#17).

Real gateways on 127.0.0.1 (gateway_fixtures.py, each from its own environment, with a
token), real kernels behind them, the real websocket. Nothing is mocked: the fault tests drop
the client's TCP connection, let the gateway cull a kernel, and stop and start the gateway.
The same matrix as a local pool runs on both gateways; TLS (a self-signed certificate) on
Enterprise Gateway.
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
import time

import cloudpickle
import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.checkpoint import CheckpointDir
from dspex_jupyter.core.errors import (
    CallTimeout,
    GatewayAuthFailed,
    GatewayError,
    GatewayReplyLost,
    GatewayUnavailable,
    KernelDied,
    RemoteError,
    SessionKernelLost,
)
from dspex_jupyter.core.gateway_config import TOKEN_ENV
from dspex_jupyter.exchange import CHUNK_BYTES
from dspex_jupyter.notebook.pool_dashboard import PoolDashboard
from tests.integration import mipro_helpers as mh
from tests.integration.gateway_fixtures import (  # noqa: F401  (pytest fixtures)
    GatewayServer,
    culling_gateway,
    enterprise_gateway,
    gateway_factory,
    kernel_gateway,
    restartable_gateway,
    tls_gateway,
)
from tests.integration.test_mipro import in_process_reference, start, trials_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# The gateway's kernels cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SECRET = "sk-gateway-canary-0123456789"
KERNEL_MARK = "KERNEL_DSPEX_TEST_MARK"
WAIT = 90.0


def square(x):
    return x * x


def environ(name):
    import os

    return os.environ.get(name)


def remember(value):
    from dspex_jupyter.runtime import session_state

    seen = session_state().setdefault("seen", [])
    seen.append(value)
    return list(seen)


def countdown(n):
    yield from range(n, 0, -1)


def slow_count(n, pause):
    import time

    for i in range(n):
        time.sleep(pause)  # a generator that is still running when the connection drops
        yield i


def spin(seconds):
    end = time.time() + seconds
    while time.time() < end:  # pure Python: an interrupt stops it
        pass


def divide(a, b):
    return a / b


def same(value):
    return value


def spec_for(server: GatewayServer, name: str, **options) -> PoolSpec:
    return PoolSpec(
        name,
        gateway=options.pop("gateway", server.url),
        kernel=server.kernel_name,
        auth_token=options.pop("auth_token", server.token),
        **options,
    )


@pytest.fixture(scope="module", params=["kg", "eg"])
def gateway_pool(request):
    """A pool of 2 kernels behind each gateway, with env_vars and a KERNEL_* variable of
    this process (what jupyter_server's GatewayClient forwards)."""
    server = request.getfixturevalue(
        {"kg": "kernel_gateway", "eg": "enterprise_gateway"}[request.param]
    )
    os.environ[KERNEL_MARK] = "from-the-notebook"
    try:
        spec = spec_for(server, "gw", size=2, env_vars={"DSPEX_TEST_KEY": SECRET})
        with PoolManager([spec]) as manager:
            yield server, manager
    finally:
        os.environ.pop(KERNEL_MARK, None)


@pytest.fixture(scope="module")
def reference():
    task = mh.task()
    return in_process_reference(task, task.lm())


def test_a_gateway_pool_serves_like_a_local_one(gateway_pool):
    server, manager = gateway_pool
    pool = manager["gw"]
    workers = pool.workers
    assert len(workers) == 2 and not any(w.is_local for w in workers)
    assert pool.kernel_pids == [] and all(w.kernel.kernel_id for w in workers)
    for worker in workers:  # each kernel is one the gateway knows, reached by its websocket
        assert server.get(f"/api/kernels/{worker.kernel.kernel_id}") == 200
        assert worker.exchange.folder is None and not worker.exchange.shared_memory

    # KERNEL_* variables go with the kernel start; the pool's env_vars reach every kernel
    # (the gateway drops non-KERNEL_ names from the start: they follow over the websocket).
    for _ in workers:
        assert pool.call(environ, "DSPEX_TEST_KEY") == SECRET
        assert pool.call(environ, KERNEL_MARK) == "from-the-notebook"
        assert pool.call(environ, "KERNEL_USERNAME") == getpass.getuser()
        assert pool.call(environ, "DSPEX_POOL") == "gw"

    # Calls, a map, a session with state, a stream, execute.
    assert pool.call(square, 7) == 49
    assert pool.map(square, range(10)) == [x * x for x in range(10)]
    with pool.session(state={"seen": [0]}) as session:
        assert session.call(remember, 1) == [0, 1]
        assert session.call(remember, 2) == [0, 1, 2]
        assert list(session.stream(countdown, 5)) == [5, 4, 3, 2, 1]
        out = session.execute("print('from the gateway'); 6 * 7", show=False)
        assert out.stdout.strip() == "from the gateway" and "42" in str(out.result)

    # A user's exception is classified as for a local pool.
    with pytest.raises(RemoteError) as info:
        pool.call(divide, 1, 0)
    assert info.value.remote_type == "ZeroDivisionError" and info.value.where.pool == "gw"

    # Buffers cross the websocket as binary frames, both ways; a value over CHUNK_BYTES goes
    # in pieces of at most that size.
    before = [(w.transport.binary_frames_sent, w.transport.binary_frames_received) for w in workers]
    payload = os.urandom(2 * CHUNK_BYTES + 12345)
    assert pool.call(same, payload) == payload
    after = [(w.transport.binary_frames_sent, w.transport.binary_frames_received) for w in workers]
    sent = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    received = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    assert sent >= 3 and received >= 3, (sent, received)

    # Interrupt goes through REST: the call stops, the kernel and its state stay.
    with pool.session(state={"seen": [7]}, call_timeout=3) as session:
        pid = session.call(os.getpid)
        with pytest.raises(CallTimeout):
            session.call(spin, 120)
        assert session.call(os.getpid) == pid and session.call(remember, 8) == [7, 8]


def test_health_and_the_dashboard_of_a_gateway_pool(gateway_pool):
    server, manager = gateway_pool
    pool = manager["gw"]
    deadline = time.monotonic() + WAIT
    while True:  # a kernel's first figures come with its feed, started by the first health()
        rows = pool.health()["kernels"]
        if all(row["rss"] for row in rows) or time.monotonic() > deadline:
            break
    assert all(row["figures"] == "kernel" and row["rss"] > 0 for row in rows), rows
    assert all(row["pid"] is None and row["remote_pid"] for row in rows)
    assert pool.health()["source"] == f"gateway {server.url} kernel {server.kernel_name}"

    # The pool dashboard draws it, and its restart button stops a kernel through the
    # gateway (DELETE): the pool replaces it.
    board = PoolDashboard([manager])
    try:
        assert f"gateway {server.url}" in board.table.value and "gw/" in board.table.value
        victim = pool.workers[0]
        kernel_id = victim.kernel.kernel_id
        board.kernel_picker.value = ("gw", victim.id)
        board.restart_button.click()
        assert board.wait_idle(WAIT)
        assert f"kernel {victim.id} (pid None) killed and replaced by gw/" in board.outcome.value
        assert pool.wait_ready(timeout=WAIT)
        assert server.get(f"/api/kernels/{kernel_id}") == 404  # deleted on the gateway
        assert victim.id not in [row["id"] for row in pool.health()["kernels"]]
    finally:
        board.close()


def test_a_restart_through_rest_loses_the_session_and_the_pool_recovers(gateway_pool):
    server, manager = gateway_pool
    pool = manager["gw"]
    session = pool.session(state={"seen": []})
    session.call(remember, 1)
    worker = next(w for w in pool.workers if w.session == session.id)
    kernel_id = worker.kernel.kernel_id
    pool.runner.run(worker.kernel.restart())  # POST /api/kernels/ID/restart
    with pytest.raises(SessionKernelLost, match="restarted by its gateway"):
        session.call(remember, 2)
    assert pool.wait_ready(timeout=WAIT)
    assert pool.map(square, range(4), chunksize=1) == [0, 1, 4, 9]
    deadline = time.monotonic() + WAIT
    while server.get(f"/api/kernels/{kernel_id}") != 404 and time.monotonic() < deadline:
        pass  # the lost kernel is deleted on the gateway as the pool lets it go
    assert server.get(f"/api/kernels/{kernel_id}") == 404


def test_a_kernel_that_crashes_behind_the_gateway_is_seen_and_replaced(gateway_pool):
    """The gateway restarts a crashed kernel and says so on the websocket ("restarting"):
    the kernel's state is gone, so the pool treats it as lost and replaces it."""
    server, manager = gateway_pool
    pool = manager["gw"]
    died = threading.Event()
    pool.add_kernel_listener(lambda event: event["event"] == "died" and died.set())
    session = pool.session(state={"seen": []})
    pid = session.call(os.getpid)
    victim = next(p for p in server.kernel_processes() if p.pid == pid)
    started = time.monotonic()
    victim.kill()
    assert died.wait(WAIT)
    assert time.monotonic() - started < 10.0
    with pytest.raises(SessionKernelLost, match="restarted by its gateway"):
        session.call(remember, 1)
    assert pool.wait_ready(timeout=WAIT)
    assert pid not in set(pool.map(lambda _: os.getpid(), range(4), chunksize=1))


def test_an_optimization_run_behind_a_gateway_mirrors_its_checkpoints(
    enterprise_gateway,  # noqa: F811
    reference,
    tmp_path,
):
    """A MIPROv2 run in a gateway kernel writes its folder on the kernel's side (the kernel's
    own DSPEX_HOME); every snapshot comes back into the notebook's checkpoint_dir."""
    task = mh.task()
    with PoolManager([spec_for(enterprise_gateway, "opt")]) as manager:
        run = start(manager["opt"], task, task.lm(), tmp_path / "run")
        result = run.result(timeout=180)
        manager.shutdown(manifest=tmp_path / "manifest.json")
    expected_trials, expected_state = reference
    assert trials_of(result) == expected_trials and result.state == expected_state
    listing = CheckpointDir(tmp_path / "run").listing()
    assert listing and all(row["ok"] for row in listing)
    # The gateway's token is in no file written: checkpoints, run log, manifest.
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "manifest.json" for path in written)
    token = enterprise_gateway.token.encode()
    assert not [str(path) for path in written if token in path.read_bytes()]


def test_a_gateway_behind_tls_with_its_own_certificate(tls_gateway):  # noqa: F811
    server = tls_gateway
    assert server.url.startswith("https://") and server.ca_cert is not None
    trusted = {"url": server.url, "ca_certs": str(server.ca_cert)}
    with PoolManager([spec_for(server, "tls", gateway=trusted)]) as manager:
        pool = manager["tls"]
        worker = pool.workers[0]
        assert worker.kernel.encrypted and worker.kernel.connection_info["gateway"] == server.url
        payload = os.urandom(100_000)
        assert pool.call(same, payload) == payload and pool.call(square, 9) == 81
        assert worker.transport.binary_frames_sent and worker.transport.binary_frames_received
    # Without the certificate: one clear error when the pool starts, no retries.
    with pytest.raises(GatewayError, match="TLS with gateway") as info:
        PoolManager([spec_for(server, "untrusted", size=2)]).start()
    assert "ca_certs" in info.value.hint


def test_a_bad_token_is_one_clear_error_and_jupyters_variable_is_the_default(
    kernel_gateway,  # noqa: F811
    monkeypatch,
):
    server = kernel_gateway
    refused_before = server.log_tail(10**9).count(" 401 ")
    kernels_before = len(server.kernel_processes())
    with pytest.raises(GatewayAuthFailed, match="refused pool 'bad'") as info:
        PoolManager([spec_for(server, "bad", size=3, auth_token="not-the-token")]).start()
    assert "JUPYTER_GATEWAY_AUTH_TOKEN" in info.value.hint
    log = server.wait_for_log(lambda text: text.count(" 401 ") > refused_before)
    assert log.count(" 401 ") == refused_before + 1  # one request
    assert len(server.kernel_processes()) == kernels_before  # no kernel was started

    monkeypatch.setenv(TOKEN_ENV, server.token)
    spec = PoolSpec("default-token", gateway=server.url, kernel=server.kernel_name)
    with PoolManager([spec]) as manager:
        assert manager["default-token"].call(square, 3) == 9


def test_a_dropped_websocket_reconnects_without_losing_anything(kernel_gateway):  # noqa: F811
    with PoolManager([spec_for(kernel_gateway, "drop")]) as manager:
        pool = manager["drop"]
        with pool.session(state={"seen": [0]}) as session:
            worker = pool.workers[0]
            kernel_id = worker.kernel.kernel_id
            received = []
            for item in session.stream(slow_count, 300, 0.005):
                received.append(item)
                if item == 40:  # mid-stream: close the client's TCP connection

                    async def drop():
                        worker.transport.drop()

                    pool.runner.run(drop())
            assert received == list(range(300))  # every item, once, in order
            assert worker.transport.reconnects >= 1
            assert worker.kernel.kernel_id == kernel_id and worker.state == "session"
            assert session.call(remember, 1) == [0, 1]  # the session's kernel and state kept


def test_a_kernel_culled_by_the_gateway_is_seen_and_replaced(culling_gateway):  # noqa: F811
    """The gateway culls kernels idle for 2 s (also with a websocket open)."""
    ready = threading.Event()
    died = threading.Event()
    with PoolManager([spec_for(culling_gateway, "cull")]) as manager:
        pool = manager["cull"]
        first = pool.workers[0].id

        def listen(event):
            if event["event"] == "died" and event["kernel"] == first:
                died.set()
            if event["event"] == "ready" and event["kernel"] != first:
                ready.set()

        pool.add_kernel_listener(listen)
        session = pool.session(state={"seen": []})
        assert session.call(remember, 1) == [1]
        assert died.wait(WAIT)  # culled while the session held it, idle
        with pytest.raises(SessionKernelLost, match="culled or deleted"):
            session.call(remember, 2)
        assert ready.wait(WAIT)  # a replacement came up


def test_a_gateway_restart_is_classified_and_the_run_resumes_exactly(
    restartable_gateway,  # noqa: F811
    reference,
    tmp_path,
):
    """A run with checkpoints mirrored to the notebook; the gateway stops mid-run (its
    kernels with it): the run fails with a GatewayUnavailable; once the gateway is back the
    pool is whole again and the run resumes to the same result as an uninterrupted one."""
    server = restartable_gateway
    quick = {"url": server.url, "retry_max": 1, "retry_interval": 0.2}
    task = mh.task()
    lm = task.lm(latency_s=0.05)  # the run lasts long enough to be interrupted
    folder = tmp_path / "run"
    with PoolManager([spec_for(server, "run", gateway=quick)]) as manager:
        pool = manager["run"]
        run = start(pool, task, lm, folder, recovery={"auto_resume": 0})
        reached = threading.Event()
        run.on_event(lambda e: e["kind"] == "trial" and e["number"] == 2 and reached.set())
        assert reached.wait(180)
        server.stop()
        with pytest.raises(KernelDied) as info:
            run.result(timeout=WAIT)
        assert isinstance(info.value, GatewayUnavailable), info.value
        assert isinstance(info.value, SessionKernelLost) and "dspex.resume" in info.value.hint
        server.start()
        assert pool.wait_ready(timeout=120)
        resumed = MIPROv2.resume(folder, pool, program=task.make_program(),
                                 metric=task.metric, task_lm=lm, prompt_lm=lm)  # fmt: skip
        result = resumed.result(timeout=180)
    expected_trials, expected_state = reference
    assert trials_of(result) == expected_trials
    assert result.state == expected_state
    assert any(e["kind"] == "resumed" for e in resumed.events)


# ---- replies on the wire when the websocket drops (core/worker.py, runtime/reply_log.py) ----
def sleep_then(seconds, value):
    import time

    time.sleep(seconds)  # the work of a call still running when the connection drops
    return value


def is_reply_with(marker):
    """Matches the kernel's reply carrying ``marker`` (a comm message on IOPub)."""

    def matches(msg):
        data = (msg.get("content") or {}).get("data") or {}
        return msg["header"]["msg_type"] == "comm_msg" and "ok" in data and marker in str(data)

    return matches


def is_busy_with_a_request(msg):
    """The kernel's IOPub "busy" as it starts handling a comm message (an op)."""
    return (
        msg["header"]["msg_type"] == "status"
        and msg["content"].get("execution_state") == "busy"
        and msg.get("parent_header", {}).get("msg_type") == "comm_msg"
    )


@pytest.fixture(scope="module", params=["kg", "eg"])
def dropping_pool(request):
    server = request.getfixturevalue(
        {"kg": "kernel_gateway", "eg": "enterprise_gateway"}[request.param]
    )
    with PoolManager([spec_for(server, "replies")]) as manager:
        pool = manager["replies"]
        yield pool, pool.workers[0]


def test_a_reply_lost_with_the_websocket_is_sent_again_by_the_kernel(dropping_pool):
    """The connection drops with the call's reply on it, before the client reads it: the
    gateway does not replay it; the kernel kept it and sends it again."""
    pool, worker = dropping_pool
    channels, kernel_id = worker.transport, worker.kernel.kernel_id
    reconnects, resent = channels.reconnects, worker.replies_resent
    channels.drop_before_delivering = is_reply_with("marker-lost-reply")
    assert pool.call(same, "marker-lost-reply") == "marker-lost-reply"
    assert channels.drop_before_delivering is None  # the drop happened at that reply
    assert channels.reconnects == reconnects + 1 and worker.replies_resent == resent + 1
    assert worker.kernel.kernel_id == kernel_id and pool.call(square, 5) == 25


def test_a_call_running_across_the_drop_returns_normally(dropping_pool):
    pool, worker = dropping_pool
    channels, resent = worker.transport, worker.replies_resent
    reconnects = channels.reconnects
    channels.drop_before_delivering = is_busy_with_a_request  # the call has started
    assert pool.call(sleep_then, 1.0, "ran through") == "ran through"
    assert channels.drop_before_delivering is None
    assert channels.reconnects == reconnects + 1
    assert worker.replies_resent == resent  # its reply came the normal way


def test_a_request_lost_with_the_websocket_fails_at_once_with_a_typed_error(dropping_pool):
    """The request itself goes down with the connection: the kernel never saw it, so the
    call fails now with GatewayReplyLost (not at call_timeout), and the kernel stays."""
    pool, worker = dropping_pool
    channels, kernel_id = worker.transport, worker.kernel.kernel_id
    channels.lose_when_sending = lambda msg_type, content: (
        msg_type == "comm_msg" and (content.get("data") or {}).get("op") == "call"
    )
    with pytest.raises(GatewayReplyLost, match="never received the request") as info:
        pool.call(same, "never arrives")
    assert "retry" in info.value.hint
    assert channels.lose_when_sending is None
    assert worker.kernel.kernel_id == kernel_id and pool.call(square, 6) == 36  # retried


def test_an_execute_whose_messages_were_lost_fails_instead_of_hanging(dropping_pool):
    pool, worker = dropping_pool
    channels = worker.transport
    channels.lose_when_sending = lambda msg_type, content: msg_type == "execute_request"

    async def execute():
        return await worker.execute("1 + 1")

    with pytest.raises(GatewayReplyLost, match="execute"):
        pool.runner.run(execute())
    assert pool.runner.run(execute())["status"] == "ok"
