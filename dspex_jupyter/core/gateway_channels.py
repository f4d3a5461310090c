"""One gateway kernel's websocket: the message transport of a ``KernelWorker`` whose kernel
sits behind a Jupyter Enterprise Gateway or Kernel Gateway.

The wire format is jupyter_server's "legacy" websocket protocol, which Enterprise Gateway 3.3
(jupyter_server 1.x) and Kernel Gateway 3.0.1 both speak when the client asks for no
subprotocol: one JSON text frame per message, with a ``channel`` key; a message with buffers
as one binary frame: u32 count, u32 offsets (big-endian), the JSON, then the buffers. Buffers
always go as binary frames (a JSON text frame would have to base64 them, or lose them).

A dropped connection is opened again for the same kernel with the same ``session_id``: the
gateway buffers the kernel's messages for that session meanwhile and replays them, so
replies and stream items in flight arrive once. What is sent while disconnected waits and
goes once the connection is back. The kernel is lost when the gateway no longer has it
(404: culled or deleted), restarts it under us, or stops answering (GatewayUnavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import socket
import struct
import uuid
from collections import deque
from collections.abc import Callable, Sized
from itertools import pairwise
from typing import Any

import aiohttp
from jupyter_client.jsonutil import json_default
from jupyter_client.session import msg_header

from .errors import GatewayAuthFailed, GatewayError, GatewayUnavailable
from .gateway import GatewayClient

MessageHandler = Callable[[dict[str, Any]], None]
# Why a kernel was lost: the gateway no longer has it, restarted it, or stopped answering.
GONE, RESTARTED, UNAVAILABLE = "gone", "restarted", "unavailable"
# aiohttp's keep-alive ping: a connection through a dead network is seen within this.
WS_HEARTBEAT_S = 30.0
# Neither gateway turns Nagle off on its side (tornado's set_nodelay): a reply of several small
# frames (busy, reply, idle) waits for our ACK of the first, which Linux delays ~40 ms. Asking
# for quick ACKs after each frame read (the flag does not stick) makes a call ~5 ms, not ~48.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
logger = logging.getLogger("dspex_jupyter.gateway")


def pack_message(msg: dict[str, Any], buffers: list[Any]) -> bytes:
    """A message with buffers as one binary frame (jupyter_server's legacy layout)."""
    parts = [json.dumps(msg, default=json_default).encode(), *(memoryview(b) for b in buffers)]
    count = len(parts)
    offsets = [4 * (count + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + memoryview(part).nbytes)
    return b"".join([struct.pack(f"!{count + 1}I", count, *offsets), *parts])


def unpack_message(frame: bytes) -> dict[str, Any]:
    """The message of a binary frame, its buffers as zero-copy views of the frame."""
    view = memoryview(frame)
    if len(view) < 8:
        raise ValueError("binary frame shorter than its header")
    (count,) = struct.unpack_from("!I", view, 0)
    if count < 1 or 4 * (count + 1) > len(view):
        raise ValueError(f"binary frame announces {count} parts in {len(view)} bytes")
    offsets = [*struct.unpack_from(f"!{count}I", view, 4), len(view)]
    if offsets[0] < 4 * (count + 1) or any(a > b for a, b in pairwise(offsets)):
        raise ValueError("binary frame offsets out of order")
    msg = json.loads(bytes(view[offsets[0] : offsets[1]]))
    msg["buffers"] = [view[a:b] for a, b in pairwise(offsets[1:])]
    return msg


class GatewayChannels:
    """The shell and IOPub channels of one gateway kernel, over its websocket."""

    def __init__(
        self,
        client: GatewayClient,
        kernel_id: str,
        on_lost: Callable[[str, BaseException | None], None],
    ) -> None:
        self.client = client
        self.kernel_id = kernel_id
        self._on_lost = on_lost
        # Headers as jupyter_client makes them (msg_header); the gateway signs messages for
        # the kernel, so there is no key here.
        self.session_id = uuid.uuid4().hex
        self._username = getpass.getuser()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._socket: Any = None  # the websocket's TCP socket, for TCP_QUICKACK
        # (binary, frame); (None, None): a frame lost with the connection (a test hook)
        self._outbox: deque[tuple[bool | None, Any]] = deque()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._on_iopub: MessageHandler | None = None
        self._on_shell: MessageHandler | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # Counted so tests (and curious people) can see buffers went as binary frames.
        self.binary_frames_sent = 0
        self.binary_frames_received = 0
        self.reconnects = 0
        self.rejected_messages = 0  # frames that did not parse (logged and dropped)
        # Called once the websocket is back: what was on the wire at the drop may be lost
        # (the worker asks the kernel about the requests it still waits on).
        self.on_reconnected: Callable[[], None] | None = None
        # Test hooks that make a drop happen at a chosen message, deterministically: an
        # incoming message matching ``drop_before_delivering``, or an outgoing one matching
        # ``lose_when_sending`` (msg_type, content), is lost with the connection.
        self.drop_before_delivering: Callable[[dict[str, Any]], bool] | None = None
        self.lose_when_sending: Callable[[str, dict[str, Any]], bool] | None = None

    # ---- the transport seam (see worker.MessageTransport) --------------------------
    async def open(self) -> None:
        """Connect the websocket and start reading and writing."""
        self._use(await self._connect())
        self._connected.set()
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._write_loop()),
        ]

    def send(self, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None) -> str:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": msg_header(msg_id, msg_type, self._username, self.session_id),
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": "shell",
            "buffers": [],
        }
        lose = self.lose_when_sending
        if lose is not None and lose(msg_type, content):
            self.lose_when_sending = None
            self._outbox.append((None, None))  # the writer drops the connection there
        elif buffers:
            self._outbox.append((True, pack_message(msg, buffers)))
        else:
            self._outbox.append((False, json.dumps(msg, default=json_default)))
        self._wake.set()
        return msg_id

    async def wait_ready(self, timeout: float) -> None:
        """Until the kernel answers a kernel_info_request (asked again every second, as
        jupyter_client's wait_for_ready does: a kernel still starting may miss one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg_id = self.send("kernel_info_request", {})
            future = self._replies[msg_id] = loop.create_future()
            try:
                await asyncio.wait_for(future, min(1.0, max(deadline - loop.time(), 0.01)))
                return
            except asyncio.TimeoutError:
                if loop.time() >= deadline:
                    raise TimeoutError(
                        f"gateway kernel {self.kernel_id} did not answer within {timeout:g} s"
                    ) from None
            finally:
                self._replies.pop(msg_id, None)

    def start_reading(
        self, on_iopub: MessageHandler, on_shell: MessageHandler, executing: Sized
    ) -> None:
        """Hand every IOPub and shell message to the worker from now on (``executing`` is
        the ZMQ transport's hint; every frame here is decoded anyway)."""
        self._on_iopub, self._on_shell = on_iopub, on_shell

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        for future in self._replies.values():
            future.cancel()

    def detach(self) -> None:
        """Deliver nothing more and stop reconnecting (the kernel is lost or going)."""
        self._closing = True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def drop(self) -> None:
        """Close the underlying connection abruptly, as a network failure would (tests)."""
        connection = getattr(self._ws, "_conn", None)  # aiohttp keeps it there
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.close()

    # ---- the websocket ----------------------------------------------------------------
    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        client = self.client
        try:
            return await client.session.ws_connect(
                client.channels_url(self.kernel_id, self.session_id),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                heartbeat=WS_HEARTBEAT_S,
                max_msg_size=0,  # our pieces are up to 8 MiB; the gateway bounds its own
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise GatewayAuthFailed(
                    f"gateway {client.config.url} refused pool {client.pool!r}'s token on "
                    f"kernel {self.kernel_id}'s websocket (HTTP 401)"
                ) from exc
            if exc.status in (403, 404):
                raise GatewayError(
                    f"gateway {client.config.url} refused kernel {self.kernel_id}'s websocket "
                    f"(HTTP {exc.status}: {exc.message})"
                ) from exc
            raise

    def _use(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        transport = getattr(getattr(ws, "_conn", None), "transport", None)  # aiohttp keeps it
        self._socket = transport.get_extra_info("socket") if transport is not None else None

    def _quick_ack(self) -> None:
        if self._socket is not None and _QUICKACK is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._socket = None  # not TCP (or closed): nothing to speed up

    async def _read_loop(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for frame in ws:
                    self._quick_ack()
                    if frame.type == aiohttp.WSMsgType.TEXT:
                        self._dispatch_text(frame.data)
                    elif frame.type == aiohttp.WSMsgType.BINARY:
                        self.binary_frames_received += 1
                        self._dispatch_binary(frame.data)
                    elif frame.type == aiohttp.WSMsgType.ERROR:
                        break
            except Exception as exc:  # a broken connection: reconnect below
                logger.debug("gateway kernel %s: websocket read failed: %s", self.kernel_id, exc)
            if self._closing:
                return
            self._connected.clear()
            if not await self._reconnect():
                return

    def _dispatch_text(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError as exc:
            self._reject(exc)
            return
        msg.setdefault("buffers", [])
        self._dispatch(msg)

    def _dispatch_binary(self, data: bytes) -> None:
        try:
            msg = unpack_message(data)
        except (ValueError, struct.error) as exc:
            self._reject(exc)
            return
        self._dispatch(msg)

    def _reject(self, exc: Exception) -> None:
        self.rejected_messages += 1
        logger.warning("gateway kernel %s: dropped a malformed frame: %s", self.kernel_id, exc)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if self._closing:
            return
        drop_at = self.drop_before_delivering
        if drop_at is not None and drop_at(msg):
            self.drop_before_delivering = None
            self.drop()  # as if the connection broke with this message on the wire
            return
        channel = msg.get("channel")
        if channel == "iopub":
            msg_type = msg.get("header", {}).get("msg_type")
            if (
                msg_type == "status"
                and msg.get("content", {}).get("execution_state") in ("restarting", "dead")
                and not msg.get("parent_header")
            ):
                # The gateway's own notice: it restarted the kernel (or could not): the
                # kernel's state, dspex's runtime included, is gone.
                self._lost(RESTARTED, None)
                return
            if msg_type == "shutdown_reply":
                # Nobody asks for a shutdown on this websocket: the gateway stopped the
                # kernel (culled, deleted or restarted it), and may leave the socket open.
                restart = bool(msg.get("content", {}).get("restart"))
                self._lost(RESTARTED if restart else GONE, None)
                return
            if self._on_iopub is not None:
                self._on_iopub(msg)
        elif channel == "shell":
            parent = (msg.get("parent_header") or {}).get("msg_id", "")
            future = self._replies.pop(parent, None)
            if future is not None and not future.done():
                future.set_result(msg)
            elif self._on_shell is not None:
                self._on_shell(msg)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            while self._outbox:
                await self._connected.wait()
                binary, frame = self._outbox[0]
                ws = self._ws
                assert ws is not None
                if binary is None:  # lost on a connection that breaks now (test hook)
                    self._outbox.popleft()
                    self._connected.clear()
                    self.drop()
                    continue
                try:
                    if binary:
                        await ws.send_bytes(frame)
                        self.binary_frames_sent += 1
                    else:
                        await ws.send_str(frame)
                except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
                    # The connection broke under this frame: it stays first in line and goes
                    # once the reader has connected again.
                    logger.debug("gateway kernel %s: send failed: %s", self.kernel_id, exc)
                    if self._ws is ws:
                        self._connected.clear()
                    continue
                self._outbox.popleft()
            self._wake.clear()

    async def _reconnect(self) -> bool:
        """Open the websocket again (same session: the gateway replays what it buffered);
        False once the kernel is lost."""
        client = self.client
        attempt = 0
        while not self._closing:
            try:
                if await client.kernel_model(self.kernel_id) is None:
                    self._lost(GONE, None)
                    return False
                ws = await self._connect()
            except GatewayUnavailable as exc:
                self._lost(UNAVAILABLE, exc)
                return False
            except GatewayError as exc:
                self._lost(GONE, exc)
                return False
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                attempt += 1
                if attempt > client.config.retry_max:
                    self._lost(UNAVAILABLE, client.unavailable("the kernel's websocket", exc))
                    return False
                await asyncio.sleep(client.delay(attempt))  # back-off before a retry
                continue
            old = self._ws
            self._use(ws)
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.close()
            self.reconnects += 1
            logger.info("gateway kernel %s: websocket reconnected", self.kernel_id)
            self._connected.set()
            self._wake.set()
            if self.on_reconnected is not None:
                self.on_reconnected()
            return True
        return False

    def _lost(self, reason: str, error: BaseException | None) -> None:
        if self._closing:
            return
        self._closing = True
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error or GatewayError(f"kernel {self.kernel_id} {reason}"))
        self._on_lost(reason, error)
