"""A pool kernel that a Jupyter Enterprise Gateway or Kernel Gateway runs for us.

What the pool asks of every kernel (``kernel_source.RunningKernel``) maps onto the gateway's
REST API: start = ``POST /api/kernels``; alive = ``GET /api/kernels/ID`` (404: gone) and the
websocket (a kernel the gateway culls, deletes or restarts ends its websocket or says so on
it); interrupt, restart and kill/shutdown = ``POST .../interrupt``, ``POST .../restart`` and
``DELETE``. No process, /proc or /dev/shm of it is on this machine (``is_local`` False): values
travel in message buffers, figures come from the kernel, checkpoints are mirrored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .errors import GatewayError
from .gateway import GatewayClient
from .gateway_channels import GONE, RESTARTED, GatewayChannels
from .kernel_source import (
    PROVISIONER_POLL_INTERVAL_S,
    ExitCallback,
    RunningKernel,
    _running_loop,
)

logger = logging.getLogger("dspex_jupyter.gateway")


class GatewayKernel(RunningKernel):
    """One kernel behind a gateway, with its websocket (``channels``) once started."""

    def __init__(self, client: GatewayClient, kernel_name: str) -> None:
        super().__init__(manager=None)  # type: ignore[arg-type]  # no jupyter_client manager
        self.client = client
        self.kernel_name = kernel_name
        self.kernel_id: str | None = None
        self.channels: GatewayChannels | None = None
        # Why the kernel was lost (gateway_channels: gone, restarted, unavailable), if it was.
        self.lost_reason: str | None = None
        self.lost_error: BaseException | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._kill_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the manager's, set by start()

    @property
    def is_local(self) -> bool:
        return False

    @property
    def connection_info(self) -> dict[str, Any]:
        """What there is to say about where it runs (no ports or keys: the gateway holds them)."""
        return {"transport": "websocket", "gateway": self.client.config.url, "id": self.kernel_id}

    @property
    def encrypted(self) -> bool:
        return self.client.config.encrypted

    @property
    def launched(self) -> bool:
        return self.kernel_id is not None

    async def start(self, env: dict[str, str] | None = None, **kwargs: Any) -> None:
        """POST the kernel, then open its websocket. ``launch_timeout`` bounds the launch
        (KERNEL_LAUNCH_TIMEOUT for the gateway); the other keywords are for local kernels."""
        self._loop = asyncio.get_running_loop()
        timeout = float(kwargs.get("launch_timeout") or self.client.config.request_timeout)
        self.kernel_id = await self.client.start_kernel(self.kernel_name, env or {}, timeout)
        self.channels = GatewayChannels(self.client, self.kernel_id, self._lost)
        await self.channels.open()

    async def poll(self) -> int | None:
        """0 once the gateway no longer has the kernel (or lost it), else None. A gateway
        that does not answer raises GatewayUnavailable (after its retries)."""
        if self.lost_reason is not None:
            return 0
        if self.kernel_id is None:
            return None
        return 0 if await self.client.kernel_model(self.kernel_id) is None else None

    async def interrupt(self) -> None:
        if self.kernel_id is not None:
            await self.client.interrupt(self.kernel_id)

    async def restart(self) -> None:
        """Restart through the gateway (``POST .../restart``). The kernel's state, the
        dspex runtime included, is gone: the pool sees it as lost and replaces it."""
        if self.kernel_id is None:
            return
        if self.channels is not None:
            self.channels.detach()  # its notices of this restart must not race the request
        try:
            await self.client.restart(self.kernel_id)
        finally:
            self._lost(RESTARTED, None)  # deleted once the pool lets it go (shutdown)

    def kill(self) -> None:
        """DELETE it through the gateway; the pool sees it gone at once. Callable from any
        thread (a widget's button runs on its own): the request goes out on the kernel's loop."""
        if self._loop is not None and _running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(self.kill)
            return
        if self.kernel_id is None or self._kill_task is not None:
            return
        self._kill_task = asyncio.ensure_future(self._delete_then_lost())
        self._kill_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _delete_then_lost(self) -> None:
        try:
            await self._delete()
        finally:
            self._lost(GONE, None)

    async def _delete(self) -> None:
        if self.kernel_id is not None:
            with contextlib.suppress(GatewayError):  # gone already, or the gateway is
                await self.client.delete(self.kernel_id)

    async def shutdown(self, now: bool = False, dead: bool = False) -> None:
        """Close the websocket and DELETE the kernel (a gateway that is down: nothing to do;
        the gateway's DELETE is its own graceful shutdown, so ``now`` changes nothing)."""
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self.channels is not None:
            await self.channels.close()
        reason, self.lost_reason = self.lost_reason, self.lost_reason or "shut down"
        if reason in (None, RESTARTED):
            await self._delete()

    def watch(self, on_exit: ExitCallback) -> None:
        """``on_exit(None)`` once the kernel is lost: its websocket says so (culled,
        deleted, restarted, the gateway gone), or a GET every PROVISIONER_POLL_INTERVAL_S
        finds it no more."""
        self._on_exit = on_exit
        if self.lost_reason is not None:
            self._exited(None)
            return
        self._poll_task = asyncio.ensure_future(self._poll_loop())

    async def _poll_loop(self) -> None:
        while self._on_exit is not None and self.lost_reason is None:
            try:
                if await self.poll() is not None:
                    self._lost(GONE, None)
                    return
            except GatewayError as exc:  # the websocket's reconnects decide about outages
                logger.debug("gateway kernel %s: poll failed: %s", self.kernel_id, exc)
            await asyncio.sleep(PROVISIONER_POLL_INTERVAL_S)  # poll: nothing to wait on

    def unwatch(self) -> None:
        super().unwatch()
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None

    def _lost(self, reason: str, error: BaseException | None) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason, self.lost_error = reason, error
        logger.info("gateway kernel %s lost (%s): %s", self.kernel_id, reason, error or "")
        if self.channels is not None:
            self.channels.detach()  # nothing more from it reaches the worker
        self._exited(None)
