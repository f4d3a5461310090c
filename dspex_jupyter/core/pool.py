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
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .. import exchange, protocol
from .errors import CallTimeout, GpuOutOfMemory, PoolClosed, PoolExhausted, PoolStartError
from .exchange_dirs import ExchangeArea
from .launch import KernelSource, kernel_environment
from .loop import LoopThread
from .spec import PoolSpec, format_bytes
from .worker import KernelWorker

if TYPE_CHECKING:
    from .session import Session

# A kernel interrupted after a timeout gets this long to answer before it is replaced.
INTERRUPT_GRACE_S = 5.0
# Replacement of a kernel that fails to start backs off up to this delay.
MAX_RESTART_BACKOFF_S = 30.0
# This many deaths in a row of kernels younger than this that served nothing: a crash loop.
CRASH_LOOP_DEATHS = 3
CRASH_LOOP_UPTIME_S = 10.0
# How often kernels' memory is compared with their pool's max_memory.
MEMORY_CHECK_INTERVAL_S = 0.2
logger = logging.getLogger("dspex_jupyter.pool")


def encode_function(func: Any, buffers: list[bytes]) -> dict[str, Any]:
    """A function travels by import path (``"pkg.mod:func"``) or, if defined in the
    notebook, by value (cloudpickle: trusted code only, as with ipyparallel)."""
    if isinstance(func, str):
        module, sep, name = func.partition(":")
        if not sep or not module or not name:
            raise ValueError(
                f"function reference {func!r} must look like 'package.module:function'"
            )
        return {"ref": func}
    if callable(func):
        return protocol.encode_value(func, buffers)
    raise TypeError(f"expected a callable or a 'module:function' string, got {type(func).__name__}")


def process_tree_rss(pid: int | None) -> int:
    """RSS of a kernel and its children (what its memory limit is measured against)."""
    if pid is None:
        return 0
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return int(total)
    except psutil.Error:
        return 0


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
        self._pidfds: dict[KernelWorker, int] = {}
        self._closed = False
        self._full = asyncio.Event()
        self.deaths = 0
        self.last_error = ""
        self.warnings: list[str] = []
        self.recoveries: list[dict[str, Any]] = []  # what the recovery policy did, in order
        # Crash-loop detection: kernels that die young without serving anything.
        self._early_deaths = 0
        self.backoff_until = 0.0

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} size={self.spec.size} source={self.source.description!r}>"

    # ---- starting and supervising ---------------------------------------------------
    async def _watch_memory(self) -> None:
        """Stop a kernel whose process tree passes ``max_memory`` (its caller gets
        MemoryLimitExceeded; the pool replaces it); warn once at 90 %."""
        limit = self.spec.max_memory_bytes
        assert limit is not None
        warned: set[str] = set()
        while not self._closed:
            for worker in list(self._workers):
                if worker.state in ("starting", "dead", "stopping") or worker.memory_exceeded:
                    continue
                rss = process_tree_rss(worker.pid)
                if rss > limit:
                    worker.memory_exceeded = (rss, limit)
                    worker.kill()
                elif rss > 0.9 * limit and worker.id not in warned:
                    warned.add(worker.id)
                    message = (
                        f"kernel {worker.id} of pool {self.name!r} uses {format_bytes(rss)}, "
                        f"over 90% of its max_memory {format_bytes(limit)}"
                    )
                    self.warnings.append(message)
                    logger.warning(message)
            await asyncio.sleep(MEMORY_CHECK_INTERVAL_S)  # poll: RSS has no event to wait on

    async def _start(self, timeout: float) -> None:
        if self.spec.max_memory_bytes is not None:
            self._spawn(self._watch_memory())
        results = await asyncio.gather(
            *(self._start_worker(timeout) for _ in range(self.spec.size)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            first = errors[0]
            raise PoolStartError(
                f"pool {self.name!r}: {len(errors)} of {self.spec.size} kernels failed to start: "
                f"{first}"
            ) from first

    async def _start_worker(self, timeout: float) -> KernelWorker:
        worker = KernelWorker(self.name, self.source, self._env, self._runtime_dir)
        self._workers.append(worker)
        try:
            # Watch the process as soon as it exists, so a crash during start-up is seen.
            await worker.start(timeout, on_launch=self._watch)
            await self._prepare(worker)
        except BaseException:
            self._forget(worker)
            await worker.shutdown(now=True)
            raise
        self._release(worker)
        return worker

    async def _prepare(self, worker: KernelWorker) -> None:
        """Warm-up imports, then start-up code, before the kernel takes any work."""
        await self._configure_exchange(worker)
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
        """Be told the moment a kernel process exits: a pidfd becomes readable (Linux)."""
        pid = worker.pid
        loop = asyncio.get_running_loop()
        if pid is not None and hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                fd = -1
            if fd >= 0:
                self._pidfds[worker] = fd
                loop.add_reader(fd, self._check_worker, worker)
                return
        self._spawn(self._poll_worker(worker))

    async def _poll_worker(self, worker: KernelWorker) -> None:
        while worker.state != "dead" and not self._closed:
            self._check_worker(worker)
            await asyncio.sleep(0.1)  # poll: no pidfd on this platform

    def _check_worker(self, worker: KernelWorker) -> None:
        code = worker.poll()
        if code is None or worker.state == "dead":
            return
        self._unwatch(worker)
        if worker.state == "stopping" or self._closed:
            return
        self._on_death(worker, code)

    def _unwatch(self, worker: KernelWorker) -> None:
        fd = self._pidfds.pop(worker, None)
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def _configure_exchange(self, worker: KernelWorker) -> None:
        """Give the kernel its private exchange folder; a kernel that cannot see it (not
        on this machine) gets every value in message buffers instead."""
        area = self._exchange
        if area is None:
            return
        folder = area.kernel_folder(self.name, worker.number)
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
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        self._update_full()

    def _on_death(self, worker: KernelWorker, code: int) -> None:
        self.deaths += 1
        session = self._sessions.get(worker.session or "")
        if session is not None:
            session._lost = True
        young = time.time() - worker.started_at < CRASH_LOOP_UPTIME_S
        self._early_deaths = self._early_deaths + 1 if young and not worker.calls_served else 0
        if worker.memory_exceeded:
            rss, limit = worker.memory_exceeded
            self.last_error = (
                f"kernel {worker.id} passed max_memory ({format_bytes(rss)} > "
                f"{format_bytes(limit)}) and was replaced"
            )
        worker.mark_dead(code)
        self._forget(worker)
        self._spawn(worker.shutdown(now=True))  # removes its connection file and sockets
        if not self._closed:
            self._spawn(self._replace())

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

    async def _replace(self) -> None:
        """Keep the pool at its size; back off when replacements keep failing."""
        delay = self._crash_loop_delay()
        if delay:
            self.backoff_until = time.time() + delay
            await asyncio.sleep(delay)  # back-off: a crash loop must not spin
        delay = 0.5
        while not self._closed:
            try:
                await self._start_worker(timeout=60)
                return
            except Exception as exc:
                self.last_error = f"replacement kernel failed to start: {exc}"
                await asyncio.sleep(delay)  # back-off before the next attempt
                delay = min(delay * 2, MAX_RESTART_BACKOFF_S)

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
        await asyncio.wait({waiter}, timeout=timeout)
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
        a reply nobody waits for any more, when it arrives."""
        request = worker.request(op, args, session=session, buffers=buffers)
        if timeout is None:
            try:
                result, reply_buffers = await request
            finally:
                if outgoing is not None:
                    outgoing.discard()
            worker.calls_served += 1
            return exchange.decode(result, reply_buffers, worker.exchange) if decode else result
        task = asyncio.ensure_future(request)
        if outgoing is not None:
            task.add_done_callback(lambda _: outgoing.discard())
        done, _ = await asyncio.wait({task}, timeout=timeout)
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
        return exchange.decode(result, reply_buffers, worker.exchange) if decode else result

    async def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        func_buffers: list[bytes] = []
        func_desc = encode_function(func, func_buffers)
        worker = await self._acquire(None, "call")
        try:
            while True:
                # Encoded for this kernel: its folder, or message buffers if it has none.
                out = exchange.Outgoing(worker.exchange)
                out.buffers.extend(func_buffers)
                request = {"func": func_desc, "payload": out.encode_call(args, kwargs)}
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
                request = {"func": func_desc, "items": out.encode_items(chunk)}
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
            state_desc = out.encode(state or {})
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

    def _health(self) -> dict[str, Any]:
        now = time.time()
        kernels = []
        for worker in self._workers:
            rss = process_tree_rss(worker.pid)
            kernels.append(
                {
                    "id": worker.id,
                    "pid": worker.pid,
                    "state": worker.state,
                    "session": worker.session,
                    "rss": rss,
                    "rss_text": format_bytes(rss),
                    "uptime": round(now - worker.started_at, 3) if worker.started_at else 0.0,
                    "calls_served": worker.calls_served,
                    "log": str(worker.log_path) if worker.log_path else None,
                }
            )
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

    # ---- public API: sync facade and async twins ------------------------------------
    def call(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` on an idle kernel and return its result.

        ``func`` is ``"pkg.module:function"`` (imported in the kernel) or a callable
        (shipped by value when defined in the notebook). A remote exception is raised
        here as a ``RemoteError`` carrying the remote traceback.
        """
        return self._runner.run(self._call(func, args, kwargs))

    async def acall(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await self._runner.wrap(self._call(func, args, kwargs))

    def map(self, func: Any, items: Iterable[Any], *, chunksize: int | None = None) -> list[Any]:
        """``[func(x) for x in items]`` spread over the pool's kernels, order kept."""
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
        return self._runner.run(_as_coroutine(self._health))

    async def ahealth(self) -> dict[str, Any]:
        return await self._runner.wrap(_as_coroutine(self._health))

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    @property
    def kernel_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]


async def _as_coroutine(func: Any) -> Any:
    return func()


def _discard_reply(task: asyncio.Future[Any], config: exchange.ExchangeConfig) -> None:
    """A reply that arrives after its caller gave up: remove the files it names."""
    if task.cancelled() or task.exception() is not None:
        return
    result, _ = task.result()
    exchange.discard(result, config)
