"""The notebook's side of a run's evaluations on another pool (``eval_pool=``).

The notebook-side core is the hub: it owns the pools. A run kernel asks for an evaluation
with an ``eval_request`` event (``runtime/eval_remote.py``); ``EvalDispatcher`` holds one
session per eval kernel for the run's lifetime (each set up once with the run's program,
metric and LM: ``runtime/eval_shard.py``), cuts the examples into one contiguous shard per
kernel, and answers with the per-example results in the request's order and the usage the
kernels spent. A kernel that dies holding a shard has that shard redone on another kernel
(and the pool's replacement is taken into the dispatcher once it is up): an example is
never lost, never scored 0 for it. Only when no eval kernel is left does the request fail,
and the run stops, resumably.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import DspexError, KernelDied, PoolExhausted
from .pool import Pool
from .session import Session

logger = logging.getLogger("dspex_jupyter.eval")

SHARD_OPS = "dspex_jupyter.runtime.eval_shard"
Answer = Callable[[int, dict[str, Any]], Awaitable[Any]]
# How long a request waits for the first eval kernel (another run may hold the pool).
FIRST_SESSION_TIMEOUT_S = 600.0
# How long the dispatcher waits for a dead kernel's replacement before going on without it.
REPLACEMENT_TIMEOUT_S = 120.0
# A shard that has killed this many kernels (it runs them out of memory, say) is not sent
# to another: the evaluation fails and the run stops, resumably.
MAX_SHARD_DEATHS = 3


class EvalDispatcher:
    """One run's evaluations on ``pool``: sessions, shards, kernel deaths, answers."""

    def __init__(
        self,
        pool: Pool,
        *,
        run_id: str,
        spec: dict[str, Any],
        data: dict[str, Any],
        objects: dict[str, Any],
        allowed: list[str],
        kernels: int,
        on_shard: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.run_id = run_id
        self._setup_args = (spec, data, objects, list(allowed))
        self.kernels = kernels  # how many kernels of the pool the run may hold
        self._on_shard = on_shard
        self._sessions: list[Session] = []
        self._lock = asyncio.Lock()  # one evaluation at a time, as the run asks them
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._deaths: dict[int, int] = {}  # per shard of the evaluation in flight
        self._busy: set[Session] = set()  # sessions with a shard in flight
        self.shards_redone = 0

    # ---- the run's requests -------------------------------------------------------------
    def submit(self, event: dict[str, Any], answer: Answer) -> None:
        """Handle an ``eval_request`` event (called on the loop, from the event stream);
        ``answer(number, payload)`` delivers the outcome to the kernel that asked."""
        task = asyncio.get_running_loop().create_task(self._handle(event, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, event: dict[str, Any], answer: Answer) -> None:
        number = int(event["request"])
        try:
            async with self._lock:
                payload = await self.evaluate(
                    event["program_state"], event["examples"], int(event.get("num_threads") or 1)
                )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # no kernel left, or set-up failed: the run stops
            logger.warning("evaluation %s of run %s failed: %s", number, self.run_id, exc)
            payload = {"failed": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(DspexError):  # the run's kernel died: its resume re-asks
            await answer(number, payload)

    async def evaluate(
        self, program_state: dict[str, Any], refs: list[Any], num_threads: int
    ) -> dict[str, Any]:
        """Score ``refs`` with the candidate on the eval kernels; results in ``refs`` order."""
        await self._fill()
        if not self._sessions:
            raise KernelDied(f"no kernel of eval pool {self.pool.name!r} is available")
        count = len(self._sessions)
        size = -(-len(refs) // count)
        queue: asyncio.Queue[tuple[int, list[Any]]] = asyncio.Queue()
        for start in range(0, len(refs), size):
            queue.put_nowait((start, refs[start : start + size]))
        threads = max(1, -(-num_threads // count))  # the run's concurrency, split
        done: dict[int, dict[str, Any]] = {}
        self._deaths: dict[int, int] = {}
        workers = [
            asyncio.create_task(self._work(session, queue, done, program_state, threads))
            for session in list(self._sessions)
        ]
        try:
            await asyncio.gather(*workers)
            while not queue.empty():  # every kernel that held a shard died: take others
                await self._fill(wait=True)
                if not self._sessions:
                    raise KernelDied(f"every kernel of eval pool {self.pool.name!r} died")
                workers = [
                    asyncio.create_task(self._work(s, queue, done, program_state, threads))
                    for s in list(self._sessions)
                ]
                await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
        results: list[Any] = []
        usage: list[Any] = []
        metric_calls = cached = 0
        for start in sorted(done):
            part = done[start]
            results.extend(part["results"])
            usage.extend(part["usage"])
            metric_calls += int(part["metric_calls"])
            cached += int(part["cached_calls"])
        return {
            "results": results,
            "usage": usage,
            "metric_calls": metric_calls,
            "cached_calls": cached,
        }

    async def _work(
        self,
        session: Session,
        queue: asyncio.Queue[tuple[int, list[Any]]],
        done: dict[int, dict[str, Any]],
        program_state: dict[str, Any],
        threads: int,
    ) -> None:
        while not queue.empty():
            start, refs = queue.get_nowait()
            if self._on_shard is not None:
                self._on_shard({"kernel_pid": session.pid, "start": start, "examples": len(refs)})
            self._busy.add(session)
            try:
                done[start] = await session.acall(
                    f"{SHARD_OPS}:evaluate_shard", self.run_id, program_state, refs, threads
                )
                self._busy.discard(session)  # not on cancel: that kernel is still at work
            except KernelDied as exc:
                self._drop(session)
                deaths = self._deaths[start] = self._deaths.get(start, 0) + 1
                if deaths >= MAX_SHARD_DEATHS:
                    raise KernelDied(
                        f"the shard of examples {start}-{start + len(refs) - 1} was held by "
                        f"{deaths} eval kernels that died ({exc})"
                    ) from exc
                queue.put_nowait((start, refs))  # redone on another kernel, never a zero
                self.shards_redone += 1
                return

    # ---- the kernels ---------------------------------------------------------------------
    def _drop(self, session: Session) -> None:
        if session in self._sessions:
            self._sessions.remove(session)

    async def _fill(self, *, wait: bool = False) -> None:
        """Hold up to ``kernels`` sessions, each set up for the run. The first one is
        waited for (another run may hold the pool); then what is free now is taken, and a
        dead kernel's replacement once the pool has it (``wait``)."""
        self._sessions = [s for s in self._sessions if s.active]
        while len(self._sessions) < self.kernels and not self._closed:
            if not self._sessions:
                timeout = REPLACEMENT_TIMEOUT_S if wait else FIRST_SESSION_TIMEOUT_S
            else:
                timeout = 0.0
            try:
                session = await self.pool.asession(None, timeout=timeout, call_timeout=None)
            except PoolExhausted:
                return
            try:
                await session.acall(f"{SHARD_OPS}:setup", self.run_id, *self._setup_args)
            except KernelDied:
                await self._release(session)
                continue
            except BaseException:
                await self._release(session)
                raise
            self._sessions.append(session)

    async def _release(self, session: Session) -> None:
        with contextlib.suppress(DspexError):
            if session.active:
                await session.arelease()

    async def aclose(self) -> None:
        """The run ended: forget it in the eval kernels and give them back to the pool."""
        self._closed = True
        pending = list(self._tasks)
        for task in pending:
            task.cancel()  # interrupts the shards in flight (the run no longer waits)
        await asyncio.gather(*pending, return_exceptions=True)
        for session in self._sessions:
            # A kernel still at an interrupted shard is given back without waiting for it
            # (a metric stuck in C code would hold cancel() up); it keeps the run's set-up,
            # which its next runs' set-ups push out (eval_shard.KEEP_SETUPS).
            if session not in self._busy:
                with contextlib.suppress(DspexError):
                    if session.active:
                        await session.acall(f"{SHARD_OPS}:teardown", self.run_id)
            await self._release(session)
        self._sessions = []
