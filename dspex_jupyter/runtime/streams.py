"""Streams out of a kernel: a generator's items, batched, numbered, flow-controlled.

Two threads per stream keep the kernel's main thread free (it must go on handling the
client's acknowledgements and ``stream_close``):

- the *producer* runs the generator and puts items into a bounded queue, so a slow
  consumer pauses the generator instead of growing memory;
- the *sender* drains the queue into batches (whatever is ready, up to ``batch_items``:
  one item at a time at low rates, big batches under load) and publishes each with a
  sequence number, never more than ``window`` batches beyond what the client consumed.

IOPub may drop messages under load, so sent batches are kept until consumed and resent
when the client reports a gap (``stream_resend``).
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict, deque
from typing import Any

from .. import protocol
from .ops import OpContext, _function, _in_session
from .registry import op
from .state import current_session

_END = object()
# A safety net only: every change a blocked thread waits for (an item, credit, cancel)
# notifies it. Short ticks cost a busy kernel dearly: each wake-up takes the GIL from the
# thread doing the work (at 50 ms, two stream threads slowed a MIPROv2 run by ~3 %).
_TICK_S = 1.0


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class KernelStream:
    """One generator being streamed to the client."""

    def __init__(self, stream_id: str, send: Any, window: int, batch_items: int) -> None:
        self.id = stream_id
        self._send = send
        self.window = window
        self.batch_items = batch_items
        self.cancelled = threading.Event()
        self.finished = threading.Event()  # the sender is done
        self.produced = threading.Event()  # the generator has returned or been closed
        self._items: deque[Any] = deque()
        self._queue_max = batch_items * 2
        self._cond = threading.Condition()
        self._sent: OrderedDict[int, tuple[dict[str, Any], list[bytes]]] = OrderedDict()
        self._next_seq = 0
        self._consumed = -1

    # ---- producer ---------------------------------------------------------------------
    def produce(self, iterator: Any) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    break
            else:
                self._put(_END, force=True)
        except BaseException as exc:  # the generator's own failure goes to the client
            self._put(_Failure(exc), force=True)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # runs the generator's finally blocks now, in this thread
            self.produced.set()

    def _put(self, item: Any, force: bool = False) -> bool:
        with self._cond:
            while not force and len(self._items) >= self._queue_max:
                if self.cancelled.is_set():
                    return False
                self._cond.wait(_TICK_S)
            if self.cancelled.is_set() and not force:
                return False
            self._items.append(item)
            self._cond.notify_all()
        return True

    # ---- sender -----------------------------------------------------------------------
    def send_loop(self) -> None:
        try:
            while not self.cancelled.is_set():
                batch, last = self._next_batch()
                if batch is None:
                    continue
                self._publish(batch, last)
                if last is not None:
                    return
        finally:
            self.finished.set()

    def _next_batch(self) -> tuple[list[Any] | None, Any]:
        with self._cond:
            while not self.cancelled.is_set() and (
                not self._items or self._next_seq - self._consumed > self.window
            ):
                self._cond.wait(_TICK_S)
            if self.cancelled.is_set():
                return None, None
            batch: list[Any] = []
            last: Any = None
            while self._items and len(batch) < self.batch_items:
                item = self._items.popleft()
                if item is _END or isinstance(item, _Failure):
                    last = item
                    break
                batch.append(item)
            self._cond.notify_all()
        return batch, last

    def _publish(self, batch: list[Any], last: Any) -> None:
        buffers: list[bytes] = []
        message: dict[str, Any] = {
            "v": protocol.PROTOCOL_VERSION,
            "stream": self.id,
            "seq": self._next_seq,
            "items": protocol.encode_value(batch, buffers),
            "end": last is not None,
        }
        if isinstance(last, _Failure):
            message["error"] = protocol.error_from_exception("", last.exc)["error"]
        with self._cond:
            self._sent[self._next_seq] = (message, buffers)
            self._next_seq += 1
        self._send(message, buffers)

    # ---- from the client (main thread) ------------------------------------------------
    def ack(self, consumed: int) -> None:
        with self._cond:
            self._consumed = max(self._consumed, consumed)
            for seq in list(self._sent):
                if seq <= self._consumed:
                    del self._sent[seq]
            self._cond.notify_all()

    def resend(self, from_seq: int) -> int:
        with self._cond:
            again = [m for s, m in self._sent.items() if s >= from_seq]
        for message, buffers in again:
            self._send(message, buffers)
        return len(again)

    def wait_consumed(self, timeout: float) -> None:
        """Keep sent batches (for a resend) until the client has consumed them all."""
        with self._cond:
            self._cond.wait_for(lambda: not self._sent or self.cancelled.is_set(), timeout)

    def cancel(self) -> None:
        self.cancelled.set()
        with self._cond:
            self._cond.notify_all()


STREAMS: dict[str, KernelStream] = {}


def _get(stream_id: str) -> KernelStream:
    stream = STREAMS.get(stream_id)
    if stream is None:
        raise LookupError(f"no stream {stream_id!r} in this kernel (it ended or was closed)")
    return stream


@op("stream_open")
def stream_open(
    ctx: OpContext,
    stream_id: str,
    func: Any,
    payload: Any,
    window: int = 16,
    batch_items: int = 1000,
) -> dict[str, Any]:
    if ctx.send is None:
        raise RuntimeError("streams need a comm to publish on")
    if not isinstance(stream_id, str) or not stream_id or stream_id in STREAMS:
        raise ValueError(f"invalid or duplicate stream id {stream_id!r}")
    for name, value in (("window", window), ("batch_items", batch_items)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stream {name} must be a positive integer, got {value!r}")
    target = _function(ctx, func)
    args, kwargs = ctx.decode(payload)
    record = _in_session(ctx)
    stream = KernelStream(stream_id, ctx.send, window, batch_items)

    def produce() -> None:
        current_session.set(record)
        stream.produce(iter(target(*args, **kwargs)))

    STREAMS[stream_id] = stream
    context = contextvars.copy_context()
    threading.Thread(
        target=context.run, args=(produce,), name=f"dspex-stream-{stream_id}", daemon=True
    ).start()
    threading.Thread(target=_send_then_forget, args=(stream,), daemon=True).start()
    return {"stream_id": stream_id}


def _send_then_forget(stream: KernelStream) -> None:
    stream.send_loop()
    stream.wait_consumed(timeout=60)
    STREAMS.pop(stream.id, None)


@op("stream_ack")
def stream_ack(ctx: OpContext, stream_id: str, consumed: int) -> dict[str, Any]:
    stream = STREAMS.get(stream_id)
    if stream is not None:
        stream.ack(int(consumed))
    return {}


@op("stream_resend")
def stream_resend(ctx: OpContext, stream_id: str, from_seq: int) -> dict[str, Any]:
    return {"resent": _get(stream_id).resend(int(from_seq))}


@op("stream_close")
def stream_close(ctx: OpContext, stream_id: str, wait: float = 2.0) -> dict[str, Any]:
    """Stop the generator: the producer sees the flag at its next item and closes it."""
    stream = STREAMS.pop(stream_id, None)
    if stream is None:
        return {"closed": True, "found": False}
    stream.cancel()
    closed = stream.produced.wait(wait) and stream.finished.wait(wait)
    return {"closed": closed, "found": True}
