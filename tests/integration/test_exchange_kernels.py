"""Data exchange with real pool kernels: every type there and back, big values through
the file tiers, nothing left behind, remote (no shared memory) mode, and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pytest

from dspex_jupyter import ExchangeConfig, PoolManager, PoolSpec
from dspex_jupyter.core.errors import KernelDied

pytestmark = pytest.mark.integration
X = "tests.integration.exchange_helpers"
H = "tests.integration.helpers"
SMALL = ExchangeConfig(inline_max=10_000, file_max=1_000_000)


@pytest.fixture(scope="module")
def manager():
    with PoolManager(
        [PoolSpec("xchg", size=1), PoolSpec("light", size=1), PoolSpec("pair", size=2)],
        exchange=SMALL,
    ) as m:
        yield m


@pytest.fixture(scope="module")
def remote():
    """Kernels treated as remote: no shared memory, every value in message buffers."""
    with PoolManager(
        [PoolSpec("remote", size=1)],
        exchange=ExchangeConfig(inline_max=10_000, shared_memory=False),
    ) as m:
        yield m


def leftovers(manager: PoolManager) -> list[str]:
    root = manager.exchange.root
    return [] if root is None else [str(p) for p in root.rglob("*") if p.is_file()]


def assert_same(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, pa.Table | pa.RecordBatch):
        assert got.equals(want, check_metadata=True)
    elif isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    elif isinstance(want, tuple | list) and want and not isinstance(want[0], dict):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict) and any(isinstance(v, np.ndarray) for v in want.values()):
        assert got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    else:
        assert got == want
        if want and isinstance(want, list) and hasattr(want[0], "_input_keys"):
            assert [e._input_keys for e in got] == [e._input_keys for e in want]


def _values() -> dict[str, Any]:
    import dspy

    rows = [{"question": f"q{i}", "answer": str(i), "context": "c" * (i % 50)} for i in range(3000)]
    frame = pd.DataFrame(
        {
            "i": np.arange(2000, dtype="int32"),
            "f": np.linspace(0, 1, 2000),
            "s": pd.array([f"s{i}" for i in range(2000)], dtype="str"),
            "cat": pd.Categorical(["a", "b"] * 1000),
            "o": np.array([f"o{i}" for i in range(2000)], dtype=object),
            "n": pd.array([None if i % 5 else i for i in range(2000)], dtype="Int64"),
        }
    )
    return {
        "json": {"a": [1, 2.5, None, True], "b": {"c": "d"}},
        "str_big": "é" * 20_000,
        "bytes_small": b"abc",
        "bytes_mmap": os.urandom(200_000),
        "bytes_arrow": os.urandom(2_000_000),
        "bytearray": bytearray(b"z" * 50_000),
        "array_small": np.arange(10, dtype=np.int16),
        "array_mmap": np.random.default_rng(0).normal(size=(300, 128)).astype(np.float32),
        "array_arrow": np.random.default_rng(1).normal(size=(2000, 128)),
        "array_datetime": np.arange(5000).astype("datetime64[s]"),
        "table": pa.Table.from_pylist(rows),
        "table_small": pa.table({"x": [1, 2, 3]}),
        "batch": pa.RecordBatch.from_pylist(rows[:500]),
        "dataframe": frame,
        "records_small": rows[:3],
        "records": rows,
        "examples": [dspy.Example(**r).with_inputs("question", "context") for r in rows[:800]],
        "examples_plain": [dspy.Example(**r) for r in rows[:5]],
        "mixed": (pa.table({"x": np.arange(5000)}), {"score": 0.5}),
        "embeddings": {"ids": list(range(10)), "emb": np.ones((4000, 16), dtype=np.float32)},
    }


VALUES = [
    "array_arrow",
    "array_datetime",
    "array_mmap",
    "array_small",
    "batch",
    "bytearray",
    "bytes_arrow",
    "bytes_mmap",
    "bytes_small",
    "dataframe",
    "embeddings",
    "examples",
    "examples_plain",
    "json",
    "mixed",
    "records",
    "records_small",
    "str_big",
    "table",
    "table_small",
]  # the names of _values(): the values are built when the tests run


@pytest.fixture(scope="module")
def values():
    made = _values()
    assert sorted(made) == VALUES
    return made


@pytest.mark.parametrize("name", VALUES)
def test_every_type_goes_to_a_session_kernel_and_back(manager, values, name):
    value = values[name]
    with manager.session("xchg") as session:
        assert_same(session.call(f"{X}:identity", value), value)
        args, kwargs = session.call(f"{X}:identity_all", value, 1, key=value)
        assert args[1] == 1
        assert_same(args[0], value)
        assert_same(kwargs["key"], value)
    assert leftovers(manager) == []


def test_objects_shared_between_arguments_stay_shared(manager):
    lm = {"model": "m", "seen": {1, 2}}  # a set: pickled, like an LM object would be
    with manager.session("xchg") as session:
        args, kwargs = session.call(f"{X}:identity_all", [lm], np.ones(50_000), metric=(lm,))
    assert args[0][0] is kwargs["metric"][0] and args[0][0] == lm
    assert_same(args[1], np.ones(50_000))


@pytest.mark.parametrize("name", ["table", "array_arrow", "examples", "dataframe", "mixed"])
def test_remote_kernels_get_message_buffers(remote, values, name):
    assert remote.exchange.root is None
    with remote.session("remote") as session:
        assert session.call(f"{X}:exchange_folder") is None
        assert_same(session.call(f"{X}:identity", values[name]), values[name])


def test_pool_call_and_map_use_the_tiers(manager, values):
    pool = manager["pair"]
    table = values["table"]
    assert_same(pool.call(f"{X}:identity", table), table)
    items = [table, values["array_arrow"], 3, values["records"]]
    out = pool.map(f"{X}:identity", items, chunksize=1)
    for got, want in zip(out, items, strict=True):
        assert_same(got, want)
    made = pool.map(f"{X}:make_table", [5, 50_000])
    assert made[1].num_rows == 50_000 and made[1].column("i")[49_999].as_py() == 49_999
    assert leftovers(manager) == []


def test_big_values_through_the_file_tiers_leave_nothing(manager):
    n = 50 * 1024 * 1024
    rng = np.random.default_rng(2)
    array = rng.normal(size=n // 8)
    text = "x" * 504  # 8 + 504 + 4 (offset) = 516 bytes a row
    table = pa.table({"id": np.arange(n // 512), "text": [text] * (n // 512)})
    assert table.nbytes >= n and array.nbytes == n
    with manager.session("xchg") as session:
        folder = session.call(f"{X}:exchange_folder")
        assert folder and Path(folder).is_relative_to(manager.exchange.root)
        assert stat_mode(Path(folder)) == 0o700
        assert session.call(f"{X}:describe_array", array) == {"owndata": False, "writeable": True}
        back = session.call(f"{X}:identity", array)
        assert not back.flags.owndata, "mapped from the kernel's Arrow file, not copied"
        assert_same(back, array)
        assert_same(session.call(f"{X}:identity", table), table)
        mid = array[: 500_000 // 8]  # raw memory-mapped tier
        assert session.call(f"{X}:describe_array", mid)["owndata"] is False
        assert os.listdir(folder) == []
    assert leftovers(manager) == []


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_plain_json_calls_never_import_heavy_libraries(manager):
    pool = manager["light"]
    heavy = ["pyarrow", "numpy", "pandas", "dspy"]
    assert pool.call(f"{X}:identity", {"a": [1, 2, 3]}) == {"a": [1, 2, 3]}
    assert pool.call(f"{X}:identity", "text " * 100_000) == "text " * 100_000
    assert pool.call(f"{X}:identity", b"b" * 5_000_000) == b"b" * 5_000_000
    assert pool.map(f"{H}:square", range(10)) == [x * x for x in range(10)]
    assert pool.call(f"{X}:loaded", heavy) == []


def test_kernel_killed_while_writing_a_reply(manager):
    pool = manager["xchg"]
    with manager.session("xchg") as session:
        folder = Path(session.call(f"{X}:exchange_folder"))
        with pytest.raises(KernelDied):
            session.call(f"{X}:write_then_die", 5_000_000)
    assert wait_until(lambda: not folder.exists()), "a dead kernel's folder is removed"
    assert pool.wait_ready(timeout=60)
    with manager.session("xchg") as session:
        assert_same(session.call(f"{X}:identity", b"y" * 50_000), b"y" * 50_000)
    assert leftovers(manager) == []


def test_kernel_killed_before_reading_a_request(manager, values):
    pool = manager["xchg"]
    session = manager.session("xchg")
    folder = Path(session._worker.exchange.folder or "")
    blocked = session._runner.submit(session._call(f"{H}:block_forever", (), {}))
    waiting = session._runner.submit(session._call(f"{X}:identity", (values["table"],), {}))
    assert wait_until(lambda: folder.is_dir() and len(os.listdir(folder)) == 1)
    session._worker.kill()
    for future in (blocked, waiting):
        with pytest.raises(KernelDied):
            future.result(timeout=30)
    assert wait_until(lambda: not folder.exists())
    session.release()
    assert pool.wait_ready(timeout=60)
    assert leftovers(manager) == []


HOST = """
import json, sys, time
from pathlib import Path
import pyarrow as pa
from dspex_jupyter import ExchangeConfig, PoolManager, PoolSpec

manager = PoolManager([PoolSpec("host", size=1)],
                      exchange=ExchangeConfig(folder=sys.argv[1], inline_max=1000))
manager.start()
with manager.session("host") as session:
    session.call("tests.integration.exchange_helpers:identity", pa.table({"a": list(range(5000))}))
    folder = Path(session.call("tests.integration.exchange_helpers:exchange_folder"))
(folder / ("0" * 32 + ".arrow")).write_bytes(b"in flight")  # a transfer cut short
print(json.dumps({"root": str(manager.exchange.root), "kernels": manager["host"].kernel_pids}))
sys.stdout.flush()
time.sleep(600)  # poll: the host waits here until the test SIGKILLs it
"""


def test_files_of_a_killed_host_are_removed_at_the_next_pool_start(tmp_path):
    parent = tmp_path / "exchange"
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, str(parent)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        line = host.stdout.readline() if host.stdout else ""
        assert line, "the host process failed to start its pool"
        info = json.loads(line)
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=30)
        if host.stdout:
            host.stdout.close()
    kernels = [psutil.Process(pid) for pid in info["kernels"] if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(kernels, timeout=20)  # kernels exit when their parent dies
    for proc in alive:
        proc.kill()
    root = Path(info["root"])
    assert any(p.is_file() for p in root.rglob("*")), "the killed host left its files"
    with PoolManager(exchange=ExchangeConfig(folder=str(parent))) as fresh:
        fresh.start(PoolSpec("next", size=1))
        assert not root.exists()
        assert fresh.exchange.root is not None and fresh.exchange.root.exists()
        own = fresh.exchange.root
    assert not own.exists() and list(parent.iterdir()) == []


def wait_until(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)  # poll: a condition with a deadline
    return check()


# ---- no silent data loss (issue #12): values a JSON message would change ----------------
EXACT = {
    "int_past_64_bits": 2**100,
    "negative_int_past_64_bits": -(2**70),
    "int64_edges": [2**63 - 1, -(2**63), 2**64 - 1],
    "nested_big_ints": {"n": [1, 2**64, {"deep": 10**30}]},
    "lone_surrogate": "a\ud800b",
    "surrogate_key": {"k\udfff": 1},
    "floats": [float("nan"), float("inf"), -0.0, 5e-324],
    "non_string_keys": {1: "a", (2, 3): "b", None: "c"},
    "set_tuple_decimal_complex": ({1, 2}, (1,), Decimal("1.10"), 1 + 2j),
    "big_int_table": [{"n": 2**70, "s": "x"}] * 150,
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_values_json_would_change_come_back_exactly_from_a_kernel(manager, remote, name):
    from tests.unit.test_value_fidelity import same

    value = EXACT[name]
    for pool in (manager["xchg"], remote["remote"]):  # shared folder, and buffers only
        assert same(pool.call(f"{X}:identity", value), value)
        args, kwargs = pool.call(f"{X}:identity_all", value, key=value)
        assert same(args[0], value) and same(kwargs["key"], value)
    assert leftovers(manager) == []


def test_a_result_that_cannot_come_back_is_a_named_serialization_error(manager):
    from dspex_jupyter import RemoteError, SerializationError

    with pytest.raises(SerializationError) as info:
        manager["xchg"].call("sqlite3:connect", ":memory:")
    assert isinstance(info.value, RemoteError)  # raised in the kernel, with its traceback
    assert "cannot pickle 'sqlite3.Connection' object): Connection <sqlite3" in str(info.value)
    assert info.value.hint.startswith("return data from the kernel")
    assert manager["xchg"].call(f"{X}:identity", 2**100) == 2**100  # the kernel still serves
