"""The figures kernels report about themselves (``runtime/health.py``), for kernels that are
not on this machine: no /proc, pidfd or NVML here can see them.

Each such kernel gets one feed: a stream of its figures (memory of its process tree, CPU,
GPU memory, host) that the kernel's stream threads publish every 0.5 s, every 50 ms near
its pool's ``max_memory``, also while its main thread runs a call. The pool's health and its
memory limit read the latest figures; listeners (the memory limit) see each one as it comes.
A feed ends with its kernel (its stream fails when the kernel dies or is shut down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import exchange
from ..protocol import encode_function

if TYPE_CHECKING:
    from .worker import KernelWorker

FEED_FUNCTION = "dspex_jupyter.runtime.health:figures_feed"
# The kernel publishes a figure every 0.5 s at most 20 a second near the limit: acks every
# this many let it drop what was delivered (they queue while its main thread is busy, and
# the window below keeps it publishing meanwhile).
ACK_EVERY = 20
FEED_WINDOW = 1_000_000
logger = logging.getLogger("dspex_jupyter.kernel_figures")

Listener = Callable[["KernelWorker", dict[str, Any]], None]


def reports_figures(worker: KernelWorker) -> bool:
    """Whether the pool takes this kernel's figures from the kernel itself rather than from
    this machine's /proc: the one switch (a kernel with no local process is elsewhere)."""
    return not worker.is_local


class _Feed:
    def __init__(self, worker: KernelWorker, limit: int | None) -> None:
        self.worker = worker
        self.limit = limit
        self.latest: dict[str, Any] | None = None
        self.listeners: list[Listener] = []
        self.first = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        worker = self.worker
        stream_id = f"figures-{uuid.uuid4().hex[:12]}"
        out = exchange.Outgoing(worker.exchange)
        request = {
            "stream_id": stream_id,
            "func": encode_function(FEED_FUNCTION, out.buffers),
            "payload": out.encode_call((), {"limit": self.limit}),
            "window": FEED_WINDOW,
            "batch_items": 64,
        }
        channel = worker.open_stream(stream_id, ack_every=ACK_EVERY)
        try:
            await worker.request("stream_open", request, buffers=out.buffers)
            while (batch := await channel.next_batch()) is not None:
                if batch:
                    self._update(batch[-1])  # the newest: older ones are history
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the kernel died or was shut down: the feed ends with it
            logger.debug("kernel %s: figures feed ended: %s", worker.id, exc)
        finally:
            out.discard()
            worker.forget_stream(stream_id)
            if not self.first.done():
                self.first.set_result(None)

    def _update(self, figures: dict[str, Any]) -> None:
        self.latest = figures
        if not self.first.done():
            self.first.set_result(figures)
        for listener in list(self.listeners):
            try:
                listener(self.worker, figures)
            except Exception:  # a listener's bug must not stop the feed
                logger.exception("kernel %s: figures listener failed", self.worker.id)


_FEEDS: dict[KernelWorker, _Feed] = {}


def follow(
    worker: KernelWorker, *, limit: int | None = None, listener: Listener | None = None
) -> None:
    """Start ``worker``'s feed if it has none (on the manager's loop), and call ``listener``
    with each figure. ``limit``: the pool's max_memory, near which the kernel samples faster."""
    feed = _FEEDS.get(worker)
    if feed is None or feed.task.done():
        feed = _FEEDS[worker] = _Feed(worker, limit)
        worker.when_gone.append(lambda: _stop(worker))
    if listener is not None and listener not in feed.listeners:
        feed.listeners.append(listener)


def unfollow(worker: KernelWorker, listener: Listener) -> None:
    feed = _FEEDS.get(worker)
    if feed is not None:
        with contextlib.suppress(ValueError):
            feed.listeners.remove(listener)


def latest(worker: KernelWorker) -> dict[str, Any] | None:
    """The newest figures ``worker`` reported, or None before the first."""
    feed = _FEEDS.get(worker)
    return feed.latest if feed is not None else None


async def first(worker: KernelWorker, timeout: float) -> dict[str, Any] | None:
    """The newest figures, waiting up to ``timeout`` s for the first (a kernel busy with a
    call when its feed was asked for answers once it is free)."""
    feed = _FEEDS.get(worker)
    if feed is None:
        return None
    if feed.latest is None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(feed.first), timeout)
    return feed.latest


def _stop(worker: KernelWorker) -> None:
    feed = _FEEDS.pop(worker, None)
    if feed is not None and not feed.task.done():
        feed.task.cancel()
