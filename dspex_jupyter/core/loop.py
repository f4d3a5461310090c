"""The manager's event-loop thread: one asyncio core, reached from sync and async callers.

Pool housekeeping (reading kernel sockets, noticing dead kernels) runs here, so it goes on
while a notebook cell blocks on a result, and a blocked cell never stalls it. Whatever may
take milliseconds (walking model caches, NVML, encoding or decoding a large value) goes to
``offload``'s threads instead, so one slow step never delays every call and stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
# Threads for blocking work: a few, since what they run (file I/O, memcpy, NVML) mostly
# releases the GIL, and large values of concurrent calls should not queue behind each other.
OFFLOAD_THREADS = 4


class LoopThread:
    """A daemon thread running one asyncio loop until ``stop()``."""

    def __init__(self, name: str = "dspex-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._offload = concurrent.futures.ThreadPoolExecutor(
            max_workers=OFFLOAD_THREADS, thread_name_prefix=f"{name}-offload"
        )
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        # Let anything still scheduled finish its cleanup before the loop closes.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()
        self._offload.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self.running:
            coro.close()
            raise RuntimeError("the dspex event loop has stopped (the manager was shut down)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop thread and block the calling thread for its result."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(
                "a blocking dspex call was made from the dspex event loop; use the async twin "
                "(acall, asession, ...) there"
            )
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except KeyboardInterrupt:
            # Ctrl-C in the cell: the wait ends now and the work is cancelled; a call
            # cancelled while its kernel runs it interrupts that kernel (Pool._run_op).
            future.cancel()
            raise

    async def offload(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking ``func(*args)`` on a worker thread, so the loop stays free (await
        it on this loop). Only work that releases the GIL (I/O, most copies in numpy and
        Arrow, NVML) truly frees the loop; pure-Python work still competes for the GIL."""
        return await self.loop.run_in_executor(self._offload, func, *args)

    async def wrap(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from any event loop (the notebook's own included)."""
        if self.in_loop_thread():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        if self.running:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if not self.in_loop_thread():
                self._thread.join(timeout=10)
