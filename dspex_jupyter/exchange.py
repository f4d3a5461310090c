"""Data exchange between the notebook and pool kernels, in three tiers.

Trainsets, evaluation results and embeddings are too big for JSON in a message and too
valuable to lose, so every value sent to or from a kernel is described by a small JSON
*descriptor* and travels in the cheapest tier that fits it:

=========  ===================================================  ===========================
tier       when                                                 how
=========  ===================================================  ===========================
message    JSON-like values; anything under ``inline_max``      the descriptor itself
           (default 1 MB); everything when the other side       (``json``), or a binary
           does not share this machine's memory                 buffer of the same message
mmap       arrays from ``inline_max`` up to ``file_max``        a raw file (JSON header +
           (default 100 MB); bytes and long strings past        bytes) in the private
           ``inline_max`` (they are copied out on arrival, so   folder, memory-mapped
           Arrow would only import pyarrow for nothing)
arrow      tables of any size past ``inline_max`` (pyarrow       an Arrow IPC *file* in the
           Tables, DataFrames, lists of dicts, lists of          folder, memory-mapped:
           ``dspy.Example``), and arrays past ``file_max``       zero-copy (a self-describing
                                                                file: dtype and shape in
                                                                its schema metadata)
=========  ===================================================  ===========================

Without pyarrow on both sides, large arrays use the raw file and tables are pickled.

Descriptors (``enc``): ``json`` (the value inline), ``pickle`` (a message buffer, for any
other Python object: never written to disk), ``ndarray`` and ``bytes`` (``buf`` or
``file``; bytes covers ``bytes``, ``bytearray`` and long ``str``), ``arrow`` (an Arrow IPC
stream in ``buf`` or an Arrow IPC file in ``file``, with ``type`` saying which Python type
to rebuild: ``table``, ``record_batch``, ``dataframe``, ``records`` or ``examples``), and
the containers ``args`` (a call's arguments), ``seq`` and ``dict`` (a small list, tuple or
dict holding big values): each *bulky* value (table, array, long bytes) in its own tier,
all the others together as one JSON or pickle value, so objects they share (a program
and a metric using the same LM) still arrive once, as with a single pickle.

Files are created 0600 (``O_EXCL``) in a 0700 folder that only the two sides know, named
by uuid; the receiver opens them by bare name only inside its own folder, checks owner
and mode, maps them and unlinks them at once (the mapping stays valid), so nothing is
left after a round trip. The sender removes, after the reply, anything its receiver did
not take (``Outgoing.discard``). Nothing written to disk is pickle: Arrow IPC, or raw
array bytes behind a JSON header.

Values whose exact type would not survive Arrow (object columns holding mixed values,
ints beyond int64, dict-valued cells, ...) fall back to ``pickle``, so a round trip is
always exact. Only the standard library is imported here; numpy, pyarrow, pandas and dspy
are imported when a value of theirs is sent or received.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import mmap
import os
import re
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import protocol
from .core.errors import DspexError

INLINE_MAX = 1_000_000
FILE_MAX = 100_000_000
# A list, tuple or dict this small holding a big value is encoded element by element.
CONTAINER_MAX = 64
# Lists of dicts or Examples this long are tables, given their own tier beside others.
BULKY_ROWS = 100
MAX_DEPTH = 8
FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(raw|arrow)$")
RAW_MAGIC = b"DSPEXRAW"
_ALIGN = 64
_ARROW_META = b"dspex"
_RAW_TYPES = {"bytes": bytes, "bytearray": bytearray, "str": str}
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class ExchangeError(DspexError, ValueError):
    """A value could not be exchanged: a malformed descriptor, or an exchange file that
    is missing, outside the exchange folder, unsafe or corrupt."""

    hint = (
        "send the value again; if it keeps failing, check the exchange folder (its owner, "
        "mode 0700 and free space) or pass ExchangeConfig(shared_memory=False)"
    )


@dataclass(frozen=True)
class ExchangeConfig:
    """How values travel between the notebook and one kernel.

    ``inline_max``: values smaller than this (bytes) travel in the message.
    ``file_max``: arrays smaller than this use a raw memory-mapped file, larger ones an
    Arrow IPC file. Tables past ``inline_max`` always use an Arrow IPC file; bytes and
    long strings always a raw file.
    ``folder``: where exchange files live. Given to ``PoolManager``, it is the parent
    folder under which the manager makes its private one (default ``/dev/shm``).
    ``shared_memory``: False for a kernel on another machine: everything travels in
    message buffers. ``arrow``: False when one side has no pyarrow (tables then pickle).
    """

    inline_max: int = INLINE_MAX
    file_max: int = FILE_MAX
    folder: str | None = None
    shared_memory: bool = True
    arrow: bool = True

    def __post_init__(self) -> None:
        for name in ("inline_max", "file_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ExchangeConfig.{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"ExchangeConfig.{name} must be >= 0, got {value}")
        if self.file_max < self.inline_max:
            raise ValueError(
                f"ExchangeConfig.file_max ({self.file_max}) must be >= inline_max "
                f"({self.inline_max})"
            )
        if self.folder is not None:
            if not isinstance(self.folder, str | os.PathLike):
                raise TypeError(f"ExchangeConfig.folder must be a path, got {self.folder!r}")
            object.__setattr__(self, "folder", os.fspath(self.folder))
        for name in ("shared_memory", "arrow"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ExchangeConfig.{name} must be True or False")

    @property
    def files(self) -> bool:
        """Whether values may travel as files (shared memory and a folder)."""
        return self.shared_memory and self.folder is not None


# Message tiers only: what a side uses until it is told of a folder.
MESSAGE_ONLY = ExchangeConfig()


def have_module(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it."""
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def private_folder_problem(folder: str) -> str | None:
    """Why ``folder`` may not hold exchange files (None when it may): it must be a real
    folder (not a link) owned by this user and closed to everyone else."""
    try:
        info = os.lstat(folder)
    except OSError as exc:
        return f"cannot see {folder}: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a folder"
    if info.st_uid != os.getuid():
        return f"{folder} belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
    if info.st_mode & 0o077:
        return f"{folder} is open to other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


# ---- detecting types without importing their libraries -------------------------------
def _module_of(name: str) -> Any:
    return sys.modules.get(name)


def kind_of(value: Any) -> str | None:
    """The exchange kind of ``value`` (None: JSON or pickle). Libraries are looked up in
    ``sys.modules``: a value of a library can only exist once that library is loaded."""
    cls = type(value)
    if cls is bytes or cls is bytearray:
        return "bytes"
    if cls is str:
        return "str"
    module = cls.__module__
    if module == "numpy" and cls.__name__ == "ndarray":
        np = _module_of("numpy")
        return "ndarray" if np is not None and cls is np.ndarray else None
    if module.startswith("pyarrow"):
        pa = _module_of("pyarrow")
        if pa is not None and cls is pa.Table:
            return "table"
        if pa is not None and cls is pa.RecordBatch:
            return "record_batch"
        return None
    if module.startswith("pandas") and cls.__name__ == "DataFrame":
        pd = _module_of("pandas")
        return "dataframe" if pd is not None and cls is pd.DataFrame else None
    if cls is list and value:
        first = type(value[0])
        if first is dict:
            return "records"
        if first.__name__ == "Example" and first.__module__.startswith("dspy"):
            return "examples"
    return None


def _bulky(value: Any, config: ExchangeConfig) -> bool:
    """Whether ``value`` deserves its own tier when it sits in a small container."""
    kind = kind_of(value)
    if kind in ("bytes", "str"):
        return len(value) >= config.inline_max
    if kind in ("records", "examples"):
        return len(value) >= BULKY_ROWS
    return kind is not None


# ---- encoding --------------------------------------------------------------------------
def encode(
    value: Any,
    buffers: list[Any],
    config: ExchangeConfig | None = None,
    files: list[str] | None = None,
    _depth: int = 0,
) -> dict[str, Any]:
    """Describe ``value`` for a message; buffers go to ``buffers``, and the paths of files
    written for it to ``files`` (so the sender can remove what is never read)."""
    config = config or MESSAGE_ONLY
    kind = kind_of(value)
    if kind == "str" and len(value) >= config.inline_max:
        data = value.encode("utf-8", "surrogatepass")
        return _encode_raw({"enc": "bytes", "type": "str"}, data, buffers, config, files)
    if (kind is None or kind in ("str", "records")) and protocol.is_json_native(value):
        return {"enc": "json", "value": value}
    desc: dict[str, Any] | None = None
    if kind == "bytes":
        header = {"enc": "bytes", "type": type(value).__name__}
        desc = _encode_raw(header, value, buffers, config, files)
    elif kind == "ndarray":
        desc = _encode_ndarray(value, buffers, config, files)
    elif kind is not None and kind != "str" and config.arrow and have_module("pyarrow"):
        desc = _encode_tabular(kind, value, buffers, config, files)
    if desc is not None:
        return desc
    if _depth < MAX_DEPTH and _splittable(value, config):
        if type(value) is dict:
            split = _encode_split(list(value.values()), buffers, config, files, _depth)
            return {"enc": "dict", "keys": list(value), **split}
        split = _encode_split(list(value), buffers, config, files, _depth)
        return {"enc": "seq", "type": type(value).__name__, **split}
    return _encode_pickle(value, buffers)


def _encode_plain(value: Any, buffers: list[Any]) -> dict[str, Any]:
    """JSON when it is, else one pickle: references shared inside survive."""
    if protocol.is_json_native(value):
        return {"enc": "json", "value": value}
    return _encode_pickle(value, buffers)


def _encode_split(
    values: list[Any],
    buffers: list[Any],
    config: ExchangeConfig,
    files: list[str] | None,
    depth: int = 0,
) -> dict[str, Any]:
    """Bulky values (tables, arrays, long bytes) each in their own tier; all the others
    together as ONE value, so an object two of them share (a program and a metric using
    the same LM) arrives once, as it would in a single pickle."""
    bulky = {
        str(i): encode(v, buffers, config, files, depth + 1)
        for i, v in enumerate(values)
        if _bulky(v, config)
    }
    rest = [v for i, v in enumerate(values) if str(i) not in bulky]
    return {"n": len(values), "bulky": bulky, "rest": _encode_plain(rest, buffers)}


def _splittable(value: Any, config: ExchangeConfig) -> bool:
    cls = type(value)
    if cls is dict:
        return (
            0 < len(value) <= CONTAINER_MAX
            and all(type(k) is str and protocol.is_json_native(k) for k in value)
            and any(_bulky(v, config) for v in value.values())
        )
    if cls is list or cls is tuple:
        return 0 < len(value) <= CONTAINER_MAX and any(_bulky(v, config) for v in value)
    return False


def _encode_pickle(value: Any, buffers: list[Any]) -> dict[str, Any]:
    """Any other object: pickled into a message buffer (in memory only, never on disk).

    cloudpickle ships notebook-defined functions and classes by value: trusted code of
    the same user, the same contract as ipyparallel's."""
    from .protocol import pickle_value

    buffers.append(pickle_value(value))
    return {"enc": "pickle", "buf": len(buffers) - 1}


def encode_call(
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
    buffers: list[Any],
    config: ExchangeConfig | None = None,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """A call's arguments: bulky ones (a table, an array) each in their own tier, the
    others together, as ``[args, kwargs]`` was before tiers (JSON, or one pickle)."""
    config = config or MESSAGE_ONLY
    values = [*args, *kwargs.values()]
    try:
        if not any(_bulky(v, config) for v in values):
            return _encode_plain([list(args), dict(kwargs)], buffers)
        split = _encode_split(values, buffers, config, files)
    except protocol.SerializationError as exc:
        named = _argument_error(args, kwargs)
        if named is None:
            raise
        raise named from exc
    return {"enc": "args", "nargs": len(args), "keys": list(kwargs), **split}


def _argument_error(
    args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
) -> protocol.SerializationError | None:
    """The error of the first argument that cannot be sent, named as the caller wrote it."""
    named = [(f"argument {i + 1}", v) for i, v in enumerate(args)]
    named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        try:
            protocol.pickle_value(value)
        except protocol.SerializationError as exc:
            return protocol.SerializationError(f"{name} of the call: {exc.args[0]}")
    return None


def encode_items(
    values: list[Any],
    buffers: list[Any],
    config: ExchangeConfig | None = None,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """A list of items (a ``map`` chunk): bulky ones each in their own tier."""
    config = config or MESSAGE_ONLY
    if not any(_bulky(v, config) for v in values):
        return _encode_plain(list(values), buffers)
    return {"enc": "seq", "type": "list", **_encode_split(list(values), buffers, config, files)}


def _has_room(folder: str | None, size: int) -> bool:
    """Whether ``folder`` has room for ``size`` bytes (a container's /dev/shm is often
    64 MB): if not, the value travels in the message rather than half-written."""
    try:
        info = os.statvfs(folder or ".")
    except OSError:
        return False
    return info.f_bavail * info.f_frsize > size + (1 << 20)


def _new_file(folder: str, suffix: str) -> tuple[str, str, int]:
    """Create a fresh 0600 file (``O_EXCL``: never an existing file or a link)."""
    name = uuid.uuid4().hex + suffix
    path = os.path.join(folder, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    return name, path, os.open(path, flags, 0o600)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _raw_prefix(header: dict[str, Any]) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    prefix = RAW_MAGIC + len(head).to_bytes(4, "little") + head
    return prefix + b"\0" * (-len(prefix) % _ALIGN)


def _raw_header(desc: dict[str, Any]) -> dict[str, Any]:
    """What a raw file's header (or an Arrow file's metadata) must repeat of ``desc``."""
    keys = ("type",) if desc["enc"] == "bytes" else ("dtype", "shape")
    return {k: desc.get(k) for k in ("enc", *keys, "nbytes")}


def _encode_raw(
    desc: dict[str, Any],
    data: Any,
    buffers: list[Any],
    config: ExchangeConfig,
    files: list[str] | None,
) -> dict[str, Any]:
    """Bytes-like ``data`` in a buffer, a raw file or an Arrow file, by size."""
    size = memoryview(data).nbytes
    desc["nbytes"] = size
    if config.files and size >= config.inline_max and _has_room(config.folder, size):
        assert config.folder is not None
        try:
            # Only arrays take the Arrow tier: bytes and str are copied out on arrival
            # anyway, and a kernel should not import pyarrow for them.
            arrow = desc["enc"] == "ndarray" and config.arrow and have_module("pyarrow")
            if size >= config.file_max and arrow:
                name, path = _write_arrow_raw(config.folder, _raw_header(desc), data)
            else:
                name, path = _write_raw(config.folder, _raw_header(desc), data)
        except OSError:
            pass  # the folder is full or gone: the message can still carry it
        else:
            if files is not None:
                files.append(path)
            return {**desc, "file": name}
    buffers.append(data)
    return {**desc, "buf": len(buffers) - 1}


def _write_raw(folder: str, header: dict[str, Any], data: Any) -> tuple[str, str]:
    name, path, fd = _new_file(folder, ".raw")
    try:
        with open(fd, "wb") as out:
            out.write(_raw_prefix(header))
            out.write(data)
    except BaseException:
        _unlink(path)
        raise
    return name, path


def _write_arrow_raw(folder: str, header: dict[str, Any], data: Any) -> tuple[str, str]:
    """A large array as an Arrow IPC file: one uint8 column of its bytes, dtype and shape
    in the schema's metadata, so the receiver maps it zero-copy like any Arrow file."""
    import pyarrow as pa

    buf = pa.py_buffer(data)
    column = pa.Array.from_buffers(pa.uint8(), buf.size, [None, buf])
    schema = pa.schema(
        [pa.field("data", pa.uint8(), nullable=False)],
        metadata={_ARROW_META: json.dumps(header, sort_keys=True)},
    )
    return _write_arrow_file(folder, pa.Table.from_arrays([column], schema=schema))


def _write_arrow_file(folder: str, table: Any) -> tuple[str, str]:
    import pyarrow as pa

    name, path, fd = _new_file(folder, ".arrow")
    os.close(fd)  # created 0600 and private; Arrow reopens it for its fast writer
    try:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    except BaseException:
        _unlink(path)
        raise
    return name, path


def _encode_ndarray(
    arr: Any, buffers: list[Any], config: ExchangeConfig, files: list[str] | None
) -> dict[str, Any] | None:
    import numpy as np

    dtype = arr.dtype
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        return None  # objects and structured records pickle
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    desc = {"enc": "ndarray", "dtype": dtype.str, "shape": list(arr.shape)}
    return _encode_raw(desc, flat, buffers, config, files)


def _encode_tabular(
    kind: str, value: Any, buffers: list[Any], config: ExchangeConfig, files: list[str] | None
) -> dict[str, Any] | None:
    """Tables, DataFrames, lists of dicts and lists of Examples through Arrow; None when
    the value would not come back exactly (it is pickled instead)."""
    import pyarrow as pa

    desc: dict[str, Any] = {"enc": "arrow", "type": kind}
    if kind == "table":
        table = value
    elif kind == "record_batch":
        table = pa.Table.from_batches([value])
    elif kind == "dataframe":
        converted = _dataframe_to_table(pa, value)
        if converted is None:
            return None
        table, extra = converted
        desc.update(extra)
    elif kind == "records":
        table = _records_to_table(pa, value)
    else:
        examples = _examples_to_rows(value)
        if examples is None:
            return None
        rows, input_keys = examples
        table = _records_to_table(pa, rows)
        desc["input_keys"] = input_keys
    if table is None:
        return None
    if (
        config.files
        and table.nbytes >= config.inline_max
        and _has_room(config.folder, table.nbytes)
    ):
        assert config.folder is not None
        try:
            name, path = _write_arrow_file(config.folder, table)
        except OSError:
            pass  # the folder is full or gone: the message can still carry it
        else:
            if files is not None:
                files.append(path)
            return {**desc, "file": name}
    buffers.append(_arrow_stream(pa, table))
    return {**desc, "buf": len(buffers) - 1}


def _arrow_stream(pa: Any, table: Any) -> Any:
    """An Arrow IPC stream in one buffer sized exactly (a growing buffer is 5x slower)."""
    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, table.schema) as writer:
        writer.write_table(table)
    buf = pa.allocate_buffer(mock.size())
    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(buf), table.schema) as writer:
        writer.write_table(table)
    return buf


_SCALARS = frozenset({str, bytes, bool, int, float})


def _column_ok(column: list[Any]) -> bool:
    """Whether Arrow gives ``column`` back exactly: one scalar type (or lists of one
    scalar type) per column, None allowed anywhere. Mixed ints and floats, nested
    lists or dicts would come back changed."""
    kinds = {type(v) for v in column}
    kinds.discard(type(None))
    if len(kinds) > 1:
        return False
    if kinds != {list}:
        return kinds <= _SCALARS
    inner: set[type] = set()
    for v in column:
        if v is not None:
            inner.update(map(type, v))
    inner.discard(type(None))
    return len(inner) <= 1 and inner <= _SCALARS


def _records_to_table(pa: Any, rows: list[Any]) -> Any:
    """A list of dicts with the same string keys and one type per key, as a Table."""
    first = rows[0]
    # Keys become column names: strings a message can carry (no lone surrogates).
    if type(first) is not dict or not all(
        type(k) is str and protocol.is_json_native(k) for k in first
    ):
        return None
    keys = first.keys()
    if not all(type(r) is dict and r.keys() == keys for r in rows):
        return None
    arrays = []
    for key in first:
        column = [r[key] for r in rows]
        if not _column_ok(column):
            return None
        try:
            # Inferred, not given: with one Python type per column inference is exact,
            # and it is ten times faster than converting to a given type.
            arrays.append(pa.array(column))
        except (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError):
            return None  # an int beyond int64, a lone surrogate, ...
    return pa.Table.from_arrays(arrays, names=list(first))


def _examples_to_rows(examples: list[Any]) -> tuple[list[dict[str, Any]], Any] | None:
    """Rows and the shared input keys of a list of plain ``dspy.Example``."""
    cls = type(examples[0])
    input_keys = getattr(examples[0], "_input_keys", None)
    rows = []
    for ex in examples:
        if type(ex) is not cls or getattr(ex, "_demos", None) or ex._input_keys != input_keys:
            return None
        rows.append(ex._store)
    return rows, None if input_keys is None else sorted(input_keys)


def _is_object(dtype: Any) -> bool:
    return str(dtype) == "object"


def _dataframe_to_table(pa: Any, df: Any) -> tuple[Any, dict[str, Any]] | None:
    """A DataFrame as a Table, when pandas gets it back with the same dtypes.

    Object columns only when all their values are str (or bytes): the receiver turns
    them back into object columns (pandas 3 would make them ``str``)."""
    pd = sys.modules["pandas"]
    columns = df.columns
    if df.attrs or isinstance(columns, pd.MultiIndex) or not columns.is_unique:
        return None
    if not all(type(c) is str for c in columns):
        return None
    index = df.index
    levels = index.levels if isinstance(index, pd.MultiIndex) else [index]
    if isinstance(index, pd.MultiIndex) and any(_is_object(lv.dtype) for lv in levels):
        return None
    object_columns = [c for c, dtype in df.dtypes.items() if _is_object(dtype)]
    object_index = not isinstance(index, pd.MultiIndex) and _is_object(index.dtype)
    try:
        table = pa.Table.from_pandas(df, preserve_index=None)
        # Dtypes that pandas would not give back: checked on an empty copy, cheaply.
        empty = pa.Table.from_pandas(df.iloc[:0], preserve_index=None).to_pandas()
    except (pa.ArrowException, OverflowError, TypeError, ValueError):  # int beyond int64
        return None
    for name, dtype in df.dtypes.items():
        if not _is_object(dtype) and empty[name].dtype != dtype:
            return None
    if not object_index and empty.index.dtype != index.dtype:
        return None
    meta = table.schema.pandas_metadata or {}
    checked = list(object_columns)
    if object_index:
        stored = meta.get("index_columns") or []
        if len(stored) != 1 or not isinstance(stored[0], str):
            return None
        checked.append(stored[0])
    for name in checked:
        column = table.column(name)
        text = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
        if column.type not in text or column.null_count:
            return None
    return table, {"object_columns": object_columns, "object_index": object_index}


# ---- decoding --------------------------------------------------------------------------
def decode(desc: Any, buffers: list[Any], config: ExchangeConfig | None = None) -> Any:
    """The value a descriptor describes. Files it names are unlinked as they are read;
    if decoding fails, the rest of them too."""
    config = config or MESSAGE_ONLY
    try:
        return _decode(desc, buffers, config, 0)
    except BaseException:
        discard(desc, config)
        raise


def _enc(desc: Any) -> str:
    if not isinstance(desc, dict) or not isinstance(desc.get("enc"), str):
        raise protocol.ProtocolError(
            protocol.KIND_PROTOCOL, "value descriptor must be an object with 'enc'"
        )
    return desc["enc"]


def _decode(desc: Any, buffers: list[Any], config: ExchangeConfig, depth: int) -> Any:
    enc = _enc(desc)
    if enc in ("json", "pickle"):
        return protocol.decode_value(desc, buffers)
    if depth >= MAX_DEPTH:
        raise ExchangeError(f"value descriptors nest deeper than {MAX_DEPTH} levels")
    if enc == "args":
        nargs, keys = desc.get("nargs"), desc.get("keys")
        values = _decode_split(desc, buffers, config, depth)
        if type(nargs) is not int or not isinstance(keys, list) or nargs + len(keys) != len(values):
            raise ExchangeError("an 'args' descriptor needs 'nargs' and 'keys' that add up")
        return values[:nargs], {str(k): v for k, v in zip(keys, values[nargs:], strict=True)}
    if enc == "seq":
        kind = desc.get("type")
        if kind not in ("list", "tuple"):
            raise ExchangeError("a 'seq' descriptor needs type list or tuple")
        values = _decode_split(desc, buffers, config, depth)
        return tuple(values) if kind == "tuple" else values
    if enc == "dict":
        keys = desc.get("keys")
        values = _decode_split(desc, buffers, config, depth)
        if not isinstance(keys, list) or len(keys) != len(values):
            raise ExchangeError("a 'dict' descriptor needs one key for each value")
        return {str(k): v for k, v in zip(keys, values, strict=True)}
    if enc in ("bytes", "ndarray"):
        return _decode_raw(desc, buffers, config)
    if enc == "arrow":
        return _decode_arrow(desc, buffers, config)
    raise protocol.ProtocolError(protocol.KIND_PROTOCOL, f"unknown value encoding {enc!r}")


def _decode_split(
    desc: dict[str, Any], buffers: list[Any], config: ExchangeConfig, depth: int
) -> list[Any]:
    """The values of a container: its bulky ones put back among the others."""
    n, bulky = desc.get("n"), desc.get("bulky")
    if type(n) is not int or n < 0 or not isinstance(bulky, dict):
        raise ExchangeError(f"a {desc['enc']!r} descriptor needs a count 'n' and 'bulky' values")
    rest = _decode(desc.get("rest"), buffers, config, depth + 1)
    if not isinstance(rest, list) or len(rest) + len(bulky) != n:
        raise ExchangeError(f"a {desc['enc']!r} descriptor's values do not add up to {n}")
    others = iter(rest)
    values = []
    for i in range(n):
        item = bulky.get(str(i))
        values.append(next(others) if item is None else _decode(item, buffers, config, depth + 1))
    return values


def _buffer(desc: dict[str, Any], buffers: list[Any]) -> Any:
    index = desc.get("buf")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(buffers):
        raise ExchangeError(f"value refers to missing buffer {index!r}")
    return buffers[index]


def _file_path(name: Any, config: ExchangeConfig) -> str:
    """The path of an exchange file named in a descriptor: a bare name dspex made, in
    this side's own folder. Anything else (a path, '..', another name) is refused."""
    if not isinstance(name, str) or not FILE_NAME.match(name):
        raise ExchangeError(
            f"refusing exchange file {name!r}: only bare file names made by dspex "
            "(32 hex digits and .raw or .arrow) are opened, inside the exchange folder"
        )
    if not config.files or config.folder is None:
        raise ExchangeError(
            f"the value was sent as exchange file {name}, but this side has no shared "
            "exchange folder (shared memory is off)"
        )
    return os.path.join(config.folder, name)


def _open_file(name: Any, config: ExchangeConfig) -> tuple[int, int]:
    """Open an exchange file (this user's private regular file, or refused) and unlink it:
    the receiver has it, the folder is clean. Returns the descriptor and the size."""
    path = _file_path(name, config)
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        raise ExchangeError(
            f"exchange file {name} is missing from {config.folder} (already read, or "
            "removed when its kernel or pool stopped)"
        ) from None
    except OSError as exc:
        _unlink(path)
        raise ExchangeError(f"cannot open exchange file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise ExchangeError(f"exchange file {path} is not a file of this user")
        if info.st_mode & 0o077:
            raise ExchangeError(f"exchange file {path} is readable by other users; refused")
        if info.st_size == 0:
            raise ExchangeError(f"exchange file {path} is empty (corrupt or truncated)")
    except BaseException:
        os.close(fd)
        raise
    finally:
        _unlink(path)
    return fd, info.st_size


def _take_file(name: Any, config: ExchangeConfig, access: int) -> mmap.mmap:
    """Map an exchange file (and unlink it)."""
    fd, size = _open_file(name, config)
    try:
        mapping = mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)
    _release_later(mapping)
    return mapping


def _pread_exactly(fd: int, nbytes: int, offset: int) -> bytes:
    chunks = []
    while nbytes > 0:
        chunk = os.pread(fd, nbytes, offset)
        if not chunk:
            break
        chunks.append(chunk)
        nbytes -= len(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_raw_file(name: Any, config: ExchangeConfig, desc: dict[str, Any]) -> Any:
    """bytes, bytearray and str from a raw exchange file, read with pread(2). Copying them
    out of a mapping instead page-faults 100 MB while holding the GIL, which stalls every
    other thread of the process (the manager's loop included) for the whole copy; the
    kernel releases the GIL during a read. Arrays stay zero-copy mappings."""
    fd, size = _open_file(name, config)
    try:
        prefix = _pread_exactly(fd, 12, 0)
        head_len = int.from_bytes(prefix[8:12], "little") if len(prefix) == 12 else 0
        head = prefix + _pread_exactly(fd, min(head_len, max(size - 12, 0)), 12)
        offset = _raw_file_offset(head, size, desc, name)
        data = _pread_exactly(fd, desc["nbytes"], offset)
    finally:
        os.close(fd)
    if len(data) != desc["nbytes"]:
        raise ExchangeError(f"exchange file {name} is truncated")
    kind = desc["type"]
    if kind == "str":
        return str(data, "utf-8", "surrogatepass")
    return data if kind == "bytes" else bytearray(data)


def _release_later(mapping: mmap.mmap) -> None:
    """Keep a received mapping until the event loop's next turn. In a kernel, a call's
    arguments die when the op returns, before its reply is sent: unmapping a big file and
    freeing its pages then (about 17 ms per 100 MB) would delay the reply. Held here, that
    happens after the reply has left (the GIL is released while unmapping)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.call_soon(_drop, mapping)


def _drop(_: Any) -> None:
    """The callback that holds a mapping until it runs."""


def _check_raw_desc(desc: dict[str, Any]) -> tuple[int, Any]:
    """Validate a bytes/ndarray descriptor; return its size and, for arrays, the dtype."""
    nbytes = desc.get("nbytes")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ExchangeError(f"descriptor has a bad 'nbytes': {nbytes!r}")
    if desc["enc"] == "bytes":
        if desc.get("type") not in _RAW_TYPES:
            raise ExchangeError(f"bytes descriptor has an unknown type {desc.get('type')!r}")
        return nbytes, None
    import numpy as np

    shape = desc.get("shape")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ExchangeError(f"array descriptor has a bad shape {shape!r}")
    try:
        dtype = np.dtype(desc.get("dtype"))
    except (TypeError, ValueError):
        raise ExchangeError(f"array descriptor has a bad dtype {desc.get('dtype')!r}") from None
    if dtype.hasobject:
        raise ExchangeError("refusing an array of Python objects from raw bytes")
    count = 1
    for n in shape:
        count *= n
    if count * dtype.itemsize != nbytes:
        raise ExchangeError(
            f"array descriptor says {nbytes} bytes, but shape {shape} of {dtype} needs "
            f"{count * dtype.itemsize}"
        )
    return nbytes, dtype


def _raw_value(desc: dict[str, Any], dtype: Any, data: Any, offset: int, copy: bool) -> Any:
    """Build the bytes, bytearray, str or array from ``data[offset:offset + nbytes]``."""
    nbytes = desc["nbytes"]
    view = memoryview(data)[offset : offset + nbytes]
    if dtype is None:
        kind = desc["type"]
        if kind == "str":
            return str(view, "utf-8", "surrogatepass")
        return _RAW_TYPES[kind](view)
    import numpy as np

    if nbytes == 0:
        return np.empty(desc["shape"], dtype=dtype)
    arr = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
    arr = arr.reshape(desc["shape"])
    return arr.copy() if copy else arr


def _decode_raw(desc: dict[str, Any], buffers: list[Any], config: ExchangeConfig) -> Any:
    nbytes, dtype = _check_raw_desc(desc)
    if "file" not in desc:
        buf = memoryview(_buffer(desc, buffers)).cast("B")
        if buf.nbytes != nbytes:
            raise ExchangeError(f"buffer holds {buf.nbytes} bytes, descriptor says {nbytes}")
        # Arrays from a read-only message buffer are copied, so the caller may write them.
        return _raw_value(desc, dtype, buf, 0, copy=buf.readonly)
    name = desc["file"]
    if dtype is None and not str(name).endswith(".arrow"):  # the name is checked there
        return _read_raw_file(name, config, desc)
    # Copy-on-write mapping: arrays come back writable and still zero-copy.
    mm = _take_file(name, config, mmap.ACCESS_COPY)
    if name.endswith(".arrow"):
        offset = _arrow_raw_offset(mm, desc, name)
    else:
        offset = _raw_file_offset(mm, len(mm), desc, name)
    if len(mm) < offset + nbytes:
        raise ExchangeError(f"exchange file {name} is truncated")
    value = _raw_value(desc, dtype, mm, offset, copy=False)
    if dtype is None:  # bytes and str were copied out; an array keeps the mapping alive
        with contextlib.suppress(BufferError):
            mm.close()
    return value


def _raw_file_offset(head: Any, size: int, desc: dict[str, Any], name: str) -> int:
    """Check a raw file's magic and JSON header (``head``: the file's first bytes, at least
    up to the header's end) against the descriptor; where the value starts."""
    if size < 12 or len(head) < 12 or head[:8] != RAW_MAGIC:
        raise ExchangeError(f"exchange file {name} is corrupt (not a dspex raw file)")
    head_len = int.from_bytes(head[8:12], "little")
    try:
        header = json.loads(head[12 : 12 + head_len])
    except ValueError:
        raise ExchangeError(f"exchange file {name} is corrupt (bad header)") from None
    if header != _raw_header(desc):
        raise ExchangeError(f"exchange file {name} does not hold the value described")
    offset = 12 + head_len
    offset += -offset % _ALIGN
    if size != offset + desc["nbytes"]:
        raise ExchangeError(f"exchange file {name} is corrupt (wrong size, truncated?)")
    return offset


def _arrow_raw_offset(mm: mmap.mmap, desc: dict[str, Any], name: str) -> int:
    """Where an Arrow-file array's bytes start in the mapping (read zero-copy there)."""
    import pyarrow as pa

    whole = pa.py_buffer(mm)
    try:
        reader = pa.ipc.open_file(whole)
        meta = (reader.schema.metadata or {}).get(_ARROW_META)
        if reader.num_record_batches != 1 or meta is None:
            raise ExchangeError(f"exchange file {name} is not a dspex array file")
        if json.loads(meta) != _raw_header(desc):
            raise ExchangeError(f"exchange file {name} does not hold the value described")
        column = reader.get_batch(0).column(0)
    except (pa.ArrowException, ValueError) as exc:
        if isinstance(exc, ExchangeError):
            raise
        raise ExchangeError(f"exchange file {name} is corrupt: {exc}") from None
    if column.type != pa.uint8() or len(column) != desc["nbytes"] or column.null_count:
        raise ExchangeError(f"exchange file {name} does not hold the value described")
    if desc["nbytes"] == 0:
        return 0
    offset = column.buffers()[1].address + column.offset - whole.address
    if not 0 <= offset <= len(mm) - desc["nbytes"]:
        raise ExchangeError(f"exchange file {name} is corrupt (data outside the file)")
    return offset


def _decode_arrow(desc: dict[str, Any], buffers: list[Any], config: ExchangeConfig) -> Any:
    kind = desc.get("type")
    if kind not in ("table", "record_batch", "dataframe", "records", "examples"):
        raise ExchangeError(f"arrow descriptor has an unknown type {kind!r}")
    import pyarrow as pa

    try:
        if "file" in desc:
            name = desc["file"]
            if not str(name).endswith(".arrow"):
                raise ExchangeError(f"exchange file {name!r} is not an Arrow file")
            # Zero-copy: the table's buffers point into the mapping, which they keep alive.
            mm = _take_file(name, config, mmap.ACCESS_READ)
            table = pa.ipc.open_file(pa.py_buffer(mm)).read_all()
        else:
            table = pa.ipc.open_stream(pa.py_buffer(_buffer(desc, buffers))).read_all()
    except pa.ArrowException as exc:
        where = f"exchange file {desc['file']}" if "file" in desc else "message buffer"
        raise ExchangeError(f"{where} is not a valid Arrow IPC value: {exc}") from None
    if kind == "table":
        return table
    if kind == "record_batch":
        batches = table.combine_chunks().to_batches()
        return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
    if kind == "dataframe":
        return _table_to_dataframe(table, desc)
    rows = table.to_pylist()
    if kind == "records":
        return rows
    import dspy

    keys = desc.get("input_keys")
    if keys is None:
        return [dspy.Example(row) for row in rows]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ExchangeError(f"examples descriptor has bad input keys {keys!r}")
    return [dspy.Example(row).with_inputs(*keys) for row in rows]


def _table_to_dataframe(table: Any, desc: dict[str, Any]) -> Any:
    df = table.to_pandas()
    for name in desc.get("object_columns") or []:
        if name in df.columns and not _is_object(df[name].dtype):
            df[name] = df[name].astype(object)
    if desc.get("object_index") and not _is_object(df.index.dtype):
        df.index = df.index.astype(object)
    return df


# ---- clean-up --------------------------------------------------------------------------
def file_names(desc: Any, _depth: int = 0) -> list[str]:
    """The exchange files a descriptor names (at any depth)."""
    if not isinstance(desc, dict) or _depth > MAX_DEPTH:
        return []
    found = [desc["file"]] if isinstance(desc.get("file"), str) else []
    bulky = desc.get("bulky")
    if isinstance(bulky, dict):  # containers: only their bulky values may be files
        for child in bulky.values():
            found += file_names(child, _depth + 1)
    return found


def discard(desc: Any, config: ExchangeConfig | None = None) -> None:
    """Remove the files of a value nobody will read (an abandoned or failed reply)."""
    config = config or MESSAGE_ONLY
    if not config.files or config.folder is None:
        return
    for name in file_names(desc):
        if FILE_NAME.match(name):
            _unlink(os.path.join(config.folder, name))


def tier_of(desc: Any) -> str:
    """Which tier a descriptor used: ``message``, ``mmap`` or ``arrow`` (for tests and
    benchmarks; a container reports its largest tier)."""
    names = file_names(desc)
    if any(n.endswith(".arrow") for n in names):
        return "arrow"
    return "mmap" if names else "message"


class Outgoing:
    """What one request carries besides its JSON: buffers, and files written for it.

    After the reply, ``discard()`` removes any file the receiver did not take (it failed
    before reading its arguments, or died)."""

    def __init__(self, config: ExchangeConfig | None = None) -> None:
        self.config = config or MESSAGE_ONLY
        self.buffers: list[Any] = []
        self.files: list[str] = []

    def encode(self, value: Any) -> dict[str, Any]:
        with self._cleaning():
            return encode(value, self.buffers, self.config, self.files)

    def encode_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        with self._cleaning():
            return encode_call(args, kwargs, self.buffers, self.config, self.files)

    def encode_items(self, values: list[Any]) -> dict[str, Any]:
        with self._cleaning():
            return encode_items(values, self.buffers, self.config, self.files)

    @contextlib.contextmanager
    def _cleaning(self) -> Iterator[None]:
        """A value that fails to encode half-way leaves no files behind."""
        try:
            yield
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for path in self.files:
            _unlink(path)
        self.files.clear()


# ---- message buffers in pieces (kernels on another machine) ----------------------------
# A kernel elsewhere gets every value in message buffers (no shared folder); a 100 MB table
# would be one 100 MB ZMQ message, held whole in each queue it passes. Buffers bigger than
# this go instead as numbered pieces of at most this size, each its own comm message, both
# ways; the request or reply that follows names them, and the receiver puts them together.
CHUNK_BYTES = 8 * 1024 * 1024


def _flat(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    return view if view.ndim == 1 and view.format in ("B", "b", "c") else view.cast("B")


def needs_chunks(buffers: list[Any], chunk_bytes: int | None) -> bool:
    """Whether ``buffers`` must go in pieces of ``chunk_bytes`` (None: never)."""
    return bool(chunk_bytes) and any(_flat(b).nbytes > chunk_bytes for b in buffers)


def split_buffers(buffers: list[Any], chunk_bytes: int) -> tuple[list[int], list[memoryview]]:
    """The buffers' sizes and their pieces: views of ``buffers`` of at most ``chunk_bytes``
    each, in order (nothing is copied)."""
    sizes, pieces = [], []
    for buffer in buffers:
        view = _flat(buffer)
        sizes.append(view.nbytes)
        pieces.extend(view[i : i + chunk_bytes] for i in range(0, view.nbytes, chunk_bytes))
    return sizes, pieces


class ChunkAssembler:
    """Writes numbered pieces into buffers of the sizes the first piece announced, as they
    arrive (one copy, no list of pieces). A piece missing (a queue that dropped it) or out of
    order fails the value instead of corrupting it."""

    def __init__(self, sizes: Any) -> None:
        if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes):
            raise ExchangeError(f"invalid sizes for a chunked value: {sizes!r}")
        self._buffers = [bytearray(n) for n in sizes]
        self._index = 0  # the buffer being filled
        self._offset = 0
        self._next = 0  # the piece expected next
        self._skip_full()

    def _skip_full(self) -> None:
        while self._index < len(self._buffers) and self._offset >= len(self._buffers[self._index]):
            self._index += 1
            self._offset = 0

    @property
    def done(self) -> bool:
        return self._index >= len(self._buffers)

    def add(self, seq: Any, piece: Any) -> None:
        view = _flat(piece)
        if seq != self._next:
            raise ExchangeError(
                f"piece {seq!r} of a chunked value arrived where piece {self._next} was "
                "expected: pieces were lost on the way"
            )
        if self.done or self._offset + view.nbytes > len(self._buffers[self._index]):
            raise ExchangeError("a chunked value's pieces do not add up to its sizes")
        self._buffers[self._index][self._offset : self._offset + view.nbytes] = view
        self._offset += view.nbytes
        self._next += 1
        self._skip_full()

    def buffers(self, pieces: Any) -> list[bytearray]:
        """The buffers, once all ``pieces`` (the count the request or reply names) came."""
        if pieces != self._next or not self.done:
            raise ExchangeError(
                f"a chunked value is incomplete: {self._next} piece(s) received of {pieces!r}"
            )
        return self._buffers


def send_in_pieces(
    send: Callable[[dict[str, Any], list[Any]], None],
    data: dict[str, Any],
    buffers: list[Any],
    chunk_bytes: int | None,
) -> None:
    """``send(data, buffers)`` as one message, or, when a buffer is bigger than
    ``chunk_bytes``, as its pieces (the first names the buffers' sizes) followed by ``data``
    naming them (``"chunked"``). Both sides send this way and receive with ``PieceReceiver``."""
    if not needs_chunks(buffers, chunk_bytes):
        send(data, buffers)
        return
    assert chunk_bytes is not None
    chunk_id = uuid.uuid4().hex
    sizes, pieces = split_buffers(buffers, chunk_bytes)
    for seq, piece in enumerate(pieces):
        head: dict[str, Any] = {"chunk": chunk_id, "seq": seq}
        if seq == 0:
            head["sizes"] = sizes
        send(head, [piece])
    send({**data, "chunked": {"id": chunk_id, "pieces": len(pieces)}}, [])


class PieceReceiver:
    """The chunked values one side is receiving, by id (see ``send_in_pieces``)."""

    # Values whose sender vanished half-way are forgotten beyond this many.
    MAX_OPEN = 16

    def __init__(self) -> None:
        self._open: dict[str, ChunkAssembler] = {}
        self._failed: dict[str, str] = {}

    @staticmethod
    def is_piece(data: Any) -> bool:
        return isinstance(data, dict) and isinstance(data.get("chunk"), str)

    def piece(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """Take one piece; a bad one fails its value when the value's message comes."""
        chunk_id = data["chunk"]
        try:
            if data.get("seq") == 0:
                while len(self._open) >= self.MAX_OPEN:
                    self._open.pop(next(iter(self._open)))
                self._open[chunk_id] = ChunkAssembler(data.get("sizes"))
            if chunk_id in self._failed:
                return
            assembler = self._open.get(chunk_id)
            if assembler is None or len(buffers) != 1:
                raise ExchangeError(f"piece {data.get('seq')!r} of an unknown chunked value")
            assembler.add(data.get("seq"), buffers[0])
        except ExchangeError as exc:
            self._open.pop(chunk_id, None)
            self._failed[chunk_id] = str(exc)
            while len(self._failed) > self.MAX_OPEN:
                self._failed.pop(next(iter(self._failed)))

    def take(self, data: Any, buffers: list[Any]) -> list[Any]:
        """The buffers of a request or reply: its own, or those its pieces brought."""
        chunked = data.get("chunked") if isinstance(data, dict) else None
        if chunked is None:
            return buffers
        chunk_id = chunked.get("id") if isinstance(chunked, dict) else None
        if not isinstance(chunk_id, str):
            raise ExchangeError(f"invalid chunked value reference {chunked!r}")
        if chunk_id in self._failed:
            raise ExchangeError(self._failed.pop(chunk_id))
        assembler = self._open.pop(chunk_id, None)
        if assembler is None:
            raise ExchangeError("a chunked value's pieces never arrived")
        return list(assembler.buffers(chunked.get("pieces")))
