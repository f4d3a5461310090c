"""The kernel side of the JupyterLab sidebar: a comm target named ``dspex.lab``.

``%load_ext dspex_jupyter`` registers the target in the notebook's kernel and, at once, opens
a comm of the same name to the frontend (where the extension registered ``dspex.lab`` with
``kernel.registerCommTarget``). States then flow from a kernel thread, so the sidebar is live
while a cell blocks the kernel's main thread (``run.result()`` during Run All): nothing waits
for the shell to be idle. A sidebar that comes later (a reloaded page, a second tab) opens a
comm to the kernel's target itself (``kernel.createComm("dspex.lab")``). JupyterLab and
Notebook 7 send comm messages over a kernel subshell (JEP 91, ipykernel 7), and the bridge
has each handled on the subshell it came on, so opening a comm and the actions too are
served while a cell runs. Both kinds of comm carry the same messages, JSON objects:

kernel -> frontend
    ``{"type": "hello", "version": 1}``: the data of the comm the kernel opens.

    ``{"type": "state", "state": SNAPSHOT}`` when the comm opens, then whenever something
    changed (checked twice a second, so at most two a second) and at least every 2 s (RSS,
    uptime and GPU memory change without events). SNAPSHOT is ``snapshot()``'s dict; its
    schema is in ``dspex_jupyter/notebook/snapshot.py``.

    ``{"type": "action_result", "id": ID, "ok": bool, "message": str}`` once an action
    finished (``message``: its outcome, or what went wrong, in one line).

frontend -> kernel
    ``{"type": "action", "id": ID, "action": NAME, "target": {...}}`` where NAME and
    target are one of

    - ``"restart_kernel"``, ``{"pool": str, "kernel": str}``: kill the kernel (its id from
      the snapshot); the pool starts a replacement;
    - ``"release_session"``, ``{"pool": str, "session": str}``;
    - ``"checkpoint_run"``, ``{"run_id": str}``: answered once the checkpoint is written;
    - ``"cancel_run"``, ``{"run_id": str}``: answered once the run stopped.

    Any other action gets ``ok: false`` with message ``"unknown action 'NAME'"``; a message
    of another type gets ``ok: false``, ``"unknown message type ..."``. ``ID`` is echoed
    as given. Actions run on threads, so the kernel keeps executing cells meanwhile.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..checkpoint import CheckpointError
from ..core.errors import DspexError
from . import actions
from .html_render import first_line
from .snapshot import SHARED

logger = logging.getLogger("dspex_jupyter.notebook")

TARGET_NAME = "dspex.lab"
CHANGE_CHECK_INTERVAL_S = 0.5
REFRESH_INTERVAL_S = 2.0

# action name -> (keys its target needs, what it does)
ACTIONS: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {
    "restart_kernel": (("pool", "kernel"), actions.restart_kernel),
    "release_session": (("pool", "session"), actions.release_session),
    "checkpoint_run": (("run_id",), actions.checkpoint_run),
    "cancel_run": (("run_id",), actions.cancel_run),
}


def state_signature(state: dict[str, Any]) -> str:
    """The snapshot without what changes all the time (time, RSS, uptime, GPU bytes)."""
    stable = copy.deepcopy(state)
    stable.pop("time", None)
    for pool in stable.get("pools", []):
        for kernel in pool.get("kernels", []):
            kernel.pop("rss", None)
            kernel.pop("uptime", None)
    for device in stable.get("gpu", {}).get("devices", []):
        device.pop("used", None)
        for kernel in device.get("kernels", []):
            kernel.pop("used", None)
    return json.dumps(stable, sort_keys=True, default=str)


def _on_own_subshell(data: Any, subshell_id: str | None) -> str | None:
    """ipykernel's routing hook for a comm's incoming messages: the subshell they came on."""
    return subshell_id


class LabBridge:
    """Serves the ``dspex.lab`` comms of this kernel (one per open sidebar)."""

    def __init__(
        self,
        make_snapshot: Callable[[], dict[str, Any]] | None = None,
        *,
        check_interval: float = CHANGE_CHECK_INTERVAL_S,
        refresh_interval: float = REFRESH_INTERVAL_S,
    ) -> None:
        # By default the snapshot shared with the notebook's widgets: one health and NVML
        # query per interval, however many sidebars and widgets are open.
        self._shared = make_snapshot is None
        self._make_snapshot = make_snapshot or SHARED.get
        self.check_interval = check_interval
        self.refresh_interval = refresh_interval
        self._comms: list[Any] = []
        # A condition, not a bare lock: a cell can wait for comms and states (wait_until).
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._comm_manager: Any = None
        self._last_signature: str | None = None
        self._last_sent = float("-inf")
        self.states_sent = 0

    # ---- registration -----------------------------------------------------------
    def register(
        self, comm_manager: Any = None, create_comm: Callable[..., Any] | None = None
    ) -> None:
        """Register the comm target (in the running kernel's comm manager by default), then
        open a comm to the frontends that are already there (``announce``)."""
        if comm_manager is None or create_comm is None:
            import comm

            comm_manager = comm_manager or comm.get_comm_manager()
            create_comm = create_comm or comm.create_comm
        comm_manager.register_target(TARGET_NAME, self.open)
        self._comm_manager = comm_manager
        self.announce(create_comm)

    def announce(self, create_comm: Callable[..., Any]) -> Any:
        """Open a ``dspex.lab`` comm from the kernel: every frontend connected now gets it
        over IOPub and is sent states from the bridge's thread from then on."""
        try:
            comm = create_comm(target_name=TARGET_NAME, data={"type": "hello", "version": 1})
        except Exception:  # no frontend can take comms (a plain IPython): nothing to tell
            logger.debug("dspex lab: could not open a comm to the frontend", exc_info=True)
            return None
        self.open(comm)
        return comm

    def unregister(self) -> None:
        if self._comm_manager is not None:
            with contextlib.suppress(Exception):
                self._comm_manager.unregister_target(TARGET_NAME, self.open)
            self._comm_manager = None
        with self._lock:
            comms, self._comms = self._comms, []
        for comm in comms:
            with contextlib.suppress(Exception):
                comm.close()
        self._wake.set()

    # ---- comms ------------------------------------------------------------------
    def open(self, comm: Any, open_msg: dict[str, Any] | None = None) -> None:
        """A comm is open (a sidebar's, or ours from ``announce``): send the state now, and
        keep it up to date."""
        # ipykernel 7 routes a frontend's messages on a comm to the subshell that last sent
        # on it (a widget may await its reply there). Our sends come from threads, which
        # ipykernel counts as the main shell's, so an action would wait for the running cell.
        # Nothing here awaits a reply on a loop: let each message run on the subshell it came
        # on (JupyterLab sends comm messages over a subshell of their own).
        with contextlib.suppress(AttributeError, TypeError):
            comm._reply_subshell_for = _on_own_subshell  # noqa: SLF001 (ipykernel's hook)
        with self._lock:
            self._comms.append(comm)
            self._lock.notify_all()
        comm.on_msg(lambda msg: self.handle_message(comm, msg))
        comm.on_close(lambda _msg=None: self._forget(comm))
        self.send_state([comm])
        self._ensure_thread()

    def _forget(self, comm: Any) -> None:
        with self._lock:
            if comm in self._comms:
                self._comms.remove(comm)

    def handle_message(self, comm: Any, msg: dict[str, Any]) -> None:
        """A message from the sidebar (``msg`` is the Jupyter message; its data is the JSON)."""
        data = (msg.get("content") or {}).get("data") if isinstance(msg, dict) else None
        if not isinstance(data, dict):
            data = {}
        request_id = data.get("id")
        if data.get("type") != "action":
            self._reply(comm, request_id, False, f"unknown message type {data.get('type')!r}")
            return
        name = data.get("action")
        if name not in ACTIONS:
            self._reply(comm, request_id, False, f"unknown action {name!r}")
            return
        keys, action = ACTIONS[name]
        target = data.get("target")
        if not isinstance(target, dict) or not all(isinstance(target.get(k), str) for k in keys):
            needed = ", ".join(f"{k!r}" for k in keys)
            self._reply(comm, request_id, False, f"{name} needs a target with {needed}")
            return
        args = [target[k] for k in keys]
        threading.Thread(
            target=self._perform,
            args=(comm, request_id, action, args),
            name=f"dspex-lab-{name}",
            daemon=True,
        ).start()

    def _perform(
        self, comm: Any, request_id: Any, action: Callable[..., str], args: list[str]
    ) -> None:
        try:
            ok, message = True, action(*args)
        except (DspexError, CheckpointError, TimeoutError, ValueError, TypeError) as exc:
            ok, message = False, first_line(str(exc))
        except Exception as exc:
            logger.exception("dspex lab action failed")
            ok, message = False, f"{type(exc).__name__}: {first_line(str(exc))}"
        self._reply(comm, request_id, ok, message)
        if self._shared:
            SHARED.invalidate()  # the next state is taken after the action
        self._wake.set()  # the state changed: send it soon

    def _reply(self, comm: Any, request_id: Any, ok: bool, message: str) -> None:
        self._send(comm, {"type": "action_result", "id": request_id, "ok": ok, "message": message})

    def _send(self, comm: Any, data: dict[str, Any]) -> None:
        with self._send_lock, contextlib.suppress(Exception):
            comm.send(data)

    def send_state(self, comms: list[Any] | None = None) -> dict[str, Any]:
        """Take a snapshot and send it (to every open comm by default)."""
        state = self._make_snapshot()
        with self._lock:
            targets = list(self._comms) if comms is None else comms
        self._broadcast(state, targets)
        return state

    def _broadcast(self, state: dict[str, Any], targets: list[Any]) -> None:
        for comm in targets:
            self._send(comm, {"type": "state", "state": state})
        self._last_signature = state_signature(state)
        self._last_sent = time.monotonic()
        with self._lock:
            self.states_sent += 1
            self._lock.notify_all()

    @property
    def connected(self) -> int:
        """How many comms (sidebars, and the kernel's own) are open now."""
        with self._lock:
            return len(self._comms)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds, re-checked as comms open and states go out
        (True), or ``timeout`` seconds pass (False)."""
        with self._lock:
            return self._lock.wait_for(predicate, timeout)

    # ---- keeping the sidebars up to date -----------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._pump, name="dspex-lab-bridge", daemon=True
                )
                self._thread.start()

    def _pump(self) -> None:
        while True:
            self._wake.wait(self.check_interval)
            self._wake.clear()
            with self._lock:
                if not self._comms:
                    self._thread = None
                    return
            # At most one state per check interval, however often something changes.
            since = time.monotonic() - self._last_sent
            if since < self.check_interval:
                time.sleep(self.check_interval - since)
            try:
                state = self._make_snapshot()
            except Exception:
                logger.exception("dspex lab snapshot failed")
                continue
            due = time.monotonic() - self._last_sent >= self.refresh_interval
            if due or state_signature(state) != self._last_signature:
                with self._lock:
                    targets = list(self._comms)
                self._broadcast(state, targets)
