"""The comm endpoint inside a pool kernel: validate, dispatch to the op registry, reply.

Nothing that arrives may take the kernel down: every failure becomes an error reply.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from .. import exchange, protocol
from .lm_failures import lm_failure_details
from .ops import OpContext, Sender
from .registry import get_op
from .reply_log import ReplyLog
from .state import STATE

_installed = False


@functools.cache
def _signature(handler: Any) -> inspect.Signature:
    return inspect.signature(handler)


def handle_message(
    data: Any, buffers: list[Any], send: Sender | None = None, replies: ReplyLog | None = None
) -> tuple[dict[str, Any], list[bytes]]:
    """Answer one request; the pure core of the comm handler (tested without a kernel).

    ``send`` lets an op publish messages of its own later (streams do, from a thread);
    ``replies`` is the comm's reply log (ops ``hello`` and ``replies`` use it).
    """
    req_id = data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else ""
    try:
        request = protocol.parse_request(data)
    except protocol.ProtocolError as exc:
        return protocol.make_error(req_id, exc.kind, "ProtocolError", str(exc)), []
    handler = get_op(request.op)
    if handler is None:
        from .registry import OPS

        return (
            protocol.make_error(
                request.id,
                protocol.KIND_UNKNOWN_OP,
                "UnknownOp",
                f"unknown op {request.op!r}; this runtime knows: {', '.join(sorted(OPS))}",
            ),
            [],
        )
    ctx = OpContext(request, buffers, send, replies=replies)
    try:
        _signature(handler).bind(ctx, **request.args)
    except TypeError as exc:
        return protocol.make_error(
            request.id, protocol.KIND_PROTOCOL, "ProtocolError", f"op {request.op!r}: {exc}"
        ), []
    STATE.ops_served += 1
    try:
        result = handler(ctx, **request.args)
    except protocol.ProtocolError as exc:
        return protocol.make_error(request.id, exc.kind, "ProtocolError", str(exc)), []
    except BaseException as exc:  # KeyboardInterrupt (an interrupt) and SystemExit included
        reply = protocol.error_from_exception(request.id, exc)
        # An LM provider's failure (key, rate limit, outage...) is named for the notebook side.
        reply["error"]["details"].update(lm_failure_details(exc))
        return reply, []
    return protocol.make_reply(request.id, result), ctx.out_buffers


def _on_comm_open(comm: Any, open_msg: dict[str, Any]) -> None:
    # Big buffers to and from a kernel on another machine travel in pieces
    # (exchange.send_in_pieces): the client says how big a reply's pieces may be.
    pieces = exchange.PieceReceiver()
    # Replies kept for a client over a gateway's websocket (off until hello asks for it).
    replies = ReplyLog()

    def on_msg(msg: dict[str, Any]) -> None:
        content = msg.get("content") or {}
        data = content.get("data")
        buffers = list(msg.get("buffers") or [])
        if pieces.is_piece(data):
            pieces.piece(data, buffers)
            return
        req_id = str(data.get("id", "")) if isinstance(data, dict) else ""
        wants_reply = not (isinstance(data, dict) and data.get("noreply") is True)
        if replies.enabled and isinstance(data, dict):
            replies.acknowledge(data.get("acked"))
            if wants_reply:
                replies.started(req_id)
        try:
            buffers = pieces.take(data, buffers)
        except exchange.ExchangeError as exc:
            error = protocol.error_from_exception(req_id, exc)
            if wants_reply:
                replies.answered(req_id, error, [], None)
            comm.send(data=error)
            return
        reply, buffers = handle_message(data, buffers, send, replies)
        if wants_reply or not reply["ok"]:
            chunk_max = data.get("chunk_max") if isinstance(data, dict) else None
            chunk_max = chunk_max if type(chunk_max) is int and chunk_max > 0 else None
            if wants_reply:
                replies.answered(req_id, reply, buffers, chunk_max)
            exchange.send_in_pieces(_comm_send(comm), reply, buffers, chunk_max)

    def send(data: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        # Safe from any thread: ipykernel hands IOPub sends to its IOPub thread.
        comm.send(data=data, buffers=buffers or None)

    comm.on_msg(on_msg)


def _comm_send(comm: Any) -> Any:
    def send_one(data: dict[str, Any], buffers: list[Any]) -> None:
        comm.send(data=data, buffers=buffers or None)

    return send_one


def install() -> None:
    """Register the ``dspex`` comm target in the running IPython kernel (idempotent)."""
    global _installed
    if _installed:
        return
    from IPython import get_ipython

    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        raise RuntimeError("dspex_jupyter.runtime.install() must run inside an IPython kernel")
    kernel.comm_manager.register_target(protocol.COMM_TARGET, _on_comm_open)
    _installed = True
