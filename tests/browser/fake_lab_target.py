"""A stand-in for the kernel side of the lab extension, for the browser tests.

Imported inside a notebook's kernel: it registers the ``dspex.lab`` comm target that
``%load_ext dspex_jupyter`` registers for real, sends synthetic snapshots that change over
time, and answers the four actions, so the extension can be tested on its own.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

GIB = 1024**3


def make_snapshot(pool: str) -> dict[str, Any]:
    return {
        "time": time.time(),
        "pools": [
            {
                "name": pool,
                "source": f"env:{pool}-env",
                "size": 2,
                "max_memory": 4 * GIB,
                "deaths": 0,
                "last_error": None,
                "kernels": [
                    {
                        "id": f"{pool}-k0",
                        "pid": 4242,
                        "state": "busy",
                        "session": f"{pool}-s1",
                        "rss": 180 * 1024**2,
                        "uptime": 125.0,
                        "calls_served": 17,
                    },
                    {
                        "id": f"{pool}-k1",
                        "pid": 4243,
                        "state": "idle",
                        "session": None,
                        "rss": 95 * 1024**2,
                        "uptime": 125.0,
                        "calls_served": 9,
                    },
                ],
                "sessions": [f"{pool}-s1"],
                "session_names": {f"{pool}-s1": f"run {pool}-run"},
            }
        ],
        "runs": [
            {
                "run_id": f"{pool}-run",
                "optimizer": "GEPA",
                "status": "running",
                "phase": "trials",
                "step": 0,
                "total": 40,
                "trials": 0,
                "best_score": None,
                "usage": {
                    "calls": 120,
                    "cached_calls": 8,
                    "prompt_tokens": 52623,
                    "completion_tokens": 4743,
                    "total_tokens": 57366,
                },
                "pool": pool,
                "checkpoint_dir": None,
                "error": None,
                "progress_items": [],
            }
        ],
        "gpu": {
            "available": True,
            "devices": [
                {
                    "index": 0,
                    "name": "Fake GPU 80GB",
                    "used": 12 * GIB,
                    "total": 80 * GIB,
                    "kernels": [
                        {"pid": 4242, "pool": pool, "kernel": f"{pool}-k0", "used": 12 * GIB}
                    ],
                }
            ],
        },
        "sessions_active": 1,
        "cwd": "/nonexistent",
    }


class FakeLab:
    """Registers ``dspex.lab`` in this kernel and plays a pool with one run."""

    def __init__(self, pool: str = "alpha", tick: float = 0.5) -> None:
        self.pool = pool
        self.tick = tick
        self.snapshot = make_snapshot(pool)
        self.actions: list[dict[str, Any]] = []
        self.opened = 0
        self._comms: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def install(self) -> FakeLab:
        from IPython import get_ipython

        get_ipython().kernel.comm_manager.register_target("dspex.lab", self._on_open)
        threading.Thread(target=self._run, name="fake-dspex-lab", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # -- comm ------------------------------------------------------------------------

    def _on_open(self, comm: Any, msg: dict[str, Any]) -> None:
        self.opened += 1
        with self._lock:
            self._comms.append(comm)
        comm.on_msg(self._on_msg)
        comm.on_close(lambda _msg: self._forget(comm))
        self._send(comm)

    def _forget(self, comm: Any) -> None:
        with self._lock:
            if comm in self._comms:
                self._comms.remove(comm)

    def _send(self, comm: Any) -> None:
        with self._lock:
            state = copy.deepcopy(self.snapshot)
        state["time"] = time.time()
        comm.send({"type": "state", "state": state})

    def _broadcast(self) -> None:
        with self._lock:
            comms = list(self._comms)
        for comm in comms:
            self._send(comm)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            with self._lock:
                run = self.snapshot["runs"][0]
                if run["status"] == "running" and run["trials"] < run["total"]:
                    run["trials"] += 1
                    run["step"] = run["trials"]
                    # 59.375 ... 87.5 from the 4th trial on: shown as DSPy shows scores.
                    run["best_score"] = 50 + 37.5 * min(run["trials"], 4) / 4
                    # What GEPA-like optimizers report, shown by the sidebar as it comes.
                    run["progress_items"] = [
                        ["Pareto front", f"{1 + run['trials'] // 4} candidates"],
                        ["rollouts", f"{10 * run['trials']} / 400"],
                    ]
                for kernel in self.snapshot["pools"][0]["kernels"]:
                    kernel["uptime"] += self.tick
            self._broadcast()

    def _on_msg(self, msg: dict[str, Any]) -> None:
        data = msg["content"]["data"]
        self.actions.append(data)
        ok, message = self._apply(data.get("action"), data.get("target") or {})
        # The message does not say which comm it came on: answer all (others ignore the id).
        with self._lock:
            comms = list(self._comms)
        for c in comms:
            c.send({"type": "action_result", "id": data.get("id"), "ok": ok, "message": message})
        self._broadcast()

    def _apply(self, action: str, target: dict[str, Any]) -> tuple[bool, str]:
        with self._lock:
            pool = self.snapshot["pools"][0]
            run = self.snapshot["runs"][0]
            if action == "restart_kernel":
                for kernel in pool["kernels"]:
                    if kernel["id"] == target.get("kernel"):
                        kernel.update(state="starting", uptime=0.0, calls_served=0, pid=5000)
                        if kernel["session"] in pool["sessions"]:
                            pool["sessions"].remove(kernel["session"])
                            self.snapshot["sessions_active"] -= 1
                        kernel["session"] = None
                        return True, f"kernel {kernel['id']} restarted"
                return False, f"no kernel {target.get('kernel')!r}"
            if action == "release_session":
                session = target.get("session")
                if session in pool["sessions"]:
                    pool["sessions"].remove(session)
                    self.snapshot["sessions_active"] -= 1
                    for kernel in pool["kernels"]:
                        if kernel["session"] == session:
                            kernel.update(session=None, state="idle")
                    return True, f"session {session} released"
                return False, f"no session {session!r}"
            if target.get("run_id") != run["run_id"]:
                return False, f"no run {target.get('run_id')!r}"
            if action == "checkpoint_run":
                where = f"/tmp/fake-checkpoints/{run['run_id']}/trial-{run['trials']}"
                run["checkpoint_dir"] = where
                return True, f"checkpoint written to {run['checkpoint_dir']}"
            if action == "cancel_run":
                run["status"] = "cancelled"
                run["phase"] = "cancelled"
                return True, f"run {run['run_id']} cancelled after {run['trials']} trials"
            return False, f"unknown action {action!r}"
