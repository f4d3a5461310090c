"""One managed kernel: its jupyter_client manager and client, the dspex comm, and the
requests in flight on it. Lives on the manager's event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.session import Session as JupyterSession

from .. import exchange, protocol
from ..exchange import MESSAGE_ONLY, ExchangeConfig
from .errors import (
    DspexError,
    KernelDied,
    MemoryLimitExceeded,
    ProtocolMismatch,
    RemoteError,
    RemoteLaunchFailed,
    RuntimeNotInstalled,
    SessionKernelLost,
    TransportNotEncrypted,
    Where,
    classify,
)
from .kernel_source import RunningKernel, open_kernel
from .launch import KernelSource
from .spec import format_limit, format_used
from .streams import StreamChannel

BOOTSTRAP = (
    "import dspex_jupyter.runtime as __dspex_runtime\n"
    "__dspex_runtime.install()\n"
    "del __dspex_runtime\n"
)
OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "execute_result", "update_display_data", "clear_output"}
)
_worker_numbers = itertools.count()
logger = logging.getLogger("dspex_jupyter.worker")


@dataclass
class _Execution:
    """An execute_request in flight: its outputs arrive on IOPub, its reply on shell."""

    on_output: Callable[[dict[str, Any]], None] | None
    reply: asyncio.Future[dict[str, Any]]
    idle: asyncio.Future[None]
    outputs: list[dict[str, Any]] = field(default_factory=list)


class KernelWorker:
    """A kernel of a pool, with at most one op running at a time (the pool sees to that)."""

    def __init__(
        self,
        pool: str,
        source: KernelSource,
        env: dict[str, str],
        runtime_dir: Path,
        transport_encryption: str = "disabled",
    ):
        self.pool = pool
        self.number = next(_worker_numbers)
        self.id = f"{pool}/{self.number}"
        self.source = source
        self.state = "starting"
        self.session: str | None = None
        self.calls_served = 0
        self.started_at = 0.0
        self.exit_code: int | None = None
        self.memory_exceeded: tuple[int, int] | None = None  # (rss, limit) when stopped for it
        # Put before a local kernel's command (see _KernelManager), and run once it is gone.
        self.launch_prefix: list[str] = []
        self.when_gone: list[Callable[[], None]] = []
        self.rejected_messages = 0  # failed signature checks (see _deserialize)
        self.log_path: Path | None = None
        self._env = env
        self._runtime_dir = runtime_dir
        self._transport_encryption = transport_encryption
        # The kernel itself, wherever it runs (core/kernel_source.py); set by start().
        self.kernel: RunningKernel | None = None
        self._km: Any = None
        self._kc: Any = None
        self._jsession: JupyterSession | None = None
        self._comm_id = uuid.uuid4().hex
        self._pending: dict[str, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._executions: dict[str, _Execution] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._streams: dict[str, StreamChannel] = {}
        self.dead: asyncio.Future[None] | None = None
        # How values travel to and from this kernel; the pool sets its folder at start.
        self.exchange: ExchangeConfig = MESSAGE_ONLY
        # Buffers of a message to or from a kernel elsewhere go in pieces of at most this
        # many bytes (None: whole, for a local kernel, whose big values go through files).
        self.chunk_bytes: int | None = None
        self._pieces = exchange.PieceReceiver()

    # ---- identity -------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The kernel's process id on this machine; None when it is not local."""
        return self.kernel.pid if self.kernel is not None else None

    @property
    def is_local(self) -> bool:
        """Whether the kernel shares this machine (asked of its kernel source)."""
        return self.kernel is not None and self.kernel.is_local

    @property
    def connection_file(self) -> str:
        return self._km.connection_file if self._km else ""

    @property
    def inflight(self) -> int:
        return len(self._pending) + len(self._executions)

    def where(self) -> Where:
        return Where(self.pool, self.id, self.session, self.source.python)

    # ---- lifecycle ------------------------------------------------------------------
    async def start(
        self, timeout: float = 60.0, on_launch: Callable[[KernelWorker], None] | None = None
    ) -> None:
        """Launch the kernel, wait until it answers, install the runtime, open the comm."""
        loop = asyncio.get_running_loop()
        self.dead = loop.create_future()
        stem = f"k{self.number}-{self._comm_id[:6]}"
        self.kernel = open_kernel(
            self.source.kernel_spec_manager,
            self.source.kernel_name,
            self._runtime_dir / f"{stem}.json",
            transport_encryption=self._transport_encryption,
            launch_prefix=self.launch_prefix,
        )
        self._km = self.kernel.manager
        if not self.kernel.is_local:
            self.chunk_bytes = exchange.CHUNK_BYTES
        # The kernel's own stdout/stderr (ipykernel's log lines, C-level prints) go to a
        # private log file, not to the notebook process's stderr, where ipykernel would
        # forward them into whichever cell happens to run.
        self.log_path = self._runtime_dir / f"{stem}.log"
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            await self.kernel.start(
                env=self._env, cwd=str(Path.cwd()), stdout=log_fd, stderr=log_fd
            )
        except Exception as exc:
            if self.kernel.is_local or isinstance(exc, DspexError):
                raise
            raise RemoteLaunchFailed(
                f"kernel {self.id} of pool {self.pool!r} could not be launched by its "
                f"provisioner ({self.source.description}): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            os.close(log_fd)  # the kernel process has its own copy
        if self._transport_encryption == "required" and not self.kernel.encrypted:
            raise TransportNotEncrypted(
                f"kernel {self.id} of pool {self.pool!r} came up without CurveZMQ keys in its "
                "connection info; it was stopped"
            )
        self.started_at = time.time()
        if on_launch is not None:
            on_launch(self)
        self._kc = self._km.client()
        self._kc.start_channels(hb=False, stdin=False, control=False)
        self._jsession = self._kc.session
        ready = asyncio.ensure_future(self._kc.wait_for_ready(timeout=timeout))
        await asyncio.wait([ready, self.dead], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise KernelDied(
                f"kernel {self.id} exited during start-up (exit code {self.exit_code})",
                where=self.where(),
                hint=f"run {self.source.python} -m ipykernel_launcher to see why it fails",
            )
        ready.result()
        self.kernel.after_ready()
        self._readers = [
            asyncio.ensure_future(self._read_iopub()),
            asyncio.ensure_future(self._read_shell()),
        ]
        result = await self.execute(BOOTSTRAP, silent=True)
        if result["status"] != "ok":
            raise RuntimeNotInstalled(
                f"the kernel's Python ({self.source.python}) cannot load dspex_jupyter's "
                f"runtime: {result.get('ename')}: {result.get('evalue')}",
                hint=f"install it there: {self.source.python} -m pip install dspex-jupyter, "
                "or make the environment with `dspex env create`",
            )
        self._send(
            "comm_open", {"comm_id": self._comm_id, "target_name": protocol.COMM_TARGET, "data": {}}
        )
        hello, _ = await self.request("hello", {})
        if hello.get("protocol") != protocol.PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"kernel {self.id} speaks dspex protocol {hello.get('protocol')}, "
                f"this client speaks {protocol.PROTOCOL_VERSION}",
                hint="install the same dspex-jupyter version in the pool's environment",
            )

    @property
    def launched(self) -> bool:
        return self._km is not None and self._km.has_kernel

    async def poll(self) -> int | None:
        """The exit code, or None while the kernel runs, as its provisioner sees it: the
        one question every provisioner answers, wherever the kernel runs."""
        return None if self.kernel is None else await self.kernel.poll()

    def mark_dead(self, exit_code: int | None) -> None:
        """Called by the pool's monitor: fail everything in flight, never leave it hanging."""
        if self.state == "dead":
            return
        self.exit_code = exit_code
        self.state = "dead"
        if self.dead is not None and not self.dead.done():
            self.dead.set_result(None)
        self._fail_all(self._death_error)

    def _death_error(self) -> KernelDied:
        if self.memory_exceeded is not None:
            rss, limit = self.memory_exceeded
            lost = f"; session {self.session!r} and its state are lost" if self.session else ""
            return MemoryLimitExceeded(
                f"kernel {self.id} of pool {self.pool!r} used {format_used(rss, limit)}, over the "
                f"pool's max_memory of {format_limit(limit)}: it was stopped and replaced{lost}",
                where=self.where(),
            )
        signal_note = f" (killed by signal {-self.exit_code})" if (self.exit_code or 0) < 0 else ""
        if self.session is not None:
            return SessionKernelLost(
                f"the kernel of session {self.session!r} in pool {self.pool!r} died"
                f"{signal_note}; the session's state is lost",
                where=self.where(),
            )
        return KernelDied(
            f"kernel {self.id} of pool {self.pool!r} died{signal_note}", where=self.where()
        )

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        for channel in self._streams.values():
            channel.fail(make_error())
        self._streams.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(make_error())
        self._pending.clear()
        for execution in self._executions.values():
            for future in (execution.reply, execution.idle):
                if not future.done():
                    future.set_exception(make_error())
        self._executions.clear()

    async def wait_quiet(self, timeout: float) -> bool:
        """Wait until nothing is in flight on this kernel; False if that took too long."""
        futures = [*self._pending.values()]
        futures += [e.idle for e in self._executions.values()]
        if futures:
            await asyncio.wait(futures, timeout=timeout)
        return self.inflight == 0

    def kill(self) -> None:
        """SIGKILL the kernel (through its provisioner when it is not local); the pool's
        watcher then replaces it."""
        if self.state != "dead" and self.kernel is not None:
            self.kernel.kill()

    async def interrupt(self) -> None:
        """Interrupt the running op, through the provisioner for a kernel elsewhere."""
        if self.kernel is not None and self.state != "dead":
            with contextlib.suppress(Exception):
                await self.kernel.interrupt()

    async def shutdown(self, now: bool = False) -> None:
        """Stop the kernel and remove its connection file and sockets."""
        if self.state != "dead":
            self.state = "stopping"
        for task in self._readers:
            task.cancel()
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers = []
        if self._kc is not None:
            self._kc.stop_channels()
        if self._km is not None:
            with contextlib.suppress(Exception):
                if self.state == "dead" or not await self._km.is_alive():
                    await self._km.shutdown_kernel(now=True)
                else:
                    await self._km.shutdown_kernel(now=now)
        self._fail_all(lambda: KernelDied(f"kernel {self.id} was shut down", where=self.where()))
        if self.dead is not None and not self.dead.done():
            self.dead.set_result(None)
        self.state = "dead"
        callbacks, self.when_gone = self.when_gone, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a cleanup must not stop the others
                logger.exception("kernel %s: cleanup after shutdown failed", self.id)

    # ---- messaging ------------------------------------------------------------------
    def _send(
        self, msg_type: str, content: dict[str, Any], buffers: list[bytes] | None = None
    ) -> str:
        assert self._jsession is not None
        msg = self._jsession.msg(msg_type, content)
        self._jsession.send(self._kc.shell_channel.socket, msg, buffers=buffers)
        return str(msg["header"]["msg_id"])

    def request(
        self,
        op: str,
        args: dict[str, Any],
        *,
        session: str | None = None,
        buffers: list[bytes] | None = None,
    ) -> Coroutine[Any, Any, tuple[Any, list[Any]]]:
        """Send one op NOW and return the wait for its reply (which raises the classified
        error of a failed op). Sending at call time, not when the wait is first awaited,
        keeps ops in the order they were asked for (a session's init before its calls)."""
        if self.state in ("dead", "stopping"):
            raise self._death_error()
        message = protocol.make_request(op, args, session)
        future: asyncio.Future[tuple[dict[str, Any], list[Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[message["id"]] = future
        if self.chunk_bytes:
            message["chunk_max"] = self.chunk_bytes  # how big the reply's pieces may be
        exchange.send_in_pieces(self._send_comm, message, buffers or [], self.chunk_bytes)
        return self._reply(future)

    def _send_comm(self, data: dict[str, Any], buffers: list[Any]) -> None:
        self._send("comm_msg", {"comm_id": self._comm_id, "data": data}, buffers or None)

    async def _reply(
        self, future: asyncio.Future[tuple[dict[str, Any], list[Any]]]
    ) -> tuple[Any, list[Any]]:
        reply, reply_buffers = await future
        if reply.get("ok"):
            return reply.get("result"), reply_buffers
        raise self.error_from_reply(reply.get("error") or {})

    def notify(self, op: str, args: dict[str, Any], *, session: str | None = None) -> None:
        """Send an op that needs no answer (acknowledgements); only a failure is replied."""
        if self.state in ("dead", "stopping"):
            return
        message = protocol.make_request(op, args, session)
        message["noreply"] = True
        self._send("comm_msg", {"comm_id": self._comm_id, "data": message})

    def open_stream(self, stream_id: str, ack_every: int = 1) -> StreamChannel:
        """Register a stream before it is opened, so no early batch is missed."""
        channel = StreamChannel(self, stream_id, ack_every)
        self._streams[stream_id] = channel
        return channel

    def forget_stream(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)

    def error_from_reply(self, error: dict[str, Any]) -> RemoteError:
        return classify(error, self.where())

    async def execute(
        self,
        code: str,
        *,
        silent: bool = False,
        on_output: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Run code in the kernel's namespace; outputs go to ``on_output`` as they arrive.

        Returns the execute_reply content once every output has arrived.
        """
        if self.state in ("dead", "stopping"):
            raise self._death_error()
        loop = asyncio.get_running_loop()
        execution = _Execution(on_output, loop.create_future(), loop.create_future())
        msg_id = self._send(
            "execute_request",
            {
                "code": code,
                "silent": silent,
                "store_history": not silent,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": False,
            },
        )
        self._executions[msg_id] = execution
        try:
            reply = await execution.reply
            await execution.idle
        finally:
            self._executions.pop(msg_id, None)
        reply = dict(reply)
        reply["outputs"] = execution.outputs
        return reply

    def _deserialize(self, raw: list[bytes]) -> dict[str, Any] | None:
        """A signed message, or None for one that fails its signature or is malformed:
        it is dropped (and logged), and the reader goes on."""
        assert self._jsession is not None
        try:
            _, parts = self._jsession.feed_identities(raw)
            return self._jsession.deserialize(parts)
        except Exception as exc:
            logger.warning("kernel %s: dropped a message that failed to verify: %s", self.id, exc)
            self.rejected_messages += 1
            return None

    async def _recv(self, channel: Any) -> dict[str, Any]:
        while True:
            msg = self._deserialize(await channel.socket.recv_multipart())
            if msg is not None:
                return msg

    async def _read_iopub(self) -> None:
        socket = self._kc.iopub_channel.socket
        while True:
            raw = await socket.recv_multipart()
            # Status messages matter only while code executes; skip decoding them
            # otherwise (each call's reply comes between a "busy" and an "idle").
            if not self._executions and raw[0].endswith(b".status"):
                continue
            msg = self._deserialize(raw)
            if msg is not None:
                self._read_iopub_message(msg)

    def _read_iopub_message(self, msg: dict[str, Any]) -> None:
        msg_type = msg["header"]["msg_type"]
        if msg_type == "comm_msg":
            content = msg["content"]
            if content.get("comm_id") != self._comm_id:
                return
            data = content.get("data") or {}
            if self._pieces.is_piece(data):
                self._pieces.piece(data, list(msg["buffers"]))
                return
            if "stream" in data:
                channel = self._streams.get(data["stream"])
                if channel is not None:
                    channel.on_message(data, list(msg["buffers"]))
                return
            future = self._pending.pop(data.get("id", ""), None)
            try:
                buffers = self._pieces.take(data, list(msg["buffers"]))
            except exchange.ExchangeError as exc:
                if future is not None and not future.done():
                    future.set_exception(exc)
                return
            if future is not None and not future.done():
                future.set_result((data, buffers))
            return
        if msg_type == "comm_close" and msg["content"].get("comm_id") == self._comm_id:
            self._fail_all(
                lambda: RemoteError(
                    "CommClosed",
                    "the kernel closed the dspex comm (is the runtime installed?)",
                    where=self.where(),
                )
            )
            return
        parent = msg.get("parent_header", {}).get("msg_id")
        execution = self._executions.get(parent) if parent else None
        if execution is None:
            return
        if msg_type in OUTPUT_TYPES:
            output = {"output_type": msg_type, **msg["content"]}
            execution.outputs.append(output)
            if execution.on_output is not None:
                execution.on_output(output)
        elif (
            msg_type == "status"
            and msg["content"].get("execution_state") == "idle"
            and not execution.idle.done()
        ):
            execution.idle.set_result(None)

    async def _read_shell(self) -> None:
        channel = self._kc.shell_channel
        while True:
            msg = await self._recv(channel)
            if msg["header"]["msg_type"] != "execute_reply":
                continue
            execution = self._executions.get(msg.get("parent_header", {}).get("msg_id", ""))
            if execution is not None and not execution.reply.done():
                execution.reply.set_result(msg["content"])
