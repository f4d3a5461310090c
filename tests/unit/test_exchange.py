"""Data exchange tiers, in process: every type round-trips exactly through every tier,
files are private and gone after reading, and bad descriptors or files are refused."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dspex_jupyter import exchange, protocol
from dspex_jupyter.core.exchange_dirs import ExchangeArea, sweep_stale
from dspex_jupyter.exchange import ExchangeConfig, ExchangeError, Outgoing
from dspex_jupyter.runtime import handle_message

SMALL = {"inline_max": 64, "file_max": 1024}  # tiny thresholds: every tier on small values
HYPO = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("exchange")
    path.chmod(0o700)
    return path


@pytest.fixture(params=["files", "message"])
def config(request, folder) -> ExchangeConfig:
    """Both modes: a shared folder, and a kernel without shared memory (buffers only)."""
    return ExchangeConfig(**SMALL, folder=str(folder), shared_memory=request.param == "files")


def round_trip(value, config):
    buffers: list = []
    files: list[str] = []
    desc = exchange.encode(value, buffers, config, files)
    json.dumps(desc)  # a descriptor is plain JSON: it travels in the message
    for path in files:  # files are private while they wait for the receiver
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    out = exchange.decode(desc, buffers, config)
    if config.folder:
        assert os.listdir(config.folder) == [], "the receiver removes what it read"
    return desc, out


def assert_same_array(a, b):
    assert type(b) is np.ndarray and b.dtype == a.dtype and b.shape == a.shape
    assert a.tobytes() == b.tobytes()
    assert b.flags.writeable


# ---- types, every tier, both modes -----------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # larger ones pickle (see below)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@HYPO
@given(json_values)
def test_json_values(config, value):
    desc, out = round_trip(value, config)
    assert out == value and desc["enc"] in ("json", "bytes")


@HYPO
@given(st.binary(max_size=3000), st.sampled_from([bytes, bytearray]))
def test_bytes_every_tier(config, data, kind):
    value = kind(data)
    desc, out = round_trip(value, config)
    assert type(out) is kind and out == value
    # bytes never take the Arrow tier: they are copied out on arrival anyway
    assert exchange.tier_of(desc) == ("mmap" if config.files and len(data) >= 64 else "message")


@HYPO
@given(st.text(max_size=600))
def test_long_strings_travel_as_bytes(config, text):
    desc, out = round_trip(text, config)
    assert out == text and type(out) is str
    assert desc["enc"] == ("bytes" if len(text) >= 64 else "json")


def test_strings_with_lone_surrogates(config):
    text = "a\ud800b" * 50
    assert round_trip(text, config)[1] == text


array_dtypes = (
    hnp.integer_dtypes(endianness="=")
    | hnp.unsigned_integer_dtypes()
    | hnp.floating_dtypes()
    | hnp.complex_number_dtypes()
    | hnp.boolean_dtypes()
    | hnp.datetime64_dtypes()
    | hnp.unicode_string_dtypes(max_len=4)
    | hnp.byte_string_dtypes(max_len=4)
    | hnp.integer_dtypes(endianness=">")
)


@HYPO
@given(hnp.arrays(array_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)))
def test_ndarrays_every_tier(config, arr):
    desc, out = round_trip(arr, config)
    assert desc["enc"] == "ndarray"
    assert_same_array(arr, out)


def test_non_contiguous_and_fortran_arrays(config):
    base = np.arange(600, dtype=np.float64).reshape(20, 30)
    for arr in (base[:, ::3], np.asfortranarray(base), base.T):
        assert_same_array(arr, round_trip(arr, config)[1])


def test_object_and_structured_arrays_pickle(config):
    for arr in (np.array([1, "x", None], dtype=object), np.zeros(3, dtype="i4,f8")):
        desc, out = round_trip(arr, config)
        assert desc["enc"] == "pickle" and out.dtype == arr.dtype and out.tolist() == arr.tolist()


scalar_columns = st.sampled_from(["int", "float", "str", "bool", "bytes", "list_str"])


def _column_values(kind: str) -> st.SearchStrategy:
    values = {
        "int": st.integers(-(2**63), 2**63 - 1),
        "float": st.floats(allow_nan=False),
        "str": st.text(max_size=30),
        "bool": st.booleans(),
        "bytes": st.binary(max_size=20),
        "list_str": st.lists(st.text(max_size=5), max_size=4),
    }[kind]
    return st.none() | values


@st.composite
def records(draw, min_rows: int = 1) -> list[dict]:
    """Lists of dicts with the same keys and one type per key (what Arrow keeps exactly)."""
    keys = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4, unique=True))
    kinds = {k: draw(scalar_columns) for k in keys}
    rows = draw(st.integers(min_rows, 40))
    return [{k: draw(_column_values(kinds[k])) for k in keys} for _ in range(rows)]


@HYPO
@given(records())
def test_lists_of_dicts(config, rows):
    _, out = round_trip(rows, config)
    assert out == rows
    assert [list(r) for r in out] == [list(r) for r in rows]
    for got, want in zip(out, rows, strict=True):
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}


@HYPO
@given(
    st.lists(
        st.dictionaries(st.text(max_size=3), st.integers() | st.floats() | st.binary()),
        min_size=1,
        max_size=10,
    )
)
def test_irregular_lists_of_dicts_still_exact(config, rows):
    """Mixed keys or types do not fit one Arrow schema: they pickle, still exact."""
    out = round_trip(rows, config)[1]
    assert repr(out) == repr(rows)


def test_large_list_of_dicts_uses_arrow(config):
    rows = [{"question": f"q{i}", "answer": str(i), "score": i / 7} for i in range(3000)]
    desc, out = round_trip(rows, config)
    assert desc["enc"] == "arrow" and desc["type"] == "records" and out == rows
    assert exchange.tier_of(desc) == ("arrow" if config.files else "message")


def test_list_of_dicts_beyond_int64_pickles(config):
    rows = [{"n": 2**70, "s": b"x"}]
    desc, out = round_trip(rows, config)
    assert desc["enc"] == "pickle" and out == rows


@HYPO
@given(records())
def test_arrow_tables(config, rows):
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"origin": "test"})
    desc, out = round_trip(table, config)
    assert desc["enc"] == "arrow" and type(out) is pa.Table
    assert out.equals(table, check_metadata=True)


def test_record_batches(config):
    batch = pa.RecordBatch.from_pydict({"a": list(range(50)), "b": ["x"] * 50})
    for value in (batch, batch.slice(0, 0)):
        out = round_trip(value, config)[1]
        assert type(out) is pa.RecordBatch and out.equals(value)


def _frames() -> list[pd.DataFrame]:
    n = 30
    return [
        pd.DataFrame(
            {"a": np.arange(n), "b": np.linspace(0, 1, n), "c": [f"s{i}" for i in range(n)]}
        ),
        pd.DataFrame(
            {
                "i32": np.arange(n, dtype="int32"),
                "u8": np.arange(n, dtype="uint8"),
                "f32": np.ones(n, dtype="float32"),
                "Int64": pd.array([None if i % 3 else i for i in range(n)], dtype="Int64"),
                "boolean": pd.array([None if i % 4 else True for i in range(n)], dtype="boolean"),
                "cat": pd.Categorical(["x", "y", "x"] * 10),
                "ts": pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC"),
                "td": pd.to_timedelta(np.arange(n), unit="s"),
                "str": pd.array([f"v{i}" for i in range(n)], dtype="str"),
                "obj_str": np.array([f"o{i}" for i in range(n)], dtype=object),
                "obj_bytes": np.array([b"b" * i for i in range(n)], dtype=object),
                "flag": np.arange(n) % 2 == 0,
            },
            index=pd.Index([f"r{i}" for i in range(n)], dtype=object, name="row"),
        ),
        pd.DataFrame({"v": [1.5, 2.5]}, index=pd.MultiIndex.from_arrays([[1, 2], [3, 4]])),
        pd.DataFrame({"x": [1, 2, 3]}, index=pd.RangeIndex(10, 13, name="r")),
        pd.DataFrame({"empty": pd.Series([], dtype="float64")}),
        # These do not fit Arrow exactly and pickle instead, still exact:
        pd.DataFrame({"mixed": pd.Series([1, "x", None], dtype=object)}),
        pd.DataFrame({1: [1, 2], "b": [3, 4]}),
        pd.DataFrame({"o": pd.Series(["a", None], dtype=object)}),
        pd.DataFrame({"lists": pd.Series([[1], [2, 3]], dtype=object)}),
    ]


@pytest.mark.parametrize("index", range(len(_frames())))
def test_dataframes_keep_dtypes(config, index):
    df = _frames()[index]
    desc, out = round_trip(df, config)
    pd.testing.assert_frame_equal(out, df, check_exact=True)
    assert list(out.dtypes) == list(df.dtypes)
    assert out.index.dtype == df.index.dtype
    if index < 5:
        assert desc["enc"] == "arrow" and desc["type"] == "dataframe"
    if len(out):
        out.iloc[0, 0] = out.iloc[-1, 0]  # writable after the trip


@HYPO
@given(st.data())
def test_generated_dataframes(config, data):
    rows = data.draw(records(min_rows=1))
    df = pd.DataFrame(rows)
    out = round_trip(df, config)[1]
    pd.testing.assert_frame_equal(out, df, check_exact=True)


@st.composite
def examples(draw):
    import dspy

    rows = draw(records())
    keys = list(rows[0])
    inputs = draw(st.none() | st.lists(st.sampled_from(keys), unique=True))
    out = [dspy.Example(row) for row in rows]
    return out if inputs is None else [ex.with_inputs(*inputs) for ex in out]


@HYPO
@given(examples())
def test_dspy_examples_keep_input_keys(config, exs):
    desc, out = round_trip(exs, config)
    assert desc["enc"] == "arrow" and desc["type"] == "examples"
    assert out == exs
    assert [ex._input_keys for ex in out] == [ex._input_keys for ex in exs]
    if exs[0]._input_keys is not None:
        assert out[0].inputs().keys() == exs[0].inputs().keys()


def test_examples_with_different_input_keys_pickle(config):
    import dspy

    exs = [dspy.Example(q="a", a="b").with_inputs("q"), dspy.Example(q="c", a="d")]
    desc, out = round_trip(exs, config)
    assert desc["enc"] == "pickle" and out == exs and out[1]._input_keys is None


def test_small_containers_of_big_values_split(config):
    table = pa.table({"x": list(range(500))})
    value = (table, {"emb": np.ones((40, 8)), "score": 0.5, "name": "run"}, [b"z" * 300])
    desc, out = round_trip(value, config)
    assert desc["enc"] == "seq" and desc["type"] == "tuple"
    assert type(out) is tuple and out[0].equals(table)
    assert out[1]["score"] == 0.5 and list(out[1]) == ["emb", "score", "name"]
    assert out[2] == [b"z" * 300]
    assert_same_array(value[1]["emb"], out[1]["emb"])


def test_call_arguments_bulky_ones_in_their_tier(config):
    buffers: list = []
    table = pa.table({"x": list(range(500))})
    kwargs = {"k": "v", "arr": np.zeros(100), "s": {1}}
    desc = exchange.encode_call((1, table), kwargs, buffers, config)
    assert desc["enc"] == "args" and desc["bulky"]["1"]["enc"] == "arrow"
    assert desc["bulky"]["3"]["enc"] == "ndarray" and desc["rest"]["enc"] == "pickle"
    args, kw = exchange.decode(desc, buffers, config)
    assert args[0] == 1 and args[1].equals(table)
    assert list(kw) == ["k", "arr", "s"] and kw["k"] == "v" and kw["s"] == {1}
    json_only = exchange.encode_call((1, "a"), {"b": [2]}, [], config)
    assert json_only == {"enc": "json", "value": [[1, "a"], {"b": [2]}]}


def test_objects_shared_between_arguments_arrive_once(config):
    """A program and a metric sharing one LM: one LM in the kernel, as with one pickle."""
    lm = {"model": {"name": "x"}, "history": [1]}
    program, metric = [lm, "program"], (lm, "metric")
    for extra in ((), (np.ones(100),)):  # with and without a bulky argument beside them
        buffers: list = []
        desc = exchange.encode_call((program, *extra), {"metric": metric}, buffers, config)
        args, kwargs = exchange.decode(desc, buffers, config)
        assert args[0][0] is kwargs["metric"][0]
        value = exchange.decode(
            exchange.encode([program, metric, *extra], buffers, config), buffers, config
        )
        assert value[0][0] is value[1][0]


def test_pickle_never_written_to_disk(folder):
    config = ExchangeConfig(inline_max=0, file_max=0, folder=str(folder))
    buffers: list = []
    files: list[str] = []
    value = {"set": set(range(100_000))}
    desc = exchange.encode(value, buffers, config, files)
    assert desc["enc"] == "pickle" and files == []


# ---- zero copy ---------------------------------------------------------------------------
def test_file_tiers_are_zero_copy(folder):
    config = ExchangeConfig(inline_max=1000, file_max=2_000_000, folder=str(folder))
    table = pa.table({"x": np.arange(1_000_000), "s": ["abc"] * 1_000_000})
    buffers: list = []
    desc = exchange.encode(table, buffers, config)
    before = pa.total_allocated_bytes()
    out = exchange.decode(desc, buffers, config)
    assert pa.total_allocated_bytes() - before < 1_000_000, "mapped, not copied"
    assert out.equals(table)
    for arr in (np.arange(100_000.0), np.arange(1_000_000.0)):  # raw file, Arrow file
        out = exchange.decode(exchange.encode(arr, buffers, config), buffers, config)
        assert not out.flags.owndata and out.flags.writeable
        out[0] = 42.0  # copy-on-write: the sender's data is not touched
        assert arr[0] == 0.0
        assert_same_array(arr[1:], out[1:])
    assert os.listdir(folder) == []


# ---- clean-up and safety ---------------------------------------------------------------
def _file_desc(folder: Path, value=b"x" * 5000) -> tuple[dict, list]:
    config = ExchangeConfig(**SMALL, folder=str(folder))
    buffers: list = []
    desc = exchange.encode(value, buffers, config)
    assert "file" in desc
    return desc, buffers


def test_missing_file_is_a_clear_error(folder):
    config = ExchangeConfig(**SMALL, folder=str(folder))
    desc, buffers = _file_desc(folder)
    exchange.decode(desc, buffers, config)
    with pytest.raises(ExchangeError, match="is missing"):
        exchange.decode(desc, buffers, config)


@pytest.mark.parametrize(
    "name",
    ["../secret.raw", "/etc/passwd", "a" * 32 + ".pkl", "../" + "a" * 32 + ".raw", "", 5, None],
)
def test_paths_outside_the_folder_are_refused(folder, name):
    config = ExchangeConfig(**SMALL, folder=str(folder))
    desc = {"enc": "bytes", "type": "bytes", "nbytes": 3, "file": name}
    with pytest.raises(ExchangeError, match="refusing exchange file"):
        exchange.decode(desc, [], config)


def test_links_and_open_files_are_refused(folder, tmp_path):
    config = ExchangeConfig(**SMALL, folder=str(folder))
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    link = folder / ("b" * 32 + ".raw")
    link.symlink_to(target)
    with pytest.raises(ExchangeError, match="cannot open"):
        exchange.decode(
            {"enc": "bytes", "type": "bytes", "nbytes": 6, "file": link.name}, [], config
        )
    assert not link.exists() and target.exists()
    desc, buffers = _file_desc(folder)
    (folder / desc["file"]).chmod(0o644)
    with pytest.raises(ExchangeError, match="readable by other users"):
        exchange.decode(desc, buffers, config)
    assert os.listdir(folder) == []


def test_files_need_a_shared_folder(folder):
    desc, buffers = _file_desc(folder)
    with pytest.raises(ExchangeError, match="no shared exchange folder"):
        exchange.decode(desc, buffers, ExchangeConfig(shared_memory=False, folder=str(folder)))
    exchange.discard(desc, ExchangeConfig(**SMALL, folder=str(folder)))  # the sender's part
    assert os.listdir(folder) == []


@pytest.mark.parametrize(
    ("value", "damage", "message"),
    [
        (b"x" * 500, lambda b: b[: len(b) - 10], "wrong size"),
        (b"x" * 500, lambda b: b"NOTDSPEX" + b[8:], "not a dspex raw file"),
        (b"x" * 500, lambda b: b.replace(b'"bytes"', b'"bytez"', 1), "does not hold"),
        (np.arange(40.0), lambda b: b[:-8], "wrong size"),
        (b"x" * 5000, lambda b: b[:100], "corrupt"),
        (np.arange(1000.0), lambda b: b[:100], "corrupt"),  # an array in an Arrow file
        (np.arange(1000.0), lambda b: b.replace(b"<f8", b"<i8"), "does not hold"),
        (pa.table({"a": list(range(500))}), lambda b: b[:200] + b"\0" * (len(b) - 200), "Arrow"),
        (pa.table({"a": list(range(500))}), lambda b: b"", "empty"),
    ],
)
def test_corrupt_files_are_clear_errors(folder, value, damage, message):
    config = ExchangeConfig(**SMALL, folder=str(folder))
    buffers: list = []
    desc = exchange.encode(value, buffers, config)
    path = folder / desc["file"]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ExchangeError, match=message):
        exchange.decode(desc, buffers, config)
    assert os.listdir(folder) == []


@pytest.mark.parametrize(
    ("desc", "message"),
    [
        ({"enc": "ndarray", "dtype": "|O", "shape": [1], "nbytes": 8, "buf": 0}, "objects"),
        ({"enc": "ndarray", "dtype": "<f8", "shape": [2], "nbytes": 8, "buf": 0}, "needs 16"),
        ({"enc": "ndarray", "dtype": "nope", "shape": [1], "nbytes": 8, "buf": 0}, "bad dtype"),
        ({"enc": "ndarray", "dtype": "<f8", "shape": [-1], "nbytes": 8, "buf": 0}, "bad shape"),
        ({"enc": "bytes", "type": "list", "nbytes": 8, "buf": 0}, "unknown type"),
        ({"enc": "bytes", "type": "bytes", "nbytes": 9, "buf": 0}, "holds 8 bytes"),
        ({"enc": "bytes", "type": "bytes", "nbytes": 8, "buf": 3}, "missing buffer"),
        ({"enc": "arrow", "type": "table", "buf": 0}, "not a valid Arrow"),
        ({"enc": "arrow", "type": "module", "buf": 0}, "unknown type"),
        ({"enc": "seq", "type": "set", "n": 0}, "'seq' descriptor"),
        ({"enc": "seq", "type": "list", "n": 1}, "count 'n' and 'bulky'"),
        (
            {
                "enc": "seq",
                "type": "list",
                "n": 2,
                "bulky": {},
                "rest": {"enc": "json", "value": [1]},
            },
            "do not add up",
        ),
        ({"enc": "args", "n": 0, "bulky": {}, "rest": {"enc": "json", "value": []}}, "'nargs'"),
        (
            {"enc": "dict", "keys": [], "n": 1, "bulky": {}, "rest": {"enc": "json", "value": [1]}},
            "one key",
        ),
    ],
)
def test_bad_descriptors_are_clear_errors(desc, message):
    with pytest.raises(ExchangeError, match=message):
        exchange.decode(desc, [b"12345678"])


def test_unknown_encoding_is_a_protocol_error():
    with pytest.raises(protocol.ProtocolError, match="unknown value encoding"):
        exchange.decode({"enc": "yaml"}, [])
    with pytest.raises(protocol.ProtocolError, match="must be an object"):
        exchange.decode(None, [])


def test_deep_nesting_is_refused():
    desc: dict = {"enc": "bytes", "type": "bytes", "nbytes": 0, "buf": 0}
    for _ in range(20):
        empty = {"enc": "json", "value": []}
        desc = {"enc": "seq", "type": "list", "n": 1, "bulky": {"0": desc}, "rest": empty}
    with pytest.raises(ExchangeError, match="nest deeper"):
        exchange.decode(desc, [])


def test_failed_encoding_leaves_no_files(folder):
    out = Outgoing(ExchangeConfig(**SMALL, folder=str(folder)))
    with pytest.raises(TypeError):
        out.encode([b"x" * 5000, sqlite3.connect(":memory:")])  # the bytes went to a file first
    assert os.listdir(folder) == [] and out.files == []


def test_sender_discards_what_was_not_read(folder):
    out = Outgoing(ExchangeConfig(**SMALL, folder=str(folder)))
    desc = out.encode_call((b"x" * 500, np.zeros(1000)), {})
    assert len(os.listdir(folder)) == 2 and exchange.tier_of(desc) == "arrow"
    out.discard()
    assert os.listdir(folder) == []
    desc = exchange.encode(pa.table({"a": list(range(100))}), [], out.config)
    exchange.discard(desc, out.config)
    assert os.listdir(folder) == []


def test_full_folder_falls_back_to_the_message(tmp_path):
    missing = tmp_path / "gone"  # a folder that disappeared behaves like a full one
    config = ExchangeConfig(**SMALL, folder=str(missing))
    buffers: list = []
    desc = exchange.encode(b"y" * 5000, buffers, config)
    assert "buf" in desc and exchange.decode(desc, buffers, config) == b"y" * 5000


def test_no_room_in_the_folder_falls_back_to_the_message(folder, monkeypatch):
    monkeypatch.setattr(exchange, "_has_room", lambda folder, size: False)
    config = ExchangeConfig(**SMALL, folder=str(folder))
    for value in (b"y" * 5000, np.zeros(1000), pa.table({"a": list(range(500))})):
        buffers: list = []
        desc = exchange.encode(value, buffers, config)
        assert "buf" in desc
        assert type(exchange.decode(desc, buffers, config)) is type(value)
    assert os.listdir(folder) == []


def test_config_is_validated():
    with pytest.raises(ValueError, match="file_max"):
        ExchangeConfig(inline_max=10, file_max=5)
    with pytest.raises(ValueError, match=">= 0"):
        ExchangeConfig(inline_max=-1)
    with pytest.raises(TypeError, match="int"):
        ExchangeConfig(inline_max=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="True or False"):
        ExchangeConfig(shared_memory="yes")  # type: ignore[arg-type]
    assert ExchangeConfig(folder=Path("/x")).folder == "/x"


# ---- folders: the manager's area, the kernel's configuration, stale clean-up -----------
def test_area_folders_are_private(tmp_path):
    area = ExchangeArea(ExchangeConfig(folder=str(tmp_path / "parent")))
    try:
        assert area.root is not None
        kernel = area.kernel_folder("pool", 3)
        assert kernel is not None
        for path in (area.root, kernel.parent, kernel):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700
        area.remove_pool("pool")
        assert not kernel.parent.exists()
    finally:
        area.close()
    assert not area.root.exists()
    assert ExchangeArea(ExchangeConfig(shared_memory=False)).root is None


def test_stale_folders_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    stale = tmp_path / f"{int(dead.stdout)}-12345-0123abcd"
    reused = tmp_path / f"{os.getpid()}-1-0123abcd"  # our pid, another start time
    unrelated = tmp_path / "keep-me"
    for path in (stale, reused, unrelated):
        path.mkdir()
        (path / "leftover.arrow").write_bytes(b"x")
    area = ExchangeArea(ExchangeConfig(folder=str(tmp_path)))
    try:
        assert not stale.exists() and not reused.exists() and unrelated.exists()
        assert area.root is not None and area.root.exists()
        assert sweep_stale(tmp_path) == []  # a live manager's folder stays
    finally:
        area.close()


def test_kernel_configuration_checks_the_folder(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o755)

    def configure(folder, **extra):
        args = {"folder": folder, "inline_max": 10, "file_max": 20, **extra}
        reply, _ = handle_message(protocol.make_request("configure_exchange", args), [])
        assert reply["ok"], reply
        return reply["result"]

    from dspex_jupyter.runtime.exchange_ops import kernel_config

    try:
        assert configure(str(private))["shared_memory"] is True
        assert kernel_config().folder == str(private) and kernel_config().inline_max == 10
        result = configure(str(public))
        assert result["shared_memory"] is False and "open to other users" in result["problem"]
        assert configure(str(tmp_path / "elsewhere"))["shared_memory"] is False
        assert configure(str(private), shared_memory=False)["shared_memory"] is False
        assert kernel_config().folder is None
    finally:
        configure(None)


def test_exchange_import_is_light():
    code = (
        "import sys, dspex_jupyter.exchange;"
        "print([m for m in ('numpy','pyarrow','pandas','dspy','cloudpickle') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
