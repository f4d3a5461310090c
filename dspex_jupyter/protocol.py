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

import math
import pickle
import traceback as _traceback
import uuid
from dataclasses import dataclass
from typing import Any

# 2: values in exchange tiers (args/seq/dict/ndarray/arrow descriptors), configure_exchange.
PROTOCOL_VERSION = 2
COMM_TARGET = "dspex"

# Error kinds that are about the message itself, not about the user's code.
KIND_PROTOCOL = "protocol"
KIND_UNKNOWN_OP = "unknown_op"
KIND_VERSION = "version"
KIND_REMOTE = "remote"

_JSON_SCALARS = (str, int, bool, type(None))
# Above this many nested items the JSON check costs more than pickling outright.
_JSON_CHECK_BUDGET = 2_000


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
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        details["missing_module"] = exc.name
    return make_error(
        req_id,
        kind,
        etype.__qualname__,
        str(exc),
        module=etype.__module__,
        traceback=_traceback.format_exception(etype, exc, exc.__traceback__),
        details=details,
    )


def is_json_native(value: Any) -> bool:
    """True when ``value`` survives a JSON round trip unchanged (exact types, finite floats)."""
    budget = [_JSON_CHECK_BUDGET]

    def check(v: Any) -> bool:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        t = type(v)
        if t in _JSON_SCALARS:
            return True
        if t is float:
            return math.isfinite(v)
        if t is list:
            return all(check(x) for x in v)
        if t is dict:
            return all(type(k) is str and check(x) for k, x in v.items())
        return False

    return check(value)


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


class SerializationError(TypeError):
    """A value that cannot travel to or from a kernel."""


def pickle_value(value: Any) -> bytes:
    """cloudpickle, with an error that says what to send instead."""
    import cloudpickle

    try:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"a value cannot be sent to or from a kernel ({exc}). Send data "
            "(JSON values, bytes, arrays, tables, dspy.Examples), or refer to objects by "
            "import path ('package.module:name') and build them in the kernel"
        ) from exc


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
