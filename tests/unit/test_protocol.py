"""The wire format and the kernel-side dispatcher, without a kernel."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspex_jupyter import protocol
from dspex_jupyter.runtime import OPS, handle_message

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # larger ones pickle (see below)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@settings(derandomize=True, database=None)
@given(json_values)
def test_json_values_travel_inline(value):
    buffers: list[bytes] = []
    desc = protocol.encode_value(value, buffers)
    assert desc["enc"] == "json" and buffers == []
    assert protocol.decode_value(desc, buffers) == value


@pytest.mark.parametrize(
    "value",
    [
        *[(1, 2), {1: "a"}, b"bytes", {"x": (1,)}, math.nan, {"s": {1, 2}}, [float("inf")]],
        # Integers past 64 bits: a message parser (orjson) would read them as floats.
        *[2**63, -(2**63) - 1, 2**100, [1, -(2**200)], {"big": 10**30}],
        # Lone surrogates: UTF-8 cannot encode them, so no JSON message can carry them.
        *["a\ud800b", {"k\udfff": 1}],
    ],
)
def test_non_json_values_round_trip_exactly(value):
    buffers: list[bytes] = []
    desc = protocol.encode_value(value, buffers)
    assert desc["enc"] == "pickle" and len(buffers) == 1
    out = protocol.decode_value(desc, buffers)
    if value is math.nan:
        assert math.isnan(out)
    else:
        assert out == value and type(out) is type(value)


def test_builtin_ops_are_registered():
    assert {
        "hello",
        "init_session",
        "release_session",
        "call",
        "map",
        "warmup",
        "health",
        "clear_gpu_cache",
    } <= set(OPS)


def test_dispatch_call_and_error():
    buffers: list[bytes] = []
    request = protocol.make_request(
        "call",
        {"func": {"ref": "math:sqrt"}, "payload": protocol.encode_value([[16], {}], buffers)},
    )
    reply, out = handle_message(request, buffers)
    assert reply["ok"] and protocol.decode_value(reply["result"], out) == 4.0
    request = protocol.make_request(
        "call", {"func": {"ref": "math:sqrt"}, "payload": protocol.encode_value([[-1], {}], [])}
    )
    reply, _ = handle_message(request, [])
    assert not reply["ok"] and reply["error"]["type"] == "ValueError"
    assert reply["error"]["kind"] == "remote" and reply["error"]["traceback"]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        json_values,
        st.dictionaries(st.sampled_from(["v", "id", "op", "args", "session"]), json_values),
    )
)
def test_dispatcher_never_raises_on_garbage(data):
    reply, _ = handle_message(data, [])
    assert reply["v"] == protocol.PROTOCOL_VERSION
    assert isinstance(reply["ok"], bool)


def test_session_state_outside_a_session_is_an_error():
    from dspex_jupyter.runtime import session_state

    with pytest.raises(RuntimeError, match="only available inside a call made by a session"):
        session_state()


def test_runtime_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, dspex_jupyter.runtime;"
        "heavy = [m for m in ('dspy','torch','pyarrow','numpy','jupyter_client','zmq',"
        "'cloudpickle','psutil') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _HoldsLocks:
    def __init__(self) -> None:
        self.inner = {"lock": threading.Lock(), "rlock": [threading.RLock()]}


def test_locks_at_any_depth_arrive_as_new_unlocked_locks():
    value = _HoldsLocks()
    value.inner["lock"].acquire()  # a held lock is this process's state: it does not travel
    buffers: list[bytes] = []
    back = protocol.decode_value(protocol.encode_value(value, buffers), buffers)
    lock, rlock = back.inner["lock"], back.inner["rlock"][0]
    assert type(lock) is type(threading.Lock()) and type(rlock) is type(threading.RLock())
    assert lock.acquire(blocking=False)  # new and free
    assert lock is not value.inner["lock"]
