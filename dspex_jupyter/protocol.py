"""The wire format between the notebook process and pool kernels: its one source of truth.

Both sides import this module, so it must stay light (standard library only). Every
operation is a comm message on the ``dspex`` comm target:

request  ``{"v": 2, "id": "<request id>", "op": "<op name>", "args": {...}, "session": sid|None}``
         (``"noreply": true`` asks for no reply unless the op fails: acknowledgements)
reply    ``{"v": 2, "id": ..., "ok": true, "result": <value>}``
error    ``{"v": 2, "id": ..., "ok": false, "error": {"kind", "type", "module", "message",
         "traceback"}}``

Values that are not plain JSON travel as pickled binary buffers of the same message (see
``encode_value``): messages are HMAC-signed by jupyter_client and never written to disk.
Tables, arrays and long bytes take faster tiers (raw or Arrow IPC files in a private
shared-memory folder): ``exchange.py`` describes them and builds on these two encodings.
"""

from __future__ import annotations

import functools
import io
import math
import pickle
import reprlib
import threading
import traceback as _traceback
import uuid
from dataclasses import dataclass
from typing import Any

# Standard library only, like this module: both sides raise the same error types.
from .core.errors import DspexError, InvalidFunction, SerializationError

# 2: values in exchange tiers (args/seq/dict/ndarray/arrow descriptors), configure_exchange.
PROTOCOL_VERSION = 2
COMM_TARGET = "dspex"

# Error kinds that are about the message itself, not about the user's code.
KIND_PROTOCOL = "protocol"
KIND_UNKNOWN_OP = "unknown_op"
KIND_VERSION = "version"
KIND_REMOTE = "remote"

# Above this many nested items the JSON check costs more than pickling outright.
_JSON_CHECK_BUDGET = 2_000
# Deeper JSON than this pickles (JSON parsers, orjson included, limit nesting).
_JSON_MAX_DEPTH = 100
# jupyter_client parses messages with orjson when it is installed, which reads integers
# past 64 bits as floats: such integers travel pickled (exact) instead.
_INT64_MIN, _INT64_END = -(2**63), 2**63


class ProtocolError(Exception):
    """A message that does not follow this protocol."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Request:
    id: str
    op: str
    args: dict[str, Any]
    session: str | None


def new_request_id() -> str:
    return uuid.uuid4().hex


def make_request(
    op: str, args: dict[str, Any] | None = None, session: str | None = None, req_id: str = ""
) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "id": req_id or new_request_id(),
        "op": op,
        "args": args or {},
        "session": session,
    }


def parse_request(data: Any) -> Request:
    """Validate an incoming request; raise ProtocolError saying what is wrong."""
    if not isinstance(data, dict):
        raise ProtocolError(
            KIND_PROTOCOL, f"request must be a JSON object, got {type(data).__name__}"
        )
    version = data.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            KIND_VERSION,
            f"protocol version {version!r} is not supported by this runtime "
            f"(it speaks version {PROTOCOL_VERSION}); install the same dspex-jupyter version "
            "in the notebook and in the pool's environment",
        )
    req_id, op, args, session = (
        data.get("id"),
        data.get("op"),
        data.get("args", {}),
        data.get("session"),
    )
    if not isinstance(req_id, str) or not req_id:
        raise ProtocolError(KIND_PROTOCOL, "request 'id' must be a non-empty string")
    if not isinstance(op, str) or not op:
        raise ProtocolError(KIND_PROTOCOL, "request 'op' must be a non-empty string")
    if not isinstance(args, dict):
        raise ProtocolError(KIND_PROTOCOL, "request 'args' must be a JSON object")
    if session is not None and not isinstance(session, str):
        raise ProtocolError(KIND_PROTOCOL, "request 'session' must be a string or null")
    return Request(req_id, op, args, session)


def make_reply(req_id: str, result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result}


def make_error(
    req_id: str,
    kind: str,
    etype: str,
    message: str,
    module: str = "builtins",
    traceback: list[str] | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "id": req_id,
        "ok": False,
        "error": {
            "kind": kind,
            "type": etype,
            "module": module,
            "message": message,
            "traceback": traceback or [],
            "details": details or {},
        },
    }


def error_from_exception(
    req_id: str, exc: BaseException, kind: str = KIND_REMOTE
) -> dict[str, Any]:
    etype = type(exc)
    details: dict[str, Any] = {}
    message = str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        details["missing_module"] = exc.name
    if isinstance(exc, DspexError):
        message = str(exc.args[0]) if exc.args else ""
        if exc.hint != type(exc).hint:  # a raise site's own hint becomes the client's hint
            details["hint"] = exc.hint
    return make_error(
        req_id,
        kind,
        etype.__qualname__,
        message,
        module=etype.__module__,
        traceback=_traceback.format_exception(etype, exc, exc.__traceback__),
        details=details,
    )


def _json_str(text: str) -> bool:
    """Whether a message can carry ``text``: lone surrogates cannot be UTF-8 encoded."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_json_native(value: Any) -> bool:
    """True when ``value`` survives a message's JSON round trip unchanged: exact types,
    finite floats, integers within 64 bits, strings UTF-8 can encode, bounded nesting."""
    budget = [_JSON_CHECK_BUDGET]

    def check(v: Any, depth: int) -> bool:
        budget[0] -= 1
        if budget[0] < 0 or depth > _JSON_MAX_DEPTH:
            return False
        t = type(v)
        if t is str:
            return _json_str(v)
        if t is bool or v is None:
            return True
        if t is int:
            return _INT64_MIN <= v < _INT64_END
        if t is float:
            return math.isfinite(v)
        if t is list:
            return all(check(x, depth + 1) for x in v)
        if t is dict:
            return all(
                type(k) is str and _json_str(k) and check(x, depth + 1) for k, x in v.items()
            )
        return False

    return check(value, 0)


def encode_value(value: Any, buffers: list[bytes]) -> dict[str, Any]:
    """Describe ``value`` for a message; non-JSON values are appended to ``buffers``.

    cloudpickle is used (and imported) only when plain pickle cannot ship the value by
    reference: functions and classes defined in a notebook travel by value. That is
    trusted code running as the same user, the same contract as ipyparallel's.
    """
    if is_json_native(value):
        return {"enc": "json", "value": value}
    buffers.append(pickle_value(value))
    return {"enc": "pickle", "buf": len(buffers) - 1}


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 40, 40


def describe_value(value: Any) -> str:
    """A short name for ``value`` in an error: its type and the start of its repr
    (bounded in length and depth, so any value can be named)."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:
        text = "<no repr>"
    return f"{type(value).__qualname__} {text}"


def pickle_value(value: Any) -> bytes:
    """cloudpickle, with an error that names the value (its hint: what to send instead)."""
    try:
        return _dumps(value)
    except Exception as exc:
        where, part = _culprit(value, _dumps)
        inside = f"; the part that fails is {where}: {describe_value(part)}" if where else ""
        raise SerializationError(
            f"a value cannot be sent to or from a kernel ({exc}): {describe_value(value)}{inside}"
        ) from exc


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _pickler_class()(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


@functools.cache
def _pickler_class() -> type:
    """cloudpickle's pickler, plus one rule: a lock travels as a new, unlocked lock of the
    same kind. A lock is this process's state, and objects users ship hold them at any
    depth (BootstrapFewShot's ``error_lock``, inside BetterTogether's optimizers)."""
    import cloudpickle

    locks = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}

    class ShippingPickler(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            factory = locks.get(type(obj))
            if factory is not None:
                return factory, ()
            return super().reducer_override(obj)

    return ShippingPickler


def _culprit(value: Any, dumps: Any, path: str = "", depth: int = 0) -> tuple[str, Any]:
    """The path (``['key'][2]``) and value of the innermost part of a container that fails
    to pickle, looked for only after pickling failed (a few levels, a few items each)."""
    if depth >= 4:
        return path, value
    if type(value) is dict:
        items: list[tuple[str, Any]] = [(f"[{k!r}]", v) for k, v in value.items()]
    elif type(value) in (list, tuple):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    else:
        return path, value
    for step, item in items[:100]:
        try:
            dumps(item)
        except RecursionError:
            return path, value
        except Exception:
            return _culprit(item, dumps, path + step, depth + 1)
    return path, value


def encode_function(func: Any, buffers: list[bytes]) -> dict[str, Any]:
    """A function travels by import path (``"pkg.mod:func"``) or, if defined in the
    notebook, by value (cloudpickle: trusted code only, as with ipyparallel)."""
    if isinstance(func, str):
        module, sep, name = func.partition(":")
        if not sep or not module or not name:
            raise InvalidFunction(
                f"function reference {func!r} must look like 'package.module:function'"
            )
        return {"ref": func}
    if callable(func):
        return encode_value(func, buffers)
    raise InvalidFunction(
        f"expected a callable or a 'module:function' string, got {describe_value(func)}"
    )


def decode_value(desc: Any, buffers: list[Any]) -> Any:
    if not isinstance(desc, dict) or "enc" not in desc:
        raise ProtocolError(KIND_PROTOCOL, "value descriptor must be an object with 'enc'")
    enc = desc["enc"]
    if enc == "json":
        return desc.get("value")
    if enc == "pickle":
        index = desc.get("buf")
        if not isinstance(index, int) or not 0 <= index < len(buffers):
            raise ProtocolError(KIND_PROTOCOL, f"value refers to missing buffer {index!r}")
        return pickle.loads(bytes(buffers[index]))
    raise ProtocolError(KIND_PROTOCOL, f"unknown value encoding {enc!r}")
