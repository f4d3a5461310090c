"""Kernels never outlive the process that started them, and bad messages never kill them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from dspex_jupyter import PoolManager, PoolSpec, protocol
from dspex_jupyter.core.errors import RemoteError

pytestmark = pytest.mark.integration
V = protocol.PROTOCOL_VERSION

HOST = textwrap.dedent(
    """
    import json, sys
    from dspex_jupyter import PoolManager, PoolSpec
    m = PoolManager([PoolSpec("a", size=2), PoolSpec("b", size=1)])
    m.start()
    pids = [p for pool in m.pools.values() for p in pool.kernel_pids]
    print(json.dumps({"pids": pids, "runtime_dir": str(m.runtime_dir)}), flush=True)
    sys.stdin.read()  # block until killed
    """
)


def test_kernels_exit_when_host_is_sigkilled(tmp_path):
    host = subprocess.Popen(
        [sys.executable, "-c", HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        info = json.loads(host.stdout.readline())
    finally:
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
    kernels = [psutil.Process(pid) for pid in info["pids"]]
    assert len(kernels) == 3
    # ipykernel's parent poller notices the reparenting within about a second.
    _, alive = psutil.wait_procs(kernels, timeout=5)
    assert not alive, f"kernels still alive 5 s after their host was killed: {alive}"


@pytest.fixture(scope="module")
def pool():
    with PoolManager([PoolSpec("proto", size=1)]) as m:
        yield m["proto"]


def _raw(pool, data, buffers=None):
    """Send ``data`` as-is on the dspex comm and return the kernel's reply."""
    worker = pool._workers[0]

    async def send():
        loop = asyncio.get_running_loop()
        req_id = data.get("id") if isinstance(data, dict) else None
        future = loop.create_future()
        worker._pending[req_id if isinstance(req_id, str) else ""] = future
        worker._send("comm_msg", {"comm_id": worker._comm_id, "data": data}, buffers)
        reply, _ = await asyncio.wait_for(future, 10)
        return reply

    return pool._runner.run(send())


@pytest.mark.parametrize(
    ("data", "kind", "fragment"),
    [
        ({"v": V, "id": "a1", "op": "no_such_op", "args": {}}, "unknown_op", "unknown op"),
        ({"v": 99, "id": "a2", "op": "hello", "args": {}}, "version", "protocol version 99"),
        ({"v": V, "id": "a3", "op": "hello", "args": []}, "protocol", "'args' must be"),
        ({"v": V, "id": "a4", "op": "", "args": {}}, "protocol", "'op' must be"),
        ({"v": V, "id": "a5", "op": "hello", "args": {"x": 1}}, "protocol", "unexpected keyword"),
        ({"v": V, "id": "a6", "op": "call", "args": {}}, "protocol", "missing"),
        (
            {
                "v": V,
                "id": "a7",
                "op": "call",
                "args": {"func": {"enc": "pickle", "buf": 5}, "payload": None},
            },
            "protocol",
            "buffer",
        ),
        ({"v": V, "id": "a8", "op": "warmup", "args": {"modules": "json"}}, "remote", "list"),
    ],
)
def test_malformed_requests_get_error_replies(pool, data, kind, fragment):
    reply = _raw(pool, data)
    assert reply["ok"] is False
    assert reply["error"]["kind"] == kind
    assert fragment in reply["error"]["message"]
    assert pool.call("os:getpid") == pool.kernel_pids[0]  # the kernel stayed up


def test_non_object_request_gets_error_reply(pool):
    reply = _raw(pool, {"id": 5, "op": "hello"})
    assert reply["ok"] is False and reply["error"]["kind"] == "version"
    assert pool.call("os:getpid") == pool.kernel_pids[0]


def test_protocol_error_surfaces_as_remote_error(pool):
    worker = pool._workers[0]

    async def ask(op):
        return await worker.request(op, {})

    with pytest.raises(RemoteError, match="unknown op 'frobnicate'"):
        pool._runner.run(ask("frobnicate"))
    assert pool._runner.run(ask("hello"))[0]["protocol"] == protocol.PROTOCOL_VERSION
