"""The one seam a pool sees its kernels through, wherever they run.

jupyter_client already splits "where a kernel runs" into provisioners (``local-provisioner``,
gateway_provisioners' ``distributed-provisioner`` over SSH, ``kubernetes-provisioner``...).
A ``RunningKernel`` is what the pool needs of one kernel on top of that: start it, is it
alive, interrupt it, kill it, its connection info, and ``is_local`` (on this machine: its
memory, /proc and /dev/shm are ours). Everything above asks it instead of assuming a local
process: the exchange tier (files only for local kernels), death detection (a pidfd here,
the provisioner's poll and the heartbeat channel elsewhere), memory figures (/proc here, the
kernel's own reports elsewhere).

- ``LocalKernel``: jupyter_client's local provisioner over IPC sockets in the manager's
  private folder; its death is seen the moment it happens through a pidfd.
- ``ProvisionedKernel``: any other provisioner, over TCP with CurveZMQ encryption and HMAC
  signatures by default; its death is seen by the provisioner's ``poll()`` and by missed
  heartbeats, each checked every second (a death is seen within ~3 s either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from jupyter_client import AsyncKernelManager
from jupyter_client.provisioning import LocalProvisioner

from .errors import TransportNotEncrypted

LOCAL_PROVISIONER = "local-provisioner"
# A kernel elsewhere is asked whether it still runs this often (no pidfd can watch it).
PROVISIONER_POLL_INTERVAL_S = 1.0
# Its heartbeat is pinged this often; this many missed pongs in a row make it dead.
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_MISSES = 3
# A local kernel without pidfd support (not Linux) is polled this often.
LOCAL_POLL_INTERVAL_S = 0.1
ExitCallback = Callable[[int | None], None]
logger = logging.getLogger("dspex_jupyter.kernel_source")


class _KernelManager(AsyncKernelManager):
    """jupyter_client's kernel manager plus one hook: a command put in front of a LOCAL
    kernel's command line (``sh -c 'echo $$ > cgroup.procs; exec "$@"'`` joins a memory
    cgroup before the kernel allocates anything). Other provisioners build their own
    command, maybe for another machine, and get no prefix."""

    launch_prefix: list[str] = []

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        cmd = super().format_kernel_cmd(extra_arguments)
        if self.launch_prefix and isinstance(self.provisioner, LocalProvisioner):
            return [*self.launch_prefix, *cmd]
        return cmd


def provisioner_name(kernelspec: Any) -> str:
    """The provisioner a kernelspec names (jupyter_client's default when none)."""
    metadata = getattr(kernelspec, "metadata", None) or {}
    stanza = metadata.get("kernel_provisioner") or {}
    return str(stanza.get("provisioner_name") or LOCAL_PROVISIONER)


def declares_curve(kernelspec: Any) -> bool:
    """Whether the kernelspec says its kernels take CurveZMQ keys (as jupyter_client reads
    ``metadata.supported_encryption``)."""
    supported = (getattr(kernelspec, "metadata", None) or {}).get("supported_encryption")
    if isinstance(supported, str):
        supported = [supported]
    return isinstance(supported, list | tuple) and "curve" in {
        str(s).strip().lower() for s in supported
    }


def encryption_policy(pool: str, kernelspec: Any, allow_unencrypted: str | None) -> str:
    """jupyter_client's ``transport_encryption`` for a pool's kernels: ``disabled`` for
    local ones (IPC sockets in a 0700 folder reach no network), ``required`` for any other
    provisioner, or ``auto`` when the pool opted out by its own name. Raises
    TransportNotEncrypted when encryption is required and cannot be had."""
    if provisioner_name(kernelspec) == LOCAL_PROVISIONER:
        return "disabled"
    if allow_unencrypted == pool:
        return "auto"
    problem = None
    if not _has_transport_encryption():
        problem = "this jupyter_client cannot encrypt kernel traffic (it needs 8.10 or newer)"
    elif not zmq.has("curve"):
        problem = "this machine's libzmq has no CurveZMQ (zmq.has('curve') is False)"
    elif not declares_curve(kernelspec):
        problem = "its kernelspec does not declare 'curve' in metadata.supported_encryption"
    if problem:
        raise TransportNotEncrypted(
            f"pool {pool!r} runs kernels through {provisioner_name(kernelspec)!r}, whose "
            f"traffic must be encrypted, but {problem}",
            hint="write the kernelspec with `dspex kernelspec ssh|k8s|docker` (it declares "
            "Curve), install pyzmq with libsodium, or accept plain TCP by naming the pool: "
            f"PoolSpec({pool!r}, ..., allow_unencrypted={pool!r})",
        )
    return "required"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _has_transport_encryption() -> bool:
    return "transport_encryption" in AsyncKernelManager.class_trait_names()


class RunningKernel(ABC):
    """One kernel of a pool, as the pool sees it (see the module docstring)."""

    def __init__(self, manager: _KernelManager) -> None:
        self.manager = manager
        self._on_exit: ExitCallback | None = None

    @property
    @abstractmethod
    def is_local(self) -> bool:
        """Whether the kernel shares this machine (its memory, /proc and /dev/shm)."""

    @property
    def pid(self) -> int | None:
        """The kernel's process id on this machine; None when it is not local."""
        return None

    @property
    def connection_info(self) -> dict[str, Any]:
        return dict(self.manager.get_connection_info())

    @property
    def encrypted(self) -> bool:
        """Whether the kernel's channels use CurveZMQ (its connection info has keys)."""
        return getattr(self.manager, "curve_publickey", None) is not None

    async def start(self, **kwargs: Any) -> None:
        """Launch the kernel (``kwargs`` go to the provisioner: env, cwd, stdout...)."""
        await self.manager.start_kernel(**kwargs)

    async def poll(self) -> int | None:
        """The exit code, or None while it runs, as its provisioner sees it."""
        provisioner = self.manager.provisioner
        return None if provisioner is None else await provisioner.poll()

    async def interrupt(self) -> None:
        """Interrupt its running code (the kernelspec's interrupt mode: a signal through the
        provisioner, or a message on the control channel)."""
        await self.manager.interrupt_kernel()

    @abstractmethod
    def kill(self) -> None:
        """Stop it at once (SIGKILL); its death is then seen by ``watch``."""

    @property
    def launched(self) -> bool:
        return bool(self.manager is not None and self.manager.has_kernel)

    async def shutdown(self, now: bool = False, dead: bool = False) -> None:
        """Stop it (at once when ``now`` or already ``dead``) and remove its connection file."""
        manager = self.manager
        with contextlib.suppress(Exception):
            if dead or not await manager.is_alive():
                await manager.shutdown_kernel(now=True)
            else:
                await manager.shutdown_kernel(now=now)

    @abstractmethod
    def watch(self, on_exit: ExitCallback) -> None:
        """Call ``on_exit(exit code or None)`` once, on the loop, when the kernel dies."""

    def unwatch(self) -> None:
        self._on_exit = None

    def _exited(self, code: int | None) -> None:
        callback, self._on_exit = self._on_exit, None
        if callback is not None:
            callback(code)

    def after_ready(self) -> None:  # noqa: B027  (a hook: most kernels need nothing)
        """Called once the kernel answers (local kernels tighten their sockets' modes)."""


class LocalKernel(RunningKernel):
    """A kernel run here by jupyter_client's local provisioner, over IPC sockets."""

    def __init__(self, manager: _KernelManager) -> None:
        super().__init__(manager)
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def _process(self) -> subprocess.Popen[bytes] | None:
        process = getattr(self.manager.provisioner, "process", None)
        return process if isinstance(process, subprocess.Popen) else None

    @property
    def is_local(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def poll_now(self) -> int | None:
        process = self._process
        return process.poll() if process is not None else None

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def watch(self, on_exit: ExitCallback) -> None:
        """A pidfd becomes readable the moment the process exits (Linux); elsewhere, a
        non-blocking waitpid every LOCAL_POLL_INTERVAL_S."""
        self._on_exit = on_exit
        pid = self.pid
        if pid is not None and hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self._fd = os.pidfd_open(pid)
        if self._fd is not None:
            asyncio.get_running_loop().add_reader(self._fd, self._check)
        else:
            self._task = asyncio.ensure_future(self._poll_loop())

    def _check(self) -> None:
        code = self.poll_now()
        if code is not None:
            self._exited(code)

    async def _poll_loop(self) -> None:
        while self._on_exit is not None:
            code = await self.poll()
            if code is not None:
                self._exited(code)
                return
            await asyncio.sleep(LOCAL_POLL_INTERVAL_S)  # poll: no pidfd here

    def unwatch(self) -> None:
        super().unwatch()
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def after_ready(self) -> None:
        """zmq creates IPC sockets with the kernel's umask (0755): the 0700 folder already
        keeps others out; 0600 on the sockets too, so nothing depends on the folder alone."""
        folder = Path(self.manager.connection_file).parent
        for path in folder.glob(f"{Path(self.manager.ip).name}-*"):
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)


class ProvisionedKernel(RunningKernel):
    """A kernel any other provisioner runs, maybe on another machine, over TCP."""

    def __init__(self, manager: _KernelManager) -> None:
        super().__init__(manager)
        self._tasks: list[asyncio.Task[None]] = []
        self._kill_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the manager's, set by start()
        self.missed_heartbeats = 0

    @property
    def is_local(self) -> bool:
        return False

    async def start(self, **kwargs: Any) -> None:
        self._loop = asyncio.get_running_loop()
        _keep_response_listener(response_ip_for(self.manager.kernel_spec))
        try:
            await super().start(**kwargs)
        finally:
            _pause_response_listener()

    def kill(self) -> None:
        """Kill it through its provisioner. Callable from any thread (a widget's button runs
        on its own): the provisioner's coroutine runs on the manager's loop."""
        if self._loop is not None and _running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(self.kill)
            return
        provisioner = self.manager.provisioner
        if provisioner is None or self._kill_task is not None:
            return
        self._kill_task = asyncio.ensure_future(provisioner.kill())
        self._kill_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def watch(self, on_exit: ExitCallback) -> None:
        self._on_exit = on_exit
        self._tasks = [asyncio.ensure_future(self._poll_loop())]
        if self.manager.has_kernel and self.manager.transport == "tcp":
            self._tasks.append(asyncio.ensure_future(self._heartbeat_loop()))

    async def _poll_loop(self) -> None:
        while self._on_exit is not None:
            try:
                code = await self.poll()
            except Exception as exc:  # a provisioner that cannot tell: the heartbeat will
                logger.debug("provisioner poll failed: %s", exc)
                code = None
            if code is not None:
                self._exited(code)
                return
            await asyncio.sleep(PROVISIONER_POLL_INTERVAL_S)  # poll: nothing to wait on

    async def _heartbeat_loop(self) -> None:
        """Ping the kernel's heartbeat channel (an echo on its own thread: a busy kernel
        still answers). HEARTBEAT_MISSES missed pongs in a row: the kernel or its host is
        gone, even when the provisioner cannot tell (a host that stopped answering)."""
        socket = None
        try:
            while self._on_exit is not None:
                if socket is None:
                    socket = self.manager.connect_hb()
                    socket.linger = 0
                await socket.send(b"ping")
                try:
                    await asyncio.wait_for(socket.recv(), HEARTBEAT_INTERVAL_S)
                except asyncio.TimeoutError:
                    if socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        # The pong came; this loop was busy elsewhere (a large decode, a
                        # blocking SSH launch): not a miss.
                        await socket.recv()
                        self.missed_heartbeats = 0
                        continue
                    # A REQ socket waiting for a reply cannot send again: start afresh.
                    socket.close(linger=0)
                    socket = None
                    self.missed_heartbeats += 1
                    if self.missed_heartbeats >= HEARTBEAT_MISSES:
                        self.kill()  # whatever is left of it must not run on unseen
                        self._exited(None)
                        return
                    continue
                self.missed_heartbeats = 0
                await asyncio.sleep(HEARTBEAT_INTERVAL_S)  # the heartbeat's period
        finally:
            if socket is not None:
                socket.close(linger=0)

    def unwatch(self) -> None:
        super().unwatch()
        for task in self._tasks:
            task.cancel()
        self._tasks = []


def open_kernel(
    kernel_spec_manager: Any,
    kernel_name: str,
    connection_file: Path,
    *,
    transport_encryption: str,
    launch_prefix: list[str] | None = None,
) -> RunningKernel:
    """A not yet started kernel of kernelspec ``kernel_name``: local ones over IPC sockets
    beside ``connection_file``, others over TCP with ``transport_encryption``."""
    kernelspec = kernel_spec_manager.get_kernel_spec(kernel_name)
    local = provisioner_name(kernelspec) == LOCAL_PROVISIONER
    encryption = {"transport_encryption": transport_encryption}
    if not _has_transport_encryption():  # jupyter_client < 8.10: local kernels only, or opted out
        encryption = {}
    manager = _KernelManager(
        kernel_spec_manager=kernel_spec_manager,
        kernel_name=kernel_name,
        transport="ipc" if local else "tcp",
        connection_file=str(connection_file),
        **encryption,
    )
    manager.launch_prefix = list(launch_prefix or [])
    if local:
        return LocalKernel(manager)
    _apply_gateway_settings(kernelspec)
    return ProvisionedKernel(manager)


def _apply_gateway_settings(kernelspec: Any) -> None:
    """What gateway_provisioners reads from this process rather than from a kernelspec,
    from what ``dspex kernelspec`` recorded in ``metadata.dspex``: the response listener's
    address (see ``_keep_response_listener``), the SSH login (GP_REMOTE_USER) and port (a
    module global of gateway_provisioners.distributed: one SSH port per process)."""
    dspex = _dspex_metadata(kernelspec)
    if dspex.get("ssh_user"):
        os.environ["GP_REMOTE_USER"] = str(dspex["ssh_user"])
    if dspex.get("ssh_port"):
        from gateway_provisioners import distributed

        distributed.ssh_port = int(dspex["ssh_port"])


def _pause_response_listener() -> None:
    """Stop reading gateway_provisioners' response socket once no launch waits on it.

    Its reader is a PeriodicCallback, every 0.1 ms, that calls ``sock_accept`` on a socket
    with a 10 ms timeout (GP_SOCKET_TIMEOUT): each tick blocks the event loop for up to
    10 ms, which made every call to a remote kernel ~40 ms slower. The socket stays bound;
    the next launch restarts the reader (``_keep_response_listener``)."""
    module = sys.modules.get("gateway_provisioners.response_manager")
    manager = getattr(getattr(module, "ResponseManager", None), "_instance", None)
    if manager is None or manager._response_registry or manager._connection_processor is None:
        return
    manager._connection_processor.stop()
    manager._connection_processor = None


def _dspex_metadata(kernelspec: Any) -> dict[str, Any]:
    dspex = (getattr(kernelspec, "metadata", None) or {}).get("dspex") or {}
    return dspex if isinstance(dspex, dict) and dspex.get("remote") else {}


def response_ip_for(kernelspec: Any) -> str | None:
    """Where gateway_provisioners' response listener must bind for this kernelspec: its
    recorded ``response_ip``, else ``GP_RESPONSE_IP``, else None (gateway_provisioners'
    own choice, this machine's first public address)."""
    ip = _dspex_metadata(kernelspec).get("response_ip") or os.environ.get("GP_RESPONSE_IP")
    return str(ip) if ip else None


def _keep_response_listener(response_ip: str | None) -> None:
    """gateway_provisioners' response listener is one per process, bound once (to
    GP_RESPONSE_IP as read when it was imported), reading on a tornado PeriodicCallback of
    the event loop it first started on. Before a launch it is made to listen where this
    kernelspec says, and on this loop: each PoolManager has its own loop, and once the
    manager that started the listener has shut down, no connection info would be read."""
    if response_ip is not None:
        os.environ.setdefault("GP_RESPONSE_IP", response_ip)  # for a first import
    module = sys.modules.get("gateway_provisioners.response_manager")
    if module is None:
        return
    if response_ip is not None:
        module.response_ip = response_ip  # read when the listener (re)binds
    manager = getattr(module.ResponseManager, "_instance", None)
    if manager is None:
        return
    processor = manager._connection_processor
    loop = getattr(getattr(processor, "io_loop", None), "asyncio_loop", None)
    stale_loop = processor is None or loop is None or loop.is_closed() or not loop.is_running()
    moved = response_ip is not None and manager._response_ip != response_ip
    if moved and not manager._response_registry:  # no launch is waiting on the old address
        manager.stop_response_manager()  # closes the socket: rebound below
        manager._start_response_manager()
    elif stale_loop:
        if processor is not None:
            processor.stop()
        manager._connection_processor = None
        manager._start_response_manager()
