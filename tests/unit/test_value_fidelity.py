"""No silent data loss: any value comes back equal, type included, through every tier.

Values go through the same steps as between the notebook and a kernel, in process: the
exchange encoding (message inline, message buffers, memory-mapped files), then the message
itself packed and parsed by jupyter_client's own ``Session`` (with orjson when installed,
as in a real kernel), buffers arriving read-only as they do from ZeroMQ.
tests/integration/test_exchange_kernels.py sends a few of these through real kernels.
"""

from __future__ import annotations

import decimal
import math
import os
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session

from dspex_jupyter import exchange, protocol
from dspex_jupyter.core.errors import SerializationError
from dspex_jupyter.exchange import ExchangeConfig, Outgoing

FIDELITY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
WIRE = Session(key=b"fidelity")  # packs and parses exactly as a kernel's messages are


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fidelity")
    path.chmod(0o700)
    return path


@pytest.fixture(params=["inline", "buffers", "files"])
def config(request, folder) -> ExchangeConfig:
    """The tiers: everything inline, small thresholds so bytes and long strings take
    message buffers, and the same with a shared folder (memory-mapped files)."""
    if request.param == "inline":
        return ExchangeConfig()
    return ExchangeConfig(
        inline_max=32, file_max=256, folder=str(folder), shared_memory=request.param == "files"
    )


def over_the_wire(desc: dict[str, Any], buffers: list[Any]) -> tuple[Any, list[Any]]:
    """The descriptor as the other side parses it, and its buffers as ZeroMQ hands them."""
    parsed = WIRE.unpack(WIRE.pack({"value": desc}))["value"]
    return parsed, [memoryview(bytes(memoryview(b).cast("B"))) for b in buffers]


def send(value: Any, config: ExchangeConfig) -> Any:
    out = Outgoing(config)
    desc = out.encode(value)
    parsed, buffers = over_the_wire(desc, out.buffers)
    result = exchange.decode(parsed, buffers, config)
    if config.folder:
        assert os.listdir(config.folder) == [], "every exchange file was taken"
    return result


def send_as_call(args: tuple[Any, ...], kwargs: dict[str, Any], config: ExchangeConfig) -> Any:
    out = Outgoing(config)
    desc = out.encode_call(args, kwargs)
    parsed, buffers = over_the_wire(desc, out.buffers)
    decoded = exchange.decode(parsed, buffers, config)
    if isinstance(decoded, tuple):  # the "args" container: (args list, kwargs)
        return tuple(decoded[0]), decoded[1]
    return tuple(decoded[0]), decoded[1]  # plain: [args, kwargs] as one value


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down (nan equals nan, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)  # keeps the exponent: Decimal("1.0") is not Decimal("1.00")
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, set | frozenset):
        return sorted(map(repr, a)) == sorted(map(repr, b))
    return a == b


# ---- arbitrary values -------------------------------------------------------------------
lone_surrogates = st.sampled_from(["\ud800", "\udfff", "\udc80"])
texts = st.text(max_size=40) | st.builds(
    lambda head, odd, tail: head + odd + tail, st.text(max_size=5), lone_surrogates, st.text()
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # any size: small, 64-bit edges and far beyond
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**100, -(10**40)])
    | st.floats()  # nan, infinities, -0.0, subnormals
    | texts
    | st.binary(max_size=80)
    | st.binary(max_size=80).map(bytearray)
    | st.decimals()  # NaN, sNaN and infinities included
    | st.complex_numbers()
)
hashables = st.none() | st.booleans() | st.integers() | texts | st.binary(max_size=10)
keys = hashables | st.tuples(hashables, hashables) | st.frozensets(hashables, max_size=3)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(texts, children, max_size=5)
        | st.dictionaries(keys, children, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
    ),
    max_leaves=25,
)


@FIDELITY
@given(values)
def test_any_value_comes_back_equal_with_its_type(config, value):
    assert same(send(value, config), value)


@FIDELITY
@given(st.lists(values, max_size=4), st.dictionaries(st.text(max_size=8), values, max_size=3))
def test_any_call_arguments_come_back_equal(config, args, kwargs):
    got_args, got_kwargs = send_as_call(tuple(args), kwargs, config)
    assert same(got_args, tuple(args)) and same(got_kwargs, kwargs)


@pytest.mark.parametrize(
    "value",
    [
        2**100,
        -(2**100),
        [1, 2**64, {"n": 2**200}],
        {"big": 10**30, "small": 1},
        (2**70, "x"),
        {2**80: "key"},
        "lone \ud800 surrogate",
        {"key \udfff": 1},
        [[[[[[[[[[[[1]]]]]]]]]]]],
        {"key \ud800": b"bulky enough for its own tier" * 4},  # a split container's keys
        [{"key \ud800": 1}] * 150,  # a table's column names
        [{"n": 2**70}] * 150,  # a table's column
    ],
    ids=lambda v: type(v).__name__,
)
def test_values_a_json_message_would_change_come_back_equal(config, value):
    assert same(send(value, config), value)


def test_tables_with_integers_past_64_bits_come_back_equal(config):
    frame = pd.DataFrame({"n": pd.Series([2**70, 1] * 100, dtype=object)})
    frame.index = pd.Index([2**65 + i for i in range(200)], dtype=object)
    got = send(frame, config)
    assert got.equals(frame) and got["n"].dtype == object and type(got["n"].iloc[0]) is int
    assert list(got.index) == list(frame.index)


def test_a_value_that_cannot_travel_is_named():
    deep: list[Any] = []
    for _ in range(100_000):  # deeper than any pickler or JSON parser goes
        deep = [deep]
    with pytest.raises(SerializationError, match=r"recursion.*\): list \[\[\[\[\.\.\.\]"):
        Outgoing(ExchangeConfig()).encode(deep)
    db = {"config": {"ok": 1, "db": sqlite3.connect(":memory:")}}
    with pytest.raises(SerializationError) as info:
        Outgoing(ExchangeConfig()).encode(db)
    message = str(info.value)
    assert "(cannot pickle 'sqlite3.Connection' object): dict {'config': {" in message
    assert "the part that fails is ['config']['db']: Connection <sqlite3.Connectio" in message
    assert info.value.hint.startswith("send data")
    assert protocol.is_json_native([1, 2**63 - 1]) and not protocol.is_json_native([2**63])
