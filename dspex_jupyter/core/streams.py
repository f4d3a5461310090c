"""Streams from a session's kernel: lossless, ordered, flow-controlled, cancellable.

The kernel numbers its batches; this side puts them back in order, asks for a resend when
one is missing (IOPub drops messages under load) or when nothing has come for a while,
and grants credit only as the consumer takes batches, so a slow consumer pauses the
generator in the kernel instead of filling memory here.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from .. import protocol

if TYPE_CHECKING:
    from .session import Session
    from .worker import KernelWorker

# With no batch for this long, ask the kernel to resend from the first missing one: it
# covers a lost last batch. A resend of nothing costs one small message.
RESEND_AFTER_S = 1.0


class StreamChannel:
    """Loop-thread state of one stream: reorders batches and hands them out."""

    def __init__(self, worker: KernelWorker, stream_id: str, ack_every: int = 1) -> None:
        self.worker = worker
        self.id = stream_id
        self.ack_every = ack_every
        self.expected = 0
        self._acked = -1
        self.ended = False
        self.error: BaseException | None = None
        self.gaps = 0
        self._ready: deque[tuple[int, list[Any]]] = deque()
        self._early: dict[int, tuple[list[Any], bool, dict[str, Any] | None]] = {}
        self._event = asyncio.Event()

    def on_message(self, data: dict[str, Any], buffers: list[Any]) -> None:
        seq = data.get("seq")
        if not isinstance(seq, int) or seq < self.expected or seq in self._early:
            return  # a duplicate from a resend
        try:
            items = protocol.decode_value(data.get("items"), buffers)
        except Exception as exc:
            self.fail(exc)
            return
        entry = (items, bool(data.get("end")), data.get("error"))
        if seq > self.expected:
            self._early[seq] = entry
            self.gaps += 1
            self._resend()
            return
        self._accept(seq, entry)
        while self.expected in self._early:
            self._accept(self.expected, self._early.pop(self.expected))

    def _accept(self, seq: int, entry: tuple[list[Any], bool, dict[str, Any] | None]) -> None:
        items, end, error = entry
        self._ready.append((seq, items))
        self.expected = seq + 1
        if end:
            self.ended = True
            if error:
                self.error = self.worker.error_from_reply(error)
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        if not self.ended:
            self.ended = True
            self.error = exc
        self._event.set()

    def _resend(self) -> None:
        self.worker.notify("stream_resend", {"stream_id": self.id, "from_seq": self.expected})

    async def next_batch(self) -> list[Any] | None:
        """The next batch in order; None at the end; the remote error after the items."""
        while not self._ready:
            if self.ended:
                if self.error is not None:
                    raise self.error
                return None
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), RESEND_AFTER_S)
            except asyncio.TimeoutError:
                if not self.ended and self.worker.state != "dead":
                    self._resend()
        seq, items = self._ready.popleft()
        # Credit is granted as the consumer takes batches, not as they arrive: one
        # message per ``ack_every`` batches (each costs the kernel a shell message and two
        # IOPub status messages), and at once for the last, which the kernel waits for.
        if seq - self._acked >= self.ack_every or (self.ended and not self._ready):
            self._acked = seq
            self.worker.notify("stream_ack", {"stream_id": self.id, "consumed": seq})
        return items


class Stream:
    """Items of a generator running in a session's kernel, for ``for`` and ``async for``.

    Leaving the loop early, or ``close()``, stops the generator in the kernel.
    """

    def __init__(
        self,
        session: Session,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        window: int = 16,
        batch_items: int = 1000,
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self._session = session
        self._runner = session._runner
        self._channel: StreamChannel | None = None
        self._closed = False
        self._request = (func, args, kwargs, window, batch_items)

    def __repr__(self) -> str:
        return f"<Stream {self.id} session={self._session.id} closed={self._closed}>"

    @property
    def gaps(self) -> int:
        """How many times a batch arrived early (one before it was lost) and was resent."""
        return self._channel.gaps if self._channel else 0

    async def _open(self) -> StreamChannel:
        if self._channel is None:
            func, args, kwargs, window, batch_items = self._request
            self._channel = await self._session._open_stream(
                self.id, func, args, kwargs, window, batch_items
            )
        return self._channel

    async def _next(self) -> list[Any] | None:
        channel = await self._open()
        return await channel.next_batch()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        channel = self._channel
        if channel is None:
            return
        self._session._worker.forget_stream(self.id)
        if not channel.ended and self._session._worker.state != "dead":
            with contextlib.suppress(Exception):
                await self._session._worker.request("stream_close", {"stream_id": self.id})

    def __iter__(self) -> Iterator[Any]:
        try:
            while not self._closed and (batch := self._runner.run(self._next())) is not None:
                yield from batch
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while not self._closed and (batch := await self._runner.wrap(self._next())) is not None:
                for item in batch:
                    yield item
        finally:
            await self.aclose()

    def close(self) -> None:
        """Stop the generator in the kernel (if it still runs); the session stays usable."""
        if self._closed or not self._runner.running:
            return
        if self._runner.in_loop_thread():
            self._session._pool._spawn(self._close())
        else:
            self._runner.run(self._close())

    async def aclose(self) -> None:
        await self._runner.wrap(self._close())

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
