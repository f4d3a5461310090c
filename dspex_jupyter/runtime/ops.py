"""Built-in ops. Names follow the seed design: init_session, warmup, health, clear_gpu_cache."""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import exchange, protocol
from .exchange_ops import kernel_config
from .registry import op
from .reply_log import KEPT, ReplyLog
from .state import STATE, SessionRecord, current_session

# Modules whose presence in sys.modules says a kernel has loaded something heavy.
HEAVY_MODULES = ("torch", "dspy", "pyarrow", "numpy", "pandas", "tensorflow", "jax")


Sender = Callable[[dict[str, Any], "list[bytes] | None"], None]


@dataclass
class OpContext:
    """What an op sees of its request: the decoded request, its binary buffers, and a way
    to publish further messages on the same comm (for streams)."""

    request: protocol.Request
    buffers: list[Any]
    send: Sender | None = None
    out_buffers: list[bytes] = field(default_factory=list)
    replies: ReplyLog | None = None  # the comm's kept replies (see reply_log.py)

    def decode(self, desc: Any) -> Any:
        # Values travel in tiers (message, memory-mapped file, Arrow file): exchange.py.
        return exchange.decode(desc, self.buffers, kernel_config())

    def encode(self, value: Any) -> dict[str, Any]:
        return exchange.encode(value, self.out_buffers, kernel_config())


_resolved: dict[str, Any] = {}


def resolve_callable(ref: str) -> Any:
    """Import ``"pkg.module:qualified.name"`` and return the object it names."""
    func = _resolved.get(ref)
    if func is not None:
        return func
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(
            f"function reference {ref!r} must look like 'package.module:function' "
            "(a colon between the module and the name)"
        )
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise TypeError(f"{ref!r} names a {type(obj).__name__}, which is not callable")
    _resolved[ref] = obj
    return obj


def _function(ctx: OpContext, spec: Any) -> Any:
    if isinstance(spec, dict) and isinstance(spec.get("ref"), str):
        return resolve_callable(spec["ref"])
    func = ctx.decode(spec)
    if not callable(func):
        raise TypeError(f"the function shipped by value is a {type(func).__name__}, not callable")
    return func


def _in_session(ctx: OpContext) -> SessionRecord | None:
    sid = ctx.request.session
    if sid is None:
        return None
    record = STATE.sessions.get(sid)
    if record is None:
        raise LookupError(f"session {sid!r} is not open in this kernel (pid {os.getpid()})")
    return record


@op("hello")
def hello(ctx: OpContext, keep_replies: bool = False) -> dict[str, Any]:
    """``keep_replies``: the client's connection may drop (a gateway's websocket), so keep
    recent replies for it to ask about (op ``replies``)."""
    from .. import __version__

    if keep_replies is True and ctx.replies is not None:
        ctx.replies.enabled = True
    return {
        "protocol": protocol.PROTOCOL_VERSION,
        "runtime_version": __version__,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "prefix": sys.prefix,
    }


@op("replies")
def replies(ctx: OpContext, ids: list[str], resend: bool = False) -> dict[str, str]:
    """What became of these requests after the client's connection dropped: their reply
    ``kept`` (sent again first when ``resend``), ``running``, ``not_kept`` (answered, but too
    big to keep or already evicted) or ``unknown`` (never received)."""
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise TypeError("replies 'ids' must be a list of request ids")
    log = ctx.replies
    if log is None or not log.enabled:
        raise RuntimeError("this comm keeps no replies (hello was not asked to keep them)")
    statuses = {req_id: log.status(req_id) for req_id in ids}
    if resend and ctx.send is not None:
        send = ctx.send
        for req_id, status in statuses.items():
            kept = log.kept(req_id) if status == KEPT else None
            if kept is not None:
                reply, buffers, chunk_max = kept
                exchange.send_in_pieces(send, reply, buffers, chunk_max)
    return statuses


@op("init_session")
def init_session(ctx: OpContext, session_id: str, state: Any = None) -> dict[str, Any]:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("init_session needs a non-empty session_id")
    value = ctx.decode(state) if state is not None else None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"session state must be a dict, got {type(value).__name__}")
    STATE.sessions[session_id] = SessionRecord(session_id, value)
    return {"session_id": session_id, "pid": os.getpid()}


@op("release_session")
def release_session(ctx: OpContext, session_id: str) -> dict[str, Any]:
    record = STATE.sessions.pop(session_id, None)
    return {"released": record is not None}


@op("call")
def call(ctx: OpContext, func: Any, payload: Any) -> dict[str, Any]:
    target = _function(ctx, func)
    args, kwargs = ctx.decode(payload)
    record = _in_session(ctx)
    token = current_session.set(record)
    try:
        result = target(*args, **kwargs)
    finally:
        current_session.reset(token)
        STATE.calls_served += 1
        if record is not None:
            record.calls += 1
    return ctx.encode(result)


@op("map")
def map_items(ctx: OpContext, func: Any, items: Any) -> dict[str, Any]:
    target = _function(ctx, func)
    values = ctx.decode(items)
    record = _in_session(ctx)
    token = current_session.set(record)
    try:
        results = [target(item) for item in values]
    finally:
        current_session.reset(token)
        STATE.calls_served += 1
    return ctx.encode(results)


@op("environ")
def set_environ(ctx: OpContext, variables: dict[str, str]) -> dict[str, Any]:
    """The pool's ``env_vars`` for a kernel the pool did not start as a child process (one
    on another host gets only its kernelspec's env): sent once, before any work, inside the
    signed and encrypted channel, so API keys never show on a command line."""
    if not isinstance(variables, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in variables.items()
    ):
        raise TypeError("environ 'variables' must map strings to strings")
    os.environ.update(variables)
    return {"set": sorted(variables)}


@op("warmup")
def warmup(ctx: OpContext, modules: list[str]) -> dict[str, Any]:
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TypeError("warmup 'modules' must be a list of module names")
    timings: dict[str, float] = {}
    for name in modules:
        start = time.perf_counter()
        importlib.import_module(name)
        timings[name] = time.perf_counter() - start
    return {"imported": timings}


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _gpu_info() -> dict[str, Any] | None:
    """GPU memory of this kernel, only when torch is already loaded (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return {"available": False}
        return {
            "available": True,
            "allocated": int(torch.cuda.memory_allocated()),
            "reserved": int(torch.cuda.memory_reserved()),
        }
    except Exception as exc:  # a broken CUDA setup must not break health
        return {"available": False, "error": str(exc)}


@op("health")
def health(ctx: OpContext) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "rss": _rss_bytes(),
        "uptime": time.time() - STATE.started,
        "ops_served": STATE.ops_served,
        "calls_served": STATE.calls_served,
        "sessions": sorted(STATE.sessions),
        "heavy_modules": [m for m in HEAVY_MODULES if m in sys.modules],
        "gpu": _gpu_info(),
    }


@op("clear_gpu_cache")
def clear_gpu_cache(ctx: OpContext) -> dict[str, Any]:
    collected = gc.collect()
    torch = sys.modules.get("torch")
    cleared = False
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        cleared = True
    return {"gc_collected": collected, "cuda_cache_cleared": cleared}
