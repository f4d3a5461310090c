"""Security by default: loopback only, private files, signed messages, inert checkpoints."""

from __future__ import annotations

import asyncio
import json
import stat
import uuid

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session as JupyterSession

from dspex_jupyter import PoolManager, PoolSpec, protocol
from dspex_jupyter.checkpoint import CheckpointDir, read_json_checked, write_json_atomic

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"


@pytest.fixture(scope="module")
def pool():
    with PoolManager([PoolSpec("sec", size=1)]) as manager:
        yield manager["sec"]


def test_no_pool_kernel_socket_listens_beyond_loopback(pool):
    kernel = psutil.Process(pool.kernel_pids[0])
    for process in [kernel, *kernel.children(recursive=True)]:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                assert conn.laddr.ip in ("127.0.0.1", "::1"), conn


def test_runtime_files_are_private(pool):
    worker = pool._workers[0]
    folder = worker._runtime_dir
    assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0
    for path in folder.rglob("*"):
        if path.is_file() or path.is_socket():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_a_message_with_a_wrong_signature_is_rejected(pool):
    """Signed with another key: the kernel ignores it; a good message still works."""
    worker = pool._workers[0]
    forger = JupyterSession(key=b"not-the-key", signature_scheme="hmac-sha256")
    request = protocol.make_request("call", {"func": {"ref": "os:_exit"}, "payload": None})

    async def send_forged() -> bool:
        future = asyncio.get_running_loop().create_future()
        worker._pending[request["id"]] = future
        msg = forger.msg("comm_msg", {"comm_id": worker._comm_id, "data": request})
        forger.send(worker._kc.shell_channel.socket, msg)
        done, _ = await asyncio.wait({future}, timeout=2.0)  # an answer would come in ms
        worker._pending.pop(request["id"], None)
        return bool(done)

    assert pool._runner.run(send_forged()) is False
    assert pool.call(f"{H}:square", 6) == 36  # still alive: os._exit never ran


def test_loading_a_checkpoint_never_runs_code(tmp_path):
    """A checkpoint that names code is data until a resume imports a DSPy module by path."""
    marker = tmp_path / "ran"
    folder = CheckpointDir(tmp_path / "run")
    folder.create()
    evil = {
        "__reduce__": ["os.system", [f"touch {marker}"]],
        "py/object": "os.system",
        "program": {"kind": "ref", "ref": "os:system"},
        "task_lm": {"class": "evil.module.LM", "state": {"model": "x"}},
    }
    write_json_atomic(folder.run_file, evil)
    write_json_atomic(folder.data_file, {"trainset": [], "valset": None})
    folder.write_snapshot({"phase": "search", "search": evil})
    assert read_json_checked(folder.run_file)["program"]["ref"] == "os:system"
    assert [row["ok"] for row in folder.listing()] == [True]
    assert not marker.exists()
    from dspex_jupyter.runtime import mipro

    with pytest.raises(mipro.CheckpointError, match="will not import"):
        mipro.build_lm(evil["task_lm"], trusted_only=True)
    with pytest.raises(mipro.CheckpointError, match=r"not a dspy\.Module"):
        mipro.build_program(evil["program"])
    # Read from a checkpoint, a reference is checked against the trusted modules first.
    with pytest.raises(mipro.ForbiddenReferenceError, match="'os', which is not a trusted"):
        mipro.build_program(evil["program"], allowed=("dspy", "dspex_jupyter.testing"))
    assert not marker.exists()


message_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
malformed = st.one_of(
    message_values,
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.one_of(st.just(protocol.PROTOCOL_VERSION), message_values),
            "id": st.one_of(st.text(min_size=1, max_size=8), message_values),
            "op": st.one_of(
                st.sampled_from(
                    sorted(
                        [
                            "call",
                            "map",
                            "warmup",
                            "hello",
                            "init_session",
                            "stream_open",
                            "stream_ack",
                            "nope",
                        ]
                    )
                ),
                message_values,
            ),
            "args": message_values,
            "session": message_values,
            "noreply": st.booleans(),
        },
    ),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=malformed, buffers=st.lists(st.binary(max_size=64), max_size=2))
def test_fuzzed_protocol_messages_never_kill_the_kernel(pool, data, buffers):
    worker = pool._workers[0]
    if isinstance(data, dict):
        data = {**data, "id": f"fuzz-{uuid.uuid4().hex}"}
        data.pop("noreply", None)  # a reply is what is checked
    expected_id = data["id"] if isinstance(data, dict) else ""

    async def send() -> dict:
        future = asyncio.get_running_loop().create_future()
        worker._pending[expected_id] = future
        worker._send("comm_msg", {"comm_id": worker._comm_id, "data": data}, buffers)
        reply, _ = await asyncio.wait_for(future, 10)
        return reply

    reply = pool._runner.run(send())
    assert reply["v"] == protocol.PROTOCOL_VERSION
    if not reply["ok"]:
        assert reply["error"]["kind"] in ("protocol", "unknown_op", "version", "remote")
        json.dumps(reply)
    assert worker.state != "dead"


def test_kernel_still_serves_after_the_fuzzing(pool):
    assert pool.call(f"{H}:square", 7) == 49
    assert pool.health()["deaths"] == 0
