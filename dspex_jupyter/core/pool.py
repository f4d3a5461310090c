"""A pool: N kernels from one source, handed out for calls and exclusive sessions.

The design is Kernel Gateway's pre-spawned pool (start N, acquire, release) plus
supervision: a dead kernel fails its callers at once and is replaced. Everything with a
leading underscore runs on the manager's loop thread; the public methods are the sync
facade and their ``a``-prefixed async twins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import exchange
from ..protocol import encode_function
from . import kernel_figures, kernel_source
from .errors import (
    CallTimeout,
    DspexError,
    GpuOutOfMemory,
    PoolClosed,
    PoolExhausted,
    PoolStartError,
)
from .exchange_dirs import ExchangeArea
from .launch import KernelSource, kernel_environment
from .loop import LoopThread
from .memory_limits import MemoryLimits, memory_limits
from .memory_limits import process_tree_rss as _proc_tree_rss
from .spec import PoolSpec, format_bytes, format_limit, format_used
from .worker import KernelWorker

if TYPE_CHECKING:
    from .session import Session

# A kernel interrupted (a timeout, Ctrl-C) gets this long to answer before it is replaced.
INTERRUPT_GRACE_S = 5.0
# Values at least this big (bytes), or containers this long, are encoded and decoded on a
# worker thread: that takes milliseconds, which would stall every call and stream on the
# loop. Smaller ones stay on the loop: a thread hop would cost more than they take.
OFFLOAD_MIN_BYTES = 1_000_000
OFFLOAD_MIN_ITEMS = 100  # lists of this many dicts become Arrow tables (exchange.py)
# Replacement of a kernel that fails to start backs off up to this delay.
MAX_RESTART_BACKOFF_S = 30.0
# This many deaths in a row of kernels younger than this that served nothing: a crash loop.
CRASH_LOOP_DEATHS = 3
CRASH_LOOP_UPTIME_S = 10.0
# A kernel that is not local (another provisioner) is asked whether it still runs this
# often: no pidfd can watch a process on another machine (core/kernel_source.py).
PROVISIONER_POLL_INTERVAL_S = kernel_source.PROVISIONER_POLL_INTERVAL_S
# How long a replacement kernel may take to start.
REPLACEMENT_START_TIMEOUT_S = 60.0
# How many kernel events (Pool.kernel_events) are kept.
KERNEL_EVENTS_KEPT = 1000
# A health call waits at most this long for the first figures of a kernel on another
# machine (its feed starts with the first call; a busy kernel answers once free).
REPORTED_FIGURES_WAIT_S = 1.0
logger = logging.getLogger("dspex_jupyter.pool")


def process_tree_rss(pid: int | None) -> int:
    """RSS of a kernel and its descendants (what the /proc memory watch measures)."""
    return _proc_tree_rss(pid)


class Pool:
    """A set of managed kernels started from one Python environment."""

    def __init__(
        self,
        spec: PoolSpec,
        source: KernelSource,
        runner: LoopThread,
        runtime_dir: Path,
        exchange_area: ExchangeArea | None = None,
    ):
        self.spec = spec
        self.name = spec.name
        self.source = source
        self._runner = runner
        self._runtime_dir = runtime_dir
        self._env = kernel_environment(spec, source)
        # Where values bigger than a message travel (None: in message buffers only).
        self._exchange = exchange_area
        self._workers: list[KernelWorker] = []
        self._idle: deque[KernelWorker] = deque()
        self._waiters: deque[asyncio.Future[KernelWorker]] = deque()
        self._sessions: dict[str, Session] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # jupyter_client's transport_encryption for this pool's kernels (set at start).
        self._encryption = "disabled"
        self._closed = False
        self._full = asyncio.Event()
        self.deaths = 0
        self.last_error = ""
        self.warnings: list[str] = []
        self.recoveries: list[dict[str, Any]] = []  # what the recovery policy did, in order
        # Crash-loop detection: kernels that die young without serving anything.
        self._early_deaths = 0
        self.backoff_until = 0.0
        self._start_failures = 0  # replacements in a row that failed to start
        self._size_changed = asyncio.Event()  # a kernel was counted out: _keep_size looks
        self._memory: MemoryLimits | None = None  # enforces max_memory, when set
        # Each kernel starting, launched, ready, died or gone, with how many kernels the
        # pool then holds (live and starting): never more than its size.
        self.kernel_events: deque[dict[str, Any]] = deque(maxlen=KERNEL_EVENTS_KEPT)
        self._kernel_listeners: list[Callable[[dict[str, Any]], None]] = []

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} size={self.spec.size} source={self.source.description!r}>"

    # ---- starting and supervising ---------------------------------------------------
    def add_kernel_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(event)`` on the manager's loop thread for every kernel event
        (see ``kernel_events``). For dashboards and tests; it must not block."""
        self._kernel_listeners.append(listener)

    def _kernel_event(self, event: str, worker: KernelWorker) -> None:
        record = {
            "time": time.time(),
            "event": event,
            "kernel": worker.id,
            "pid": worker.pid,
            "kernels": len(self._workers),
        }
        self.kernel_events.append(record)
        for listener in list(self._kernel_listeners):
            try:
                listener(record)
            except Exception:  # a listener's bug must not stop supervision
                logger.exception("pool %s: kernel listener failed", self.name)

    def _on_memory_breach(self, worker: KernelWorker, used: int) -> None:
        """Stop a kernel past ``max_memory``: its caller gets MemoryLimitExceeded and the
        pool replaces it."""
        limit = self.spec.max_memory_bytes
        if worker.state == "dead" or worker.memory_exceeded is not None or limit is None:
            return
        worker.memory_exceeded = (used, limit)
        worker.kill()

    def _on_memory_warning(self, worker: KernelWorker, used: int) -> None:
        limit = self.spec.max_memory_bytes or 0
        message = (
            f"kernel {worker.id} of pool {self.name!r} uses {format_used(used, limit)}, "
            f"over 90% of its max_memory {format_limit(limit)}"
        )
        self.warnings.append(message)
        logger.warning(message)

    async def _start(self, timeout: float) -> None:
        # Before anything starts: a pool whose kernels would talk unencrypted over a
        # network refuses here (TransportNotEncrypted), unless it opted out by name; a
        # gateway pool's token and kernelspec are checked once (core/launch.py).
        self._encryption = await self.source.prepare(self.name, self.spec.allow_unencrypted)
        limit = self.spec.max_memory_bytes
        if limit is not None:
            self._memory = memory_limits(limit, self._on_memory_breach, self._on_memory_warning)
        workers = [self._new_worker() for _ in range(self.spec.size)]
        results = await asyncio.gather(
            *(self._start_worker(w, timeout) for w in workers), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            first = errors[0]
            # The kernel's own error, without its hint: that becomes this error's hint.
            detail = first.args[0] if isinstance(first, DspexError) and first.args else first
            raise PoolStartError(
                f"pool {self.name!r}: {len(errors)} of {self.spec.size} kernels failed to start: "
                f"{detail}",
                hint=getattr(first, "hint", "") or PoolStartError.hint,
            ) from first
        self._spawn(self._keep_size())

    def _new_worker(self) -> KernelWorker:
        """A kernel that counts in the pool from now on, while it starts too: the size is
        checked against this count, so a death during a start cannot start one too many."""
        worker = KernelWorker(
            self.name, self.source, self._env, self._runtime_dir, self._encryption
        )
        self._workers.append(worker)
        if self._memory is not None:
            self._memory.prepare(worker)
        self._kernel_event("starting", worker)
        return worker

    async def _start_worker(self, worker: KernelWorker, timeout: float) -> KernelWorker:
        try:
            # Watch the process as soon as it exists, so a crash during start-up is seen.
            await worker.start(timeout, on_launch=self._watch)
            if self._memory is not None and worker.state != "dead":
                self._memory.watch(worker)
            await self._prepare(worker)
        except BaseException:
            self._forget(worker)
            await worker.shutdown(now=True)
            raise
        self._release(worker)
        self._kernel_event("ready", worker)
        return worker

    async def _prepare(self, worker: KernelWorker) -> None:
        """Warm-up imports, then start-up code, before the kernel takes any work."""
        await self._configure_exchange(worker)
        if not worker.is_local and self.spec.env_vars:
            # A remote kernel's environment is its host's plus its kernelspec's "env": the
            # pool's variables (API keys) follow over the encrypted channel.
            await worker.request("environ", {"variables": dict(self.spec.env_vars)})
        if self.spec.warmup:
            await worker.request("warmup", {"modules": list(self.spec.warmup)})
        if self.spec.startup:
            reply = await worker.execute(self.spec.startup)
            if reply.get("status") != "ok":
                trace = "\n".join(reply.get("traceback") or [])
                raise PoolStartError(
                    f"pool {self.name!r}: start-up code failed in kernel {worker.id}: "
                    f"{reply.get('ename')}: {reply.get('evalue')}\n{trace}"
                )

    def _watch(self, worker: KernelWorker) -> None:
        """Be told when a kernel dies, as its kernel source sees it: at once through a
        pidfd for a local kernel; through the provisioner's poll and the heartbeat channel,
        each every second, for a kernel elsewhere."""
        assert worker.kernel is not None
        worker.kernel.watch(lambda code: self._check_worker(worker, code))
        self._kernel_event("launched", worker)

    def _check_worker(self, worker: KernelWorker, code: int | None) -> None:
        if worker.state == "dead":
            return
        if worker.state == "stopping" or self._closed:
            self._unwatch(worker)
            return
        self._on_death(worker, code)

    def _unwatch(self, worker: KernelWorker) -> None:
        if self._memory is not None:
            self._memory.unwatch(worker)
        if worker.kernel is not None:
            worker.kernel.unwatch()

    async def _configure_exchange(self, worker: KernelWorker) -> None:
        """Give the kernel its private exchange folder; a kernel that cannot see it (not
        on this machine) gets every value in message buffers instead."""
        area = self._exchange
        if area is None:
            return
        # Only a kernel on this machine is offered a folder; one elsewhere might see a
        # folder of the same name (a shared disk) but never this machine's memory.
        folder = area.kernel_folder(self.name, worker.number) if worker.is_local else None
        reply, _ = await worker.request("configure_exchange", area.configure_args(folder))
        shared = bool(reply.get("shared_memory"))
        if not shared:
            area.remove_kernel(self.name, worker.number)
        worker.exchange = exchange.ExchangeConfig(
            inline_max=area.config.inline_max,
            file_max=area.config.file_max,
            folder=str(folder) if shared and folder is not None else None,
            shared_memory=shared,
            arrow=bool(reply.get("arrow")),
        )

    def _forget(self, worker: KernelWorker) -> None:
        if self._exchange is not None:  # whatever a dead kernel was writing goes too
            self._exchange.remove_kernel(self.name, worker.number)
        self._unwatch(worker)
        if worker in self._workers:
            self._workers.remove(worker)
            self._kernel_event("gone", worker)
            self._size_changed.set()
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        self._update_full()

    def _on_death(self, worker: KernelWorker, code: int) -> None:
        self.deaths += 1
        if worker.memory_exceeded is None and self._memory is not None:
            # The OS may have stopped it (cgroup OOM) before its breach event was read.
            used = self._memory.breach_at_death(worker)
            if used is not None:
                worker.memory_exceeded = (used, self._memory.limit)
        session = self._sessions.get(worker.session or "")
        if session is not None:
            session._lost = True
        young = time.time() - worker.started_at < CRASH_LOOP_UPTIME_S
        self._early_deaths = self._early_deaths + 1 if young and not worker.calls_served else 0
        if worker.memory_exceeded:
            rss, limit = worker.memory_exceeded
            self.last_error = (
                f"kernel {worker.id} passed max_memory ({format_used(rss, limit)} > "
                f"{format_limit(limit)}) and was replaced"
            )
        worker.mark_dead(code)
        self._kernel_event("died", worker)
        self._forget(worker)  # _keep_size starts its replacement
        self._spawn(worker.shutdown(now=True))  # removes its connection file and sockets

    def _crash_loop_delay(self) -> float:
        """Kernels that keep dying right after start are restarted ever more slowly."""
        if self._early_deaths < CRASH_LOOP_DEATHS:
            return 0.0
        delay = min(2.0 ** (self._early_deaths - CRASH_LOOP_DEATHS), MAX_RESTART_BACKOFF_S)
        self.last_error = (
            f"kernels of pool {self.name!r} keep dying ({self._early_deaths} in a row, each "
            f"within {CRASH_LOOP_UPTIME_S:g} s of starting, serving nothing); next restart "
            f"in {delay:g} s"
        )
        if self.last_error not in self.warnings:
            self.warnings.append(self.last_error)
        logger.warning(self.last_error)
        return delay

    def _failure_delay(self) -> float:
        """Replacements that keep failing to start are retried ever more slowly."""
        if not self._start_failures:
            return 0.0
        return min(0.5 * 2.0 ** (self._start_failures - 1), MAX_RESTART_BACKOFF_S)

    async def _keep_size(self) -> None:
        """The one place that starts replacements: as many as the size minus the kernels
        live or starting. Whatever the order of deaths and starts (a kernel killed while
        its replacement starts, a replacement killed while it starts), the pool never
        holds more kernels than its size."""
        while not self._closed:
            if len(self._workers) >= self.spec.size:
                self._size_changed.clear()
                await self._size_changed.wait()
                continue
            delay = max(self._crash_loop_delay(), self._failure_delay())
            if delay:
                self.backoff_until = time.time() + delay
                await asyncio.sleep(delay)  # back-off: a crash loop must not spin
            for _ in range(self.spec.size - len(self._workers)):
                self._spawn(self._replacement(self._new_worker()))

    async def _replacement(self, worker: KernelWorker) -> None:
        try:
            await self._start_worker(worker, REPLACEMENT_START_TIMEOUT_S)
        except Exception as exc:
            self._start_failures += 1
            self.last_error = f"replacement kernel failed to start: {exc}"
        else:
            self._start_failures = 0

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---- handing out kernels --------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} has been shut down", hint="start it again")

    def occupancy(self) -> str:
        in_sessions = [w.session for w in self._workers if w.session]
        busy = sum(1 for w in self._workers if w.state == "busy")
        starting = sum(1 for w in self._workers if w.state == "starting")
        parts = [f"{len(self._workers)} of {self.spec.size} kernels up"]
        parts.append(f"{len(in_sessions)} in sessions ({', '.join(in_sessions) or 'none'})")
        parts.append(f"{busy} busy with calls, {len(self._idle)} idle, {starting} starting")
        return "; ".join(parts)

    async def _acquire(self, timeout: float | None, purpose: str) -> KernelWorker:
        self._check_open()
        while self._idle:
            worker = self._idle.popleft()
            if worker.state == "idle":
                worker.state = "busy"
                return worker
        waiter: asyncio.Future[KernelWorker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        except asyncio.CancelledError:
            # The caller gave up (Ctrl-C on a map): a kernel handed over meanwhile goes back.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        raise PoolExhausted(
            f"no kernel of pool {self.name!r} became free for a {purpose} within {timeout:g} s: "
            f"{self.occupancy()}",
            hint="release a session, wait longer (timeout=...), or give the pool a larger size",
        )

    def _update_full(self) -> None:
        ready = [w for w in self._workers if w.state not in ("starting", "dead", "stopping")]
        if len(ready) >= self.spec.size:
            self._full.set()
        else:
            self._full.clear()

    def _release(self, worker: KernelWorker) -> None:
        if worker.state in ("dead", "stopping") or worker not in self._workers:
            return
        was_starting = worker.state == "starting"
        worker.session = None
        worker.state = "idle"
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                worker.state = "busy"
                waiter.set_result(worker)
                break
        else:
            self._idle.append(worker)
        if was_starting:
            self._update_full()

    def _release_when_quiet(self, worker: KernelWorker) -> None:
        if worker.inflight == 0:
            self._release(worker)
            return

        async def release_later() -> None:
            if not await worker.wait_quiet(INTERRUPT_GRACE_S):
                self.last_error = f"kernel {worker.id} ignored an interrupt; replaced"
                worker.kill()
                return
            self._release(worker)

        self._spawn(release_later())

    async def _run_op(
        self,
        worker: KernelWorker,
        op: str,
        args: dict[str, Any],
        buffers: list[bytes],
        *,
        session: str | None = None,
        timeout: float | None = None,
        outgoing: exchange.Outgoing | None = None,
        decode: bool = True,
    ) -> Any:
        """Send an op, wait for its reply and decode its result. Exchange files of the
        request that the kernel did not take are removed once it has answered; those of
        a reply nobody waits for any more, when it arrives.

        A caller that gives up (Ctrl-C in its cell, its task cancelled) interrupts the
        kernel, as Ctrl-C does in a notebook: the op stops there and the kernel keeps its
        state. The wait for the reply is not cancelled with the caller, so the kernel
        counts as busy until the interrupted op has answered (``_release_when_quiet``)."""
        task = asyncio.ensure_future(worker.request(op, args, session=session, buffers=buffers))
        if outgoing is not None:
            task.add_done_callback(lambda _: outgoing.discard())
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: _discard_reply(t, worker.exchange))
            if not task.done():
                self._spawn(worker.interrupt())
            raise
        if not done:
            task.add_done_callback(lambda t: _discard_reply(t, worker.exchange))
            await worker.interrupt()
            raise CallTimeout(
                f"{op} in pool {self.name!r} (kernel {worker.id}) did not finish within "
                f"{timeout:g} s; the kernel was interrupted",
                hint="raise the timeout, or make the function return sooner",
            )
        result, reply_buffers = task.result()
        worker.calls_served += 1
        if not decode:
            return result
        if _reply_is_large(result, reply_buffers):
            return await self._runner.offload(
                exchange.decode, result, reply_buffers, worker.exchange
            )
        return exchange.decode(result, reply_buffers, worker.exchange)

    async def _encode(self, out: exchange.Outgoing, encoder: Any, *values: Any) -> Any:
        """``encoder(*values)`` (a method of ``out``): on a worker thread when the values
        are large, so writing 100 MB to an exchange file does not stall the loop."""
        if not _looks_large(values):
            return encoder(*values)
        # Shielded: a caller that gives up does not stop the thread, which may still
        # write files; they are removed once it has finished.
        work = asyncio.ensure_future(self._runner.offload(encoder, *values))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda t: t.cancelled() or t.exception() or out.discard())
            raise

    async def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        func_buffers: list[bytes] = []
        func_desc = encode_function(func, func_buffers)
        worker = await self._acquire(None, "call")
        try:
            while True:
                # Encoded for this kernel: its folder, or message buffers if it has none.
                out = exchange.Outgoing(worker.exchange)
                out.buffers.extend(func_buffers)
                payload = await self._encode(out, out.encode_call, args, kwargs)
                request = {"func": func_desc, "payload": payload}
                try:
                    return await self._run_op(
                        worker,
                        "call",
                        request,
                        out.buffers,
                        timeout=self.spec.call_timeout,
                        outgoing=out,
                    )
                except GpuOutOfMemory as exc:
                    kwargs = await self._smaller_batch(worker, kwargs, exc)
        finally:
            self._release_when_quiet(worker)

    async def _smaller_batch(
        self, worker: KernelWorker, kwargs: dict[str, Any], error: GpuOutOfMemory
    ) -> dict[str, Any]:
        """The recovery policy for a call's GPU out-of-memory error: clear that kernel's
        GPU cache and retry with half its ``batch_size``, down to the policy's floor."""
        policy = self.spec.recovery
        size = kwargs.get("batch_size")
        if (
            not policy.oom_retry
            or isinstance(size, bool)
            or not isinstance(size, int)
            or size // 2 < policy.min_batch_size
        ):
            raise error
        await self._run_op(worker, "clear_gpu_cache", {}, [], decode=False)
        self.recoveries.append(
            {
                "time": time.time(),
                "action": "halve_batch",
                "kernel": worker.id,
                "from_size": size,
                "to_size": size // 2,
                "reason": error.remote_message,
            }
        )
        logger.info("pool %s: out of GPU memory; retrying with batch_size=%d", self.name, size // 2)
        return {**kwargs, "batch_size": size // 2}

    async def _map(self, func: Any, items: Iterable[Any], chunksize: int | None) -> list[Any]:
        values = list(items)
        if not values:
            return []
        if chunksize is None:
            chunksize = max(1, math.ceil(len(values) / (4 * self.spec.size)))
        elif isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive integer, got {chunksize!r}")
        func_buffers: list[bytes] = []
        func_desc = encode_function(func, func_buffers)

        async def run_chunk(chunk: list[Any]) -> list[Any]:
            worker = await self._acquire(None, "map")
            try:
                out = exchange.Outgoing(worker.exchange)
                out.buffers.extend(func_buffers)
                items = await self._encode(out, out.encode_items, chunk)
                request = {"func": func_desc, "items": items}
                return await self._run_op(
                    worker,
                    "map",
                    request,
                    out.buffers,
                    timeout=self.spec.call_timeout,
                    outgoing=out,
                )
            finally:
                self._release_when_quiet(worker)

        chunks = [values[i : i + chunksize] for i in range(0, len(values), chunksize)]
        results = await asyncio.gather(*(run_chunk(c) for c in chunks))
        return [item for chunk in results for item in chunk]

    async def _open_session(
        self, state: dict[str, Any] | None, timeout: float | None, call_timeout: float | None
    ) -> Session:
        from .session import Session

        if state is not None and not isinstance(state, dict):
            raise TypeError(f"session state must be a dict, got {type(state).__name__}")
        worker = await self._acquire(timeout, "session")
        out = exchange.Outgoing(worker.exchange)
        try:
            state_desc = await self._encode(out, out.encode, state or {})
        except BaseException:
            self._release(worker)
            raise
        session_id = uuid.uuid4().hex[:12]
        worker.session = session_id
        worker.state = "session"
        # init_session is queued, not awaited: the kernel handles it before anything else
        # this session sends, and a failure surfaces on the session's first op.
        init = asyncio.ensure_future(
            worker.request(
                "init_session", {"session_id": session_id, "state": state_desc}, buffers=out.buffers
            )
        )
        init.add_done_callback(lambda _: out.discard())
        init.add_done_callback(lambda t: t.cancelled() or t.exception())
        session = Session(self, worker, session_id, init, call_timeout)
        self._sessions[session_id] = session
        return session

    async def _close_session(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        worker = session._worker
        if worker.state == "dead" or worker.session != session.id:
            return
        release = asyncio.ensure_future(
            worker.request("release_session", {"session_id": session.id})
        )
        release.add_done_callback(lambda t: t.cancelled() or t.exception())
        worker.session = None
        worker.state = "busy"
        self._release_when_quiet(worker)

    async def _broadcast(self, op: str, args: dict[str, Any]) -> list[Any]:
        """Run an op on every kernel not held by a session, in parallel."""
        targets = [w for w in list(self._idle) if w.state == "idle"]

        async def one(worker: KernelWorker) -> Any:
            self._idle.remove(worker)
            worker.state = "busy"
            try:
                return await self._run_op(worker, op, args, [], decode=False)
            finally:
                self._release_when_quiet(worker)

        return list(await asyncio.gather(*(one(w) for w in targets)))

    async def _health(self) -> dict[str, Any]:
        workers = list(self._workers)
        # RSS off the loop: it reads /proc for every process of each kernel's tree.
        sizes = await self._runner.offload(_tree_sizes, [w.pid for w in workers])
        reported = await self._reported_figures(workers)
        now = time.time()
        kernels = []
        for worker, rss in zip(workers, sizes, strict=True):
            row = {
                "id": worker.id,
                "pid": worker.pid,
                "state": worker.state,
                "session": worker.session,
                "rss": rss,
                "rss_text": format_bytes(rss),
                "uptime": round(now - worker.started_at, 3) if worker.started_at else 0.0,
                "calls_served": worker.calls_served,
                "log": str(worker.log_path) if worker.log_path else None,
                "figures": "local",
            }
            if worker in reported:
                row.update(_reported_row(reported[worker]))
            kernels.append(row)
        return {
            "name": self.name,
            "source": self.source.description,
            "python": self.source.python,
            "size": self.spec.size,
            "max_memory": self.spec.max_memory_bytes,
            "gpu": self.spec.gpu,
            "kernels": kernels,
            "sessions": sorted(self._sessions),
            "idle": len(self._idle),
            "waiting": sum(1 for w in self._waiters if not w.done()),
            "deaths": self.deaths,
            "last_error": self.last_error,
            "warnings": list(self.warnings),
            "recoveries": self.recoveries[-20:],
            "backoff_until": self.backoff_until if self.backoff_until > time.time() else None,
            "closed": self._closed,
        }

    async def _reported_figures(
        self, workers: list[KernelWorker]
    ) -> dict[KernelWorker, dict[str, Any] | None]:
        """Figures of the kernels that are not on this machine, from the kernels themselves
        (a feed each, started here if the memory limit has not; the first health call
        waits up to REPORTED_FIGURES_WAIT_S for a kernel's first figures)."""
        remote = [
            w
            for w in workers
            if w.state in ("idle", "busy", "session") and kernel_figures.reports_figures(w)
        ]
        for worker in remote:
            kernel_figures.follow(worker, limit=self.spec.max_memory_bytes)
        found = await asyncio.gather(
            *(kernel_figures.first(w, REPORTED_FIGURES_WAIT_S) for w in remote)
        )
        return dict(zip(remote, found, strict=True))

    async def _shutdown(self, now: bool = False) -> None:
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PoolClosed(f"pool {self.name!r} was shut down"))
        self._waiters.clear()
        for session in list(self._sessions.values()):
            session._released = True
        self._sessions.clear()
        for task in list(self._background):
            task.cancel()
        workers = list(self._workers)
        for worker in workers:
            self._unwatch(worker)
        await asyncio.gather(*(w.shutdown(now=now) for w in workers), return_exceptions=True)
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        self._workers.clear()
        self._idle.clear()
        if self._exchange is not None:
            self._exchange.remove_pool(self.name)
        await self.source.aclose()

    # ---- public API: sync facade and async twins ------------------------------------
    def call(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` on an idle kernel and return its result.

        ``func`` is ``"pkg.module:function"`` (imported in the kernel) or a callable
        (shipped by value when defined in the notebook). A remote exception is raised
        here as a ``RemoteError`` carrying the remote traceback. Ctrl-C interrupts the
        kernel's work and raises ``KeyboardInterrupt`` here; the kernel and its state are
        kept (one that ignores the interrupt for ``INTERRUPT_GRACE_S`` is replaced).
        """
        return self._runner.run(self._call(func, args, kwargs))

    async def acall(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await self._runner.wrap(self._call(func, args, kwargs))

    def map(self, func: Any, items: Iterable[Any], *, chunksize: int | None = None) -> list[Any]:
        """``[func(x) for x in items]`` spread over the pool's kernels, order kept.
        Ctrl-C interrupts the chunks running and drops those waiting (see ``call``)."""
        return self._runner.run(self._map(func, items, chunksize))

    async def amap(
        self, func: Any, items: Iterable[Any], *, chunksize: int | None = None
    ) -> list[Any]:
        return await self._runner.wrap(self._map(func, items, chunksize))

    def session(
        self,
        state: dict[str, Any] | None = None,
        *,
        timeout: float | None = 1800.0,
        call_timeout: float | None = None,
    ) -> Session:
        """Reserve one kernel exclusively; wait up to ``timeout`` s for one to be free."""
        return self._runner.run(self._open_session(state, timeout, call_timeout))

    async def asession(
        self,
        state: dict[str, Any] | None = None,
        *,
        timeout: float | None = 1800.0,
        call_timeout: float | None = None,
    ) -> Session:
        return await self._runner.wrap(self._open_session(state, timeout, call_timeout))

    def warmup(self, modules: Iterable[str]) -> list[Any]:
        """Import ``modules`` on every free kernel, in parallel."""
        return self._runner.run(self._broadcast("warmup", {"modules": list(modules)}))

    def clear_gpu_cache(self) -> list[Any]:
        return self._runner.run(self._broadcast("clear_gpu_cache", {}))

    async def _wait_ready(self, timeout: float | None) -> bool:
        self._check_open()
        try:
            await asyncio.wait_for(self._full.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the pool has all its kernels up (after a death, the replacement
        included); False if that took longer than ``timeout``."""
        return self._runner.run(self._wait_ready(timeout))

    async def await_ready(self, timeout: float | None = None) -> bool:
        return await self._runner.wrap(self._wait_ready(timeout))

    def health(self) -> dict[str, Any]:
        """Per kernel: pid, state, session, RSS, uptime, calls served."""
        return self._runner.run(self._health())

    async def ahealth(self) -> dict[str, Any]:
        return await self._runner.wrap(self._health())

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    @property
    def kernel_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    # ---- public read-only views (for notebook/ and optimizers/, which stay off privates)
    @property
    def closed(self) -> bool:
        """True once the pool (or its manager) was shut down."""
        return self._closed

    @property
    def workers(self) -> list[KernelWorker]:
        """A snapshot of the pool's kernels (starting, idle, busy), for display and actions."""
        return list(self._workers)

    @property
    def runner(self) -> LoopThread:
        """The loop thread this pool runs on: drive your own coroutines over the pool's
        async API there (``runner.run(coro)`` blocks, ``runner.submit(coro)`` does not)."""
        return self._runner


def _tree_sizes(pids: list[int | None]) -> list[int]:
    return [process_tree_rss(pid) for pid in pids]


def _reported_row(figures: dict[str, Any] | None) -> dict[str, Any]:
    """A health row's figures from what a kernel on another machine reported (None: none
    yet, e.g. a kernel that was busy since its feed started)."""
    figures = figures or {}
    rss = figures.get("rss")
    return {
        "figures": "kernel",
        "rss": rss,
        "rss_text": format_bytes(rss),
        "host": figures.get("host"),
        "remote_pid": figures.get("pid"),
        "cpu_percent": figures.get("cpu_percent"),
        "gpu": figures.get("gpu"),
        "reported_at": figures.get("time"),
    }


def _looks_large(values: Iterable[Any], depth: int = 0) -> bool:
    """Whether encoding ``values`` may take milliseconds: one of them (or of the small
    containers among them) is an array, table, bytes or text of ``OFFLOAD_MIN_BYTES`` or
    more, or a container of ``OFFLOAD_MIN_ITEMS`` or more. Sizes only: nothing is copied."""
    for value in values:
        if isinstance(value, (bytes, bytearray, str, memoryview)):
            if len(value) >= OFFLOAD_MIN_BYTES:
                return True
            continue
        size = getattr(value, "nbytes", None)  # numpy arrays, Arrow tables
        if isinstance(size, int) and size >= OFFLOAD_MIN_BYTES:
            return True
        if hasattr(value, "memory_usage") and hasattr(value, "columns"):
            return True  # a DataFrame: its conversion to Arrow alone takes milliseconds
        if isinstance(value, (list, tuple, dict)):
            if len(value) >= OFFLOAD_MIN_ITEMS:
                return True
            inner = value.values() if isinstance(value, dict) else value
            if depth < 2 and _looks_large(inner, depth + 1):
                return True
    return False


def _reply_is_large(desc: Any, buffers: list[Any]) -> bool:
    """Whether decoding a reply may take milliseconds: it names exchange files, or its
    message buffers hold ``OFFLOAD_MIN_BYTES`` or more."""
    if exchange.file_names(desc):
        return True
    return sum(memoryview(b).nbytes for b in buffers) >= OFFLOAD_MIN_BYTES


def _discard_reply(task: asyncio.Future[Any], config: exchange.ExchangeConfig) -> None:
    """A reply that arrives after its caller gave up: remove the files it names."""
    if task.cancelled() or task.exception() is not None:
        return
    result, _ = task.result()
    exchange.discard(result, config)
