"""The snapshot schema, the pool dashboard's rendering, and the ``dspex.lab`` comm protocol
(a fake comm stands in for the JupyterLab sidebar's)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from dspex_jupyter.notebook.lab_bridge import TARGET_NAME, LabBridge, state_signature
from dspex_jupyter.notebook.pool_dashboard import PoolDashboard
from dspex_jupyter.notebook.snapshot import snapshot
from dspex_jupyter.optimizers import mipro
from tests.unit.test_notebook_fakes import FakeManager, FakeNvml, FakeRun, feed_typical_run

WAIT = 10.0
POOL_KEYS = {
    "name",
    "source",
    "size",
    "max_memory",
    "deaths",
    "last_error",
    "kernels",
    "sessions",
    "session_names",
}
TOP_KEYS = {"time", "pools", "runs", "gpu", "sessions_active", "cwd"}
KERNEL_KEYS = {"id", "pid", "state", "session", "rss", "uptime", "calls_served"}
RUN_KEYS = {
    "run_id",
    "status",
    "phase",
    "step",
    "total",
    "trials",
    "best_score",
    "usage",
    "budget",
    "notice",
    "pool",
    "checkpoint_dir",
    "error",
    "optimizer",
    "progress_items",
}


class FakeComm:
    """What ipykernel's Comm offers the bridge: send, on_msg, on_close, close."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.changed = threading.Condition(threading.RLock())
        self.on_msg_callback = None
        self.on_close_callback = None
        self.closed = False

    def send(self, data: dict[str, Any]) -> None:
        with self.changed:
            self.sent.append(data)
            self.changed.notify_all()

    def on_msg(self, callback) -> None:
        self.on_msg_callback = callback

    def on_close(self, callback) -> None:
        self.on_close_callback = callback

    def close(self) -> None:
        self.closed = True

    # ---- test helpers -----------------------------------------------------------
    def message(self, data: dict[str, Any]) -> None:
        """The frontend sends ``data`` (wrapped as a Jupyter comm_msg)."""
        self.on_msg_callback({"content": {"comm_id": "c1", "data": data}})

    def wait_for(self, predicate, timeout: float = WAIT) -> dict[str, Any]:
        with self.changed:
            found: list[dict[str, Any]] = []

            def seen() -> bool:
                found[:] = [m for m in self.sent if predicate(m)]
                return bool(found)

            assert self.changed.wait_for(seen, timeout), f"not sent; sent: {self.sent[-3:]}"
            return found[-1]

    def result(self, request_id: Any) -> dict[str, Any]:
        return self.wait_for(lambda m: m["type"] == "action_result" and m["id"] == request_id)

    def states(self) -> list[dict[str, Any]]:
        with self.changed:
            return [m for m in self.sent if m["type"] == "state"]


def test_snapshot_follows_the_documented_schema():
    run = FakeRun("run42")
    feed_typical_run(run, trials=4)
    run.error = RuntimeError("first line\nsecond line")
    run.session.id = "s1"  # the run holds the pool's session: the sidebar names it so
    # MOCK NVML: no GPU here.
    state = snapshot([FakeManager()], [run], nvml=FakeNvml({4242: 2**30}))
    assert set(state) == TOP_KEYS and state["cwd"] == os.getcwd()
    (pool,) = state["pools"]
    assert set(pool) == POOL_KEYS and pool["sessions"] == ["s1"] and pool["deaths"] == 1
    assert pool["session_names"] == {"s1": "run run42"}
    assert all(set(k) == KERNEL_KEYS for k in pool["kernels"])
    (summary,) = state["runs"]
    assert set(summary) == RUN_KEYS
    assert summary["phase"] == "search" and (summary["step"], summary["total"]) == (4, 13)
    assert summary["trials"] == 4 and summary["error"] == "first line"
    assert summary["usage"]["calls"] == 40 and summary["pool"] == "fakepool"
    assert set(state["gpu"]) == {"available", "reason", "devices"}
    (device,) = state["gpu"]["devices"]
    assert set(device) == {"index", "name", "used", "total", "kernels"}
    assert set(device["kernels"][0]) == {"pid", "pool", "kernel", "used"}
    assert state["sessions_active"] == 1
    import json

    json.dumps(state)  # JSON-ready as it is


def test_pool_dashboard_renders_pools_and_offers_their_kernels_and_sessions():
    board = PoolDashboard([FakeManager()])
    try:
        table = board.table.value
        assert "fakepool" in table and "fakepool/1" in table and "1 deaths" in table
        assert "300.0 MiB / 1GiB" in table  # the limit in the unit that holds it exactly
        assert [v for _, v in board.kernel_picker.options] == [
            ("fakepool", "fakepool/0"),
            ("fakepool", "fakepool/1"),
        ]
        assert [v for _, v in board.session_picker.options] == [("fakepool", "s1")]
        assert not board.restart_button.disabled and not board.release_button.disabled
    finally:
        board.close()
    empty = PoolDashboard([])
    assert "no pool is running" in empty.table.value and empty.restart_button.disabled
    empty.close()


@pytest.fixture
def state_box():
    return {
        "state": {
            "time": 0.0,
            "pools": [],
            "runs": [],
            "gpu": {"available": False, "reason": "mock", "devices": []},
            "sessions_active": 0,
        }
    }


@pytest.fixture
def bridge(state_box):
    def make() -> dict[str, Any]:
        return {**state_box["state"], "time": time.time()}

    lab = LabBridge(make, check_interval=0.05, refresh_interval=60.0)
    yield lab
    lab.unregister()


def test_register_uses_the_dspex_lab_target(bridge):
    registered = {}

    class FakeCommManager:
        def register_target(self, name, handler):
            registered[name] = handler

        def unregister_target(self, name, handler):
            registered.pop(name)

    opened: list[tuple[FakeComm, dict[str, Any]]] = []

    def create_comm(**kwargs: Any) -> FakeComm:
        comm = FakeComm()
        opened.append((comm, kwargs))
        return comm

    bridge.register(FakeCommManager(), create_comm)
    assert registered == {TARGET_NAME: bridge.open} and TARGET_NAME == "dspex.lab"
    # The kernel opens a comm of its own at once and sends states on it from its thread,
    # so a sidebar needs no answer from a busy shell.
    ((comm, kwargs),) = opened
    assert kwargs == {"target_name": TARGET_NAME, "data": {"type": "hello", "version": 1}}
    assert set(comm.states()[0]["state"]) == TOP_KEYS - {"cwd"}  # the fixture's state
    assert bridge._thread is not None and bridge._thread.is_alive()
    bridge.unregister()
    assert registered == {} and comm.closed


def test_announce_without_a_frontend_does_nothing(bridge):
    def no_frontend(**kwargs: Any) -> Any:
        raise RuntimeError("no kernel")

    assert bridge.announce(no_frontend) is None
    assert bridge._thread is None


def test_state_is_sent_on_open_and_when_something_changed(bridge, state_box):
    comm = FakeComm()
    bridge.open(comm, {"content": {"data": {}}})
    # ipykernel sends this comm's incoming messages to the subshell they came on (not the
    # main shell, busy with a cell), whoever sent on the comm last.
    route = comm._reply_subshell_for
    assert route({"type": "action"}, "subshell-1") == "subshell-1"
    first = comm.states()[0]
    assert set(first["state"]) == TOP_KEYS - {"cwd"}  # the fixture's state
    state_box["state"] = {**state_box["state"], "sessions_active": 3}
    changed = comm.wait_for(lambda m: m["type"] == "state" and m["state"]["sessions_active"] == 3)
    assert changed["state"]["time"] >= first["state"]["time"]
    # Only the time changes from now on: nothing more is sent (refresh every 60 s here).
    count = len(comm.states())
    bridge._wake.set()
    with comm.changed:
        assert not comm.changed.wait_for(lambda: len(comm.states()) > count, 0.3)


def test_state_is_resent_periodically_and_coalesced(state_box):
    sends = 0

    def make():
        nonlocal sends
        sends += 1
        return {**state_box["state"], "time": time.time(), "sessions_active": sends}  # changes

    lab = LabBridge(make, check_interval=0.05, refresh_interval=0.1)
    comm = FakeComm()
    started = time.monotonic()
    lab.open(comm)
    for _ in range(200):  # a storm of wake-ups coalesces into one state per interval
        lab._wake.set()
    comm.wait_for(lambda m: len(comm.states()) >= 5)
    elapsed = time.monotonic() - started
    assert len(comm.states()) <= elapsed / 0.05 + 2
    thread = lab._thread
    comm.on_close_callback({})  # the sidebar closed its comm: the bridge stops sending
    lab._wake.set()
    thread.join(WAIT)
    assert not thread.is_alive() and lab._thread is None
    lab.unregister()


def test_the_four_actions_and_nothing_else(bridge, monkeypatch):
    run = FakeRun("labrun1")
    feed_typical_run(run, trials=3)
    monkeypatch.setitem(mipro._live_runs, run.run_id, run)  # found by its run id
    comm = FakeComm()
    bridge.open(comm)
    comm.message(
        {"type": "action", "id": 1, "action": "checkpoint_run", "target": {"run_id": "labrun1"}}
    )
    assert comm.result(1) == {
        "type": "action_result",
        "id": 1,
        "ok": True,
        "message": "checkpoint written: ckpt-000001.json (trial 1, run labrun1)",
    }
    comm.message(
        {"type": "action", "id": 2, "action": "cancel_run", "target": {"run_id": "labrun1"}}
    )
    reply = comm.result(2)
    assert reply["ok"] and reply["message"].startswith("cancelled at trial 1")
    assert run.cancel_calls == 1
    comm.message(
        {"type": "action", "id": 3, "action": "cancel_run", "target": {"run_id": "labrun1"}}
    )
    assert comm.result(3) == {
        "type": "action_result",
        "id": 3,
        "ok": False,
        "message": "run labrun1 has already finished (cancelled)",
    }
    comm.message(
        {
            "type": "action",
            "id": 4,
            "action": "restart_kernel",
            "target": {"pool": "nosuchpool", "kernel": "nosuchpool/1"},
        }
    )
    reply = comm.result(4)
    assert not reply["ok"] and reply["message"] == "no running pool named 'nosuchpool'"
    comm.message(
        {
            "type": "action",
            "id": 5,
            "action": "release_session",
            "target": {"pool": "nosuchpool", "session": "abc"},
        }
    )
    assert not comm.result(5)["ok"]
    comm.message(
        {"type": "action", "id": "x", "action": "checkpoint_run", "target": {"run_id": "nope"}}
    )
    reply = comm.result("x")
    assert not reply["ok"] and "no optimization run called 'nope'" in reply["message"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"type": "action", "id": 7, "action": "shutdown_everything", "target": {}},
            "unknown action 'shutdown_everything'",
        ),
        (
            {"type": "action", "id": 7, "action": "__init__", "target": {}},
            "unknown action '__init__'",
        ),
        (
            {"type": "action", "id": 7, "action": "restart_kernel", "target": {"pool": "p"}},
            "restart_kernel needs a target with 'pool', 'kernel'",
        ),
        (
            {"type": "action", "id": 7, "action": "cancel_run", "target": "run1"},
            "cancel_run needs a target with 'run_id'",
        ),
        ({"type": "execute", "id": 7, "code": "import os"}, "unknown message type 'execute'"),
    ],
)
def test_anything_else_is_refused(bridge, data, message):
    comm = FakeComm()
    bridge.open(comm)
    comm.message(data)
    assert comm.result(7) == {"type": "action_result", "id": 7, "ok": False, "message": message}


def test_state_signature_ignores_what_always_changes():
    base = {
        "time": 1.0,
        "pools": [{"kernels": [{"id": "p/1", "rss": 1, "uptime": 2.0}]}],
        "runs": [],
        "gpu": {"devices": [{"used": 5, "kernels": [{"used": 3}]}]},
    }
    moved = {
        "time": 9.0,
        "pools": [{"kernels": [{"id": "p/1", "rss": 7, "uptime": 8.0}]}],
        "runs": [],
        "gpu": {"devices": [{"used": 6, "kernels": [{"used": 4}]}]},
    }
    assert state_signature(base) == state_signature(moved)
    moved["pools"][0]["kernels"][0]["id"] = "p/2"
    assert state_signature(base) != state_signature(moved)
