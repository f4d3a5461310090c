"""One managed kernel: how it was started (its kernel source), how its messages travel (a
message transport), the dspex comm, and the requests in flight on it. Lives on the manager's
event-loop thread.

The message transport is the seam between the worker and the wire: ``ZmqTransport`` (a
jupyter_client client on the kernel's ZMQ shell and IOPub sockets, for local kernels and
kernels through a provisioner) or ``gateway_channels.GatewayChannels`` (a gateway kernel's
websocket). The worker only sends (msg_type, content, buffers) on shell and is handed each
IOPub and shell message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from jupyter_client.session import Session as JupyterSession

from .. import exchange, protocol
from ..exchange import MESSAGE_ONLY, ExchangeConfig
from .errors import (
    DspexError,
    GatewayKernelLost,
    GatewayReplyLost,
    GatewaySessionLost,
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
from .gateway_channels import GatewayChannels
from .gateway_kernel import GatewayKernel
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
# How a gateway kernel was lost (GatewayKernel.lost_reason), in an error's words.
_GATEWAY_LOSSES = {
    "unavailable": "was lost with",
    "restarted": "was restarted by",
    "gone": "was stopped (culled or deleted) by",
}
# After a gateway websocket came back, how long an execute whose IOPub "idle" came back
# waits for its execute_reply (shell), which may travel beside it in another order.
EXECUTE_REPLY_GRACE_S = 2.0
logger = logging.getLogger("dspex_jupyter.worker")


MessageHandler = Callable[[dict[str, Any]], None]


class MessageTransport(Protocol):
    """How a worker's messages reach its kernel and come back (see the module docstring)."""

    rejected_messages: int  # messages dropped because they failed to verify or parse

    def send(self, msg_type: str, content: dict[str, Any], buffers: list[Any] | None) -> str:
        """Send a message on shell now; its msg_id."""

    async def wait_ready(self, timeout: float) -> None:
        """Return once the kernel answers a kernel_info_request."""

    def start_reading(
        self, on_iopub: MessageHandler, on_shell: MessageHandler, executing: Sized
    ) -> None:
        """Hand each IOPub and shell message to the handlers from now on; IOPub status
        messages may be skipped undecoded while ``executing`` is empty."""

    async def close(self) -> None:
        """Stop reading and close the channels (the kernel itself is not stopped)."""


class ZmqTransport:
    """jupyter_client's client on the kernel's ZMQ shell and IOPub sockets (signed
    messages; CurveZMQ when the connection info has keys)."""

    def __init__(self, manager: Any, name: str) -> None:
        self.client = manager.client()
        self.client.start_channels(hb=False, stdin=False, control=False)
        self.jsession: JupyterSession = self.client.session
        self.rejected_messages = 0
        self._name = name
        self._readers: list[asyncio.Task[None]] = []

    def send(self, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None) -> str:
        msg = self.jsession.msg(msg_type, content)
        self.jsession.send(self.client.shell_channel.socket, msg, buffers=buffers)
        return str(msg["header"]["msg_id"])

    async def wait_ready(self, timeout: float) -> None:
        await self.client.wait_for_ready(timeout=timeout)

    def start_reading(
        self, on_iopub: MessageHandler, on_shell: MessageHandler, executing: Sized
    ) -> None:
        self._readers = [
            asyncio.ensure_future(self._read_iopub(on_iopub, executing)),
            asyncio.ensure_future(self._read_shell(on_shell)),
        ]

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers = []
        self.client.stop_channels()

    def _deserialize(self, raw: list[bytes]) -> dict[str, Any] | None:
        """A signed message, or None for one that fails its signature or is malformed:
        it is dropped (and logged), and the reader goes on."""
        try:
            _, parts = self.jsession.feed_identities(raw)
            return self.jsession.deserialize(parts)
        except Exception as exc:
            logger.warning(
                "kernel %s: dropped a message that failed to verify: %s", self._name, exc
            )
            self.rejected_messages += 1
            return None

    async def _read_iopub(self, on_message: MessageHandler, executing: Sized) -> None:
        socket = self.client.iopub_channel.socket
        while True:
            raw = await socket.recv_multipart()
            # Status messages matter only while code executes; skip decoding them
            # otherwise (each call's reply comes between a "busy" and an "idle").
            if not executing and raw[0].endswith(b".status"):
                continue
            msg = self._deserialize(raw)
            if msg is not None:
                on_message(msg)

    async def _read_shell(self, on_message: MessageHandler) -> None:
        socket = self.client.shell_channel.socket
        while True:
            msg = self._deserialize(await socket.recv_multipart())
            if msg is not None:
                on_message(msg)


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
        self.log_path: Path | None = None
        self._env = env
        self._runtime_dir = runtime_dir
        self._transport_encryption = transport_encryption
        # The kernel itself, wherever it runs (core/kernel_source.py); set by start().
        self.kernel: RunningKernel | None = None
        self._km: Any = None
        # How messages travel (set by start()); for ZMQ also its jupyter_client client.
        self._transport: MessageTransport | None = None
        self._kc: Any = None
        self._jsession: JupyterSession | None = None
        self._comm_id = uuid.uuid4().hex
        self._pending: dict[str, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._executions: dict[str, _Execution] = {}
        self._streams: dict[str, StreamChannel] = {}
        self.dead: asyncio.Future[None] | None = None
        # How values travel to and from this kernel; the pool sets its folder at start.
        self.exchange: ExchangeConfig = MESSAGE_ONLY
        # Buffers of a message to or from a kernel elsewhere go in pieces of at most this
        # many bytes (None: whole, for a local kernel, whose big values go through files).
        self.chunk_bytes: int | None = None
        self._pieces = exchange.PieceReceiver()
        # A gateway kernel keeps its recent replies for us (its websocket may drop with a
        # reply on the wire): the ids of replies we got go back with the next request.
        self._keeps_replies = False
        self._acked: list[str] = []
        self._recoveries: set[asyncio.Task[None]] = set()
        self.replies_resent = 0  # replies lost with a websocket that the kernel sent again

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
    def rejected_messages(self) -> int:
        """Messages dropped because they failed their signature check or did not parse."""
        return self._transport.rejected_messages if self._transport is not None else 0

    @property
    def transport(self) -> MessageTransport | None:
        """How this kernel's messages travel (ZmqTransport, or a gateway's websocket)."""
        return self._transport

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
        if self.source.gateway is not None:
            await self._launch_through_gateway(timeout)
        else:
            await self._launch(timeout)
        self.started_at = time.time()
        if on_launch is not None:
            on_launch(self)
        if self._transport is None:  # ZMQ: jupyter_client's client on the kernel's sockets
            zmq_transport = ZmqTransport(self._km, self.id)
            self._kc, self._jsession = zmq_transport.client, zmq_transport.jsession
            self._transport = zmq_transport
        ready = asyncio.ensure_future(self._transport.wait_ready(timeout))
        await asyncio.wait([ready, self.dead], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise KernelDied(
                f"kernel {self.id} exited during start-up (exit code {self.exit_code})",
                where=self.where(),
                hint=f"run {self.source.python} -m ipykernel_launcher to see why it fails",
            )
        ready.result()
        assert self.kernel is not None
        self.kernel.after_ready()
        # Looked up per message, not bound once: tests (and diagnostics) wrap these methods
        # on a running worker.
        self._transport.start_reading(
            lambda msg: self._read_iopub_message(msg),
            lambda msg: self._read_shell_message(msg),
            self._executions,
        )
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
        over_gateway = isinstance(self.kernel, GatewayKernel)
        hello, _ = await self.request("hello", {"keep_replies": True} if over_gateway else {})
        if hello.get("protocol") != protocol.PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"kernel {self.id} speaks dspex protocol {hello.get('protocol')}, "
                f"this client speaks {protocol.PROTOCOL_VERSION}",
                hint="install the same dspex-jupyter version in the pool's environment",
            )
        if over_gateway:
            self._keeps_replies = True
            assert isinstance(self._transport, GatewayChannels)
            self._transport.on_reconnected = self._after_reconnect
        if over_gateway and self._env:
            # A gateway passes a kernel only the variables it allows (Enterprise Gateway:
            # KERNEL_* and its allowed list): the rest of the pool's follow over the channel.
            await self.request("environ", {"variables": dict(self._env)})

    async def _launch(self, timeout: float) -> None:
        """Start a kernel through jupyter_client: locally, or through its provisioner."""
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

    async def _launch_through_gateway(self, timeout: float) -> None:
        """POST the kernel to the pool's gateway and open its websocket (the transport)."""
        gateway = self.source.gateway
        assert gateway is not None
        self.kernel = GatewayKernel(gateway, self.source.kernel_name)
        self.chunk_bytes = exchange.CHUNK_BYTES
        try:
            await self.kernel.start(env=self._env, launch_timeout=timeout)
        except DspexError:
            raise
        except Exception as exc:
            raise RemoteLaunchFailed(
                f"kernel {self.id} of pool {self.pool!r} could not be started by "
                f"{self.source.description}: {type(exc).__name__}: {exc}",
                hint="check the gateway's log for the kernel's launch",
            ) from exc
        self._transport = self.kernel.channels

    @property
    def launched(self) -> bool:
        return self.kernel is not None and self.kernel.launched

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
        gateway_error = self._gateway_loss()
        if gateway_error is not None:
            return gateway_error
        if self.session is not None:
            return SessionKernelLost(
                f"the kernel of session {self.session!r} in pool {self.pool!r} died"
                f"{signal_note}; the session's state is lost",
                where=self.where(),
            )
        return KernelDied(
            f"kernel {self.id} of pool {self.pool!r} died{signal_note}", where=self.where()
        )

    def _gateway_loss(self) -> KernelDied | None:
        """The error of a kernel lost with its gateway (classified as GatewayUnavailable
        too), or of one the gateway restarted, culled or deleted; None otherwise."""
        kernel = self.kernel
        if not isinstance(kernel, GatewayKernel) or kernel.lost_reason not in _GATEWAY_LOSSES:
            return None
        lost = f"; session {self.session!r} and its state are lost" if self.session else ""
        if kernel.lost_reason == "unavailable":
            error_class = GatewaySessionLost if self.session else GatewayKernelLost
            return error_class(
                f"kernel {self.id} of pool {self.pool!r} was lost with its gateway "
                f"({kernel.lost_error}){lost}",
                where=self.where(),
            )
        error_class = SessionKernelLost if self.session else KernelDied
        return error_class(
            f"kernel {self.id} of pool {self.pool!r} {_GATEWAY_LOSSES[kernel.lost_reason]} "
            f"its gateway{lost}",
            where=self.where(),
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
        """Wait until nothing is in flight on this kernel; False if that took too long.
        What is sent meanwhile (a health call opening the figures feed of a kernel
        elsewhere) is waited for too, within the same ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.inflight:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            futures = [*self._pending.values()]
            futures += [e.idle for e in self._executions.values()]
            await asyncio.wait(futures, timeout=remaining)
        return True

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
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
        if self.kernel is not None:
            await self.kernel.shutdown(now=now, dead=self.state == "dead")
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
        assert self._transport is not None
        return self._transport.send(msg_type, content, buffers)

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
        if self._acked:
            message["acked"], self._acked = self._acked, []
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
            if self._keeps_replies and isinstance(data.get("id"), str):
                self._acked.append(data["id"])  # the kernel may forget it now
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

    # ---- after a gateway's websocket came back ----------------------------------------
    def _after_reconnect(self) -> None:
        """What was on the wire when the websocket dropped is lost (the gateway replays only
        what came after it noticed): ask the kernel about everything still awaited."""
        requests, executions = list(self._pending), list(self._executions)
        if self.state in ("dead", "stopping") or not (requests or executions):
            return
        task = asyncio.ensure_future(self._recover(requests, executions))
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recover(self, requests: list[str], executions: list[str]) -> None:
        """Kept replies are sent again, running ones come normally, the rest fail now with
        GatewayReplyLost. The kernel answers in order: once ``replies`` is answered, every
        reply it sent before has arrived, so a reply still awaited then was lost."""
        try:
            statuses, _ = await self.request("replies", {"ids": requests})
            lost = [r for r in requests if statuses.get(r) == "kept" and r in self._pending]
            if lost:
                self.replies_resent += len(lost)  # counted first: a copy resolves its call
                await self.request("replies", {"ids": lost, "resend": True})
        except DspexError as exc:  # the kernel died or is lost meanwhile: failed elsewhere
            logger.info("kernel %s: no reply recovery after reconnect: %s", self.id, exc)
            return
        for req_id in requests:
            status = statuses.get(req_id)
            future = self._pending.get(req_id)
            if future is None or status == "running" or future.done():
                continue
            del self._pending[req_id]
            future.set_exception(self._reply_lost(f"the reply to request {req_id}", status))
        await self._recover_executions(executions)

    async def _recover_executions(self, msg_ids: list[str]) -> None:
        """Executes sent before the drop have finished in the kernel by now (it handles
        shell requests in order); one whose IOPub idle is missing lost its messages."""
        executions = [e for e in map(self._executions.get, msg_ids) if e is not None]
        replies = [e.reply for e in executions if e.idle.done() and not e.reply.done()]
        if replies:
            await asyncio.wait(replies, timeout=EXECUTE_REPLY_GRACE_S)
        for execution in executions:
            for future in (execution.reply, execution.idle):
                if not future.done():
                    future.set_exception(self._reply_lost("an execute's reply or outputs", None))

    def _reply_lost(self, what: str, status: str | None) -> GatewayReplyLost:
        why = {
            "not_kept": "the kernel ran it, but its reply was too big to keep or was evicted",
            "unknown": "the kernel never received the request",
            "kept": "the kernel's second copy did not arrive either",
        }.get(status or "", "its messages were lost with the connection")
        return GatewayReplyLost(
            f"{what} on kernel {self.id} of pool {self.pool!r} was lost when the gateway's "
            f"websocket dropped: {why}"
        )

    def _read_shell_message(self, msg: dict[str, Any]) -> None:
        if msg["header"]["msg_type"] != "execute_reply":
            return
        execution = self._executions.get(msg.get("parent_header", {}).get("msg_id", ""))
        if execution is not None and not execution.reply.done():
            execution.reply.set_result(msg["content"])
