"""A session: exclusive use of one pool kernel, whose state lives in that kernel."""

from __future__ import annotations

import asyncio
import builtins
import queue
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import exchange
from ..protocol import encode_function
from .errors import CallTimeout, RemoteError, SessionClosed, classify
from .streams import Stream, StreamChannel

if TYPE_CHECKING:
    from .errors import Where
    from .loop import LoopThread
    from .pool import Pool
    from .worker import KernelWorker

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DONE = object()


@dataclass
class ExecuteResult:
    """What ``session.execute`` returns: the outputs, already shown in the caller's cell."""

    status: str
    execution_count: int | None
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def _stream(self, name: str) -> str:
        return "".join(
            o.get("text", "")
            for o in self.outputs
            if o["output_type"] == "stream" and o.get("name") == name
        )

    @property
    def stdout(self) -> str:
        return self._stream("stdout")

    @property
    def stderr(self) -> str:
        return self._stream("stderr")

    @property
    def result(self) -> str | None:
        """``text/plain`` of the cell's value (its last expression), if it had one."""
        for output in reversed(self.outputs):
            if output["output_type"] == "execute_result":
                return output.get("data", {}).get("text/plain")
        return None


def show_output(output: dict[str, Any]) -> None:
    """Show a kernel's output in the caller's cell (or terminal), as if produced here."""
    kind = output["output_type"]
    if kind == "stream":
        stream = sys.stderr if output.get("name") == "stderr" else sys.stdout
        stream.write(output.get("text", ""))
        stream.flush()
        return
    try:
        from IPython import get_ipython
        from IPython.display import clear_output, publish_display_data
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        get_ipython = None  # type: ignore[assignment]
    in_ipython = get_ipython is not None and get_ipython() is not None
    if kind == "clear_output":
        if in_ipython:
            clear_output(wait=bool(output.get("wait")))
        return
    data = output.get("data", {})
    if in_ipython:
        publish_display_data(data, metadata=output.get("metadata") or {})
    elif "text/plain" in data:
        print(data["text/plain"])


def execute_error(reply: dict[str, Any], session: Session) -> Exception:
    ename = str(reply.get("ename", "Error"))
    module = "builtins" if isinstance(getattr(builtins, ename, None), type) else ""
    error = {
        "type": ename,
        "module": module,
        "message": _ANSI.sub("", str(reply.get("evalue", ""))),
        "traceback": [_ANSI.sub("", line) + "\n" for line in reply.get("traceback") or []],
    }
    return classify(error, session._worker.where())


class Session:
    """Exclusive use of one kernel of a pool until ``release()``.

    Every call, execute and stream of the session goes to the same kernel, so whatever
    it leaves there (variables, loaded models, ``session_state()``) is there next time.
    """

    def __init__(
        self,
        pool: Pool,
        worker: KernelWorker,
        session_id: str,
        init: asyncio.Future[Any],
        call_timeout: float | None,
    ) -> None:
        self.id = session_id
        self.pool_name = pool.name
        self.created_at = time.time()
        self.last_used = self.created_at
        self.call_timeout = call_timeout
        self._pool = pool
        self._worker = worker
        self._runner = pool._runner
        self._init = init
        self._released = False
        self._lost = False
        self.owner: Any = None  # what holds this session (an optimization run), if anything

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self._lost else "active"
        return f"<Session {self.id} pool={self.pool_name!r} kernel={self.kernel_id} {state}>"

    @property
    def kernel_id(self) -> str:
        return self._worker.id

    @property
    def pid(self) -> int | None:
        return self._worker.pid

    @property
    def active(self) -> bool:
        return not (self._released or self._lost)

    # ---- loop-thread implementation -------------------------------------------------
    async def _ready(self) -> None:
        if self._released:
            raise SessionClosed(f"session {self.id} of pool {self.pool_name!r} was released")
        if self._lost or self._worker.state == "dead":
            raise self._worker._death_error()
        if self._init.done():
            self._init.result()  # raises the init_session failure, if any
        # Not done yet: no need to wait. The kernel handles init_session before what
        # follows; if it failed, what follows fails too and _init_error() explains why.
        self.last_used = time.time()

    def _init_error(self) -> BaseException | None:
        if self._init.done() and not self._init.cancelled():
            return self._init.exception()
        return None

    async def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        await self._ready()
        # Tables and arrays each in their own tier (message, mmap file, Arrow file).
        out = exchange.Outgoing(self._worker.exchange)
        func_desc = encode_function(func, out.buffers)
        payload = await self._pool._encode(out, out.encode_call, args, kwargs)
        request = {"func": func_desc, "payload": payload}
        try:
            return await self._pool._run_op(
                self._worker,
                "call",
                request,
                out.buffers,
                session=self.id,
                timeout=self.call_timeout,
                outgoing=out,
            )
        except RemoteError as exc:
            raise (self._init_error() or exc) from None

    async def _open_stream(
        self,
        stream_id: str,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        window: int,
        batch_items: int,
    ) -> StreamChannel:
        await self._ready()
        out = exchange.Outgoing(self._worker.exchange)
        func_desc = encode_function(func, out.buffers)
        payload = await self._pool._encode(out, out.encode_call, args, kwargs)
        request = {
            "stream_id": stream_id,
            "func": func_desc,
            "payload": payload,
            "window": window,
            "batch_items": batch_items,
        }
        channel = self._worker.open_stream(stream_id, ack_every=max(1, window // 2))
        try:
            await self._worker.request("stream_open", request, session=self.id, buffers=out.buffers)
        except BaseException:
            self._worker.forget_stream(stream_id)
            raise
        finally:
            out.discard()  # files the kernel took are gone already; the rest go now
        return channel

    async def _execute(
        self,
        code: str,
        on_output: Callable[[dict[str, Any]], None] | None,
        timeout: float | None,
    ) -> ExecuteResult:
        await self._ready()
        task = asyncio.ensure_future(self._worker.execute(code, on_output=on_output))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:  # Ctrl-C in the caller's cell: as in a notebook
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            if not task.done():
                self._pool._spawn(self._worker.interrupt())
            raise
        if not done:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            await self._worker.interrupt()
            raise CallTimeout(
                f"code in session {self.id} did not finish within {timeout:g} s; "
                "the kernel was interrupted (the session keeps its state)"
            )
        reply = task.result()
        self._worker.calls_served += 1
        if reply.get("status") == "error":
            raise execute_error(reply, self)
        return ExecuteResult(
            str(reply.get("status")), reply.get("execution_count"), reply.get("outputs", [])
        )

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        await self._pool._close_session(self)

    # ---- public API -----------------------------------------------------------------
    def call(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` in this session's kernel."""
        return self._runner.run(self._call(func, args, kwargs))

    async def acall(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await self._runner.wrap(self._call(func, args, kwargs))

    def execute(
        self, code: str, *, show: bool = True, timeout: float | None = None
    ) -> ExecuteResult:
        """Run ``code`` in the session kernel's namespace; with ``show``, its stdout,
        stderr and rich outputs appear in the caller's cell as they happen."""
        if not show:
            return self._runner.run(self._execute(code, None, timeout))
        outputs: queue.SimpleQueue[Any] = queue.SimpleQueue()

        async def run() -> ExecuteResult:
            try:
                return await self._execute(code, outputs.put, timeout)
            finally:
                outputs.put(_DONE)

        future = self._runner.submit(run())
        try:
            # Outputs are shown from the calling thread, so they land in the caller's cell.
            while (item := outputs.get()) is not _DONE:
                show_output(item)
        except KeyboardInterrupt:
            future.cancel()  # interrupts the kernel; the session keeps its state
            raise
        return future.result()

    async def aexecute(
        self, code: str, *, show: bool = True, timeout: float | None = None
    ) -> ExecuteResult:
        if not show:
            return await self._runner.wrap(self._execute(code, None, timeout))
        caller = asyncio.get_running_loop()
        outputs: asyncio.Queue[Any] = asyncio.Queue()

        def forward(item: Any) -> None:
            caller.call_soon_threadsafe(outputs.put_nowait, item)

        async def run() -> ExecuteResult:
            try:
                return await self._execute(code, forward, timeout)
            finally:
                forward(_DONE)

        future = asyncio.wrap_future(self._runner.submit(run()))
        try:
            while (item := await outputs.get()) is not _DONE:
                show_output(item)
        except asyncio.CancelledError:
            future.cancel()  # interrupts the kernel; the session keeps its state
            raise
        return await future

    def stream(self, func: Any, /, *args: Any, **kwargs: Any) -> Stream:
        """Iterate (``for`` or ``async for``) over what generator ``func(*args, **kwargs)``
        yields in this session's kernel: every item, in order, with backpressure."""
        return Stream(self, func, args, kwargs)

    def open_stream(
        self,
        func: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        window: int = 16,
        batch_items: int = 1000,
    ) -> Stream:
        """``stream`` with its tuning: at most ``window`` batches of up to ``batch_items``
        items in flight between the generator and the consumer."""
        return Stream(self, func, args, kwargs or {}, window=window, batch_items=batch_items)

    def release(self) -> None:
        """Give the kernel back to the pool; the session's state there is dropped."""
        if self._runner.running:
            self._runner.run(self._release())

    async def arelease(self) -> None:
        await self._runner.wrap(self._release())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.arelease()

    # ---- public read-only views (for notebook/ and optimizers/, which stay off privates)
    @property
    def pool(self) -> Pool:
        """The pool this session's kernel belongs to."""
        return self._pool

    @property
    def runner(self) -> LoopThread:
        """The loop thread the session's pool runs on (see ``Pool.runner``)."""
        return self._runner

    def where(self) -> Where:
        """Pool, kernel, session and Python of this session: what remote errors carry."""
        return self._worker.where()

    def kill(self) -> None:
        """SIGKILL this session's kernel (the pool replaces it; the session is lost): for
        work on a kernel thread that no interrupt reaches, such as a call hung on a socket."""
        self._worker.kill()
