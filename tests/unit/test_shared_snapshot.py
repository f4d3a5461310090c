"""One snapshot for the sidebar and the widgets; what goes off the manager's loop."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from dspex_jupyter.core.gpu import merge_gpu_states
from dspex_jupyter.core.pool import OFFLOAD_MIN_BYTES, _looks_large, _reply_is_large
from dspex_jupyter.notebook import snapshot as snapshot_module
from dspex_jupyter.notebook.gpu_widget import GpuMemoryWidget
from dspex_jupyter.notebook.lab_bridge import LabBridge
from dspex_jupyter.notebook.pool_dashboard import PoolDashboard
from dspex_jupyter.notebook.snapshot import SharedSnapshot, snapshot
from tests.unit.test_notebook_fakes import FakeManager


class CountingSnapshot:
    """``snapshot()`` of a fake manager, counting how often it is taken."""

    def __init__(self) -> None:
        self.taken = 0
        self.lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self.lock:
            self.taken += 1
        return snapshot([FakeManager()], runs=[], gpu=False)


def test_many_readers_share_one_snapshot_until_it_is_old():
    make = CountingSnapshot()
    shared = SharedSnapshot(make, max_age=60.0)
    barrier = threading.Barrier(8)
    seen: list[dict[str, Any]] = []

    def read() -> None:
        barrier.wait()
        seen.append(shared.get())

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert make.taken == 1 and len(seen) == 8 and all(s is seen[0] for s in seen)
    assert shared.get(max_age=0.0) is not seen[0] and make.taken == 2  # taken now
    shared.invalidate()
    shared.get()
    assert make.taken == 3 == shared.taken


def test_sidebar_dashboard_and_gpu_widget_read_the_same_snapshot(monkeypatch):
    make = CountingSnapshot()
    shared = SharedSnapshot(make, max_age=60.0)
    for module in ("snapshot", "lab_bridge", "pool_dashboard", "gpu_widget"):
        monkeypatch.setattr(f"dspex_jupyter.notebook.{module}.SHARED", shared)
    sent: list[dict[str, Any]] = []

    class Comm:
        def send(self, data: dict[str, Any]) -> None:
            sent.append(data)

    bridge = LabBridge()
    board = PoolDashboard()
    widget = GpuMemoryWidget()
    try:
        state = bridge.send_state([Comm()])
        assert sent[0]["state"] is state
        assert "fakepool/1" in board.table.value  # the same pools, from the same snapshot
        assert "fakepool/0" in widget.body.value and "No GPU" in widget.body.value
        assert make.taken == 1  # three readers, one health query
        board.refresh(fresh=True)  # after an action: a snapshot taken now
        assert make.taken == 2
    finally:
        board.close()
        widget.close()
        bridge.unregister()
    assert snapshot_module.SHARED is shared


def test_gpu_states_of_two_managers_merge_into_one_view():
    def state(kernel: str, used: int) -> dict[str, Any]:
        device = {"index": 0, "name": "GPU", "used": 10, "total": 100}
        share = {"pid": 1, "pool": kernel.split("/")[0], "kernel": kernel, "used": used}
        return {
            "available": True,
            "source": "nvml",
            "reason": "",
            "devices": [{**device, "kernels": [share]}],
        }

    merged = merge_gpu_states([state("b/1", 5), state("a/0", 3)])
    (device,) = merged["devices"]
    assert [k["kernel"] for k in device["kernels"]] == ["a/0", "b/1"]
    assert merged["available"] and device["total"] == 100


def test_only_large_values_are_encoded_and_decoded_off_the_loop():
    small = (1, "text", b"x" * 1000, np.zeros(10), [1, 2, 3], {"k": "v"})
    assert not _looks_large(small)
    assert not _looks_large(())  # a no-op call keeps its path on the loop
    big = np.zeros(OFFLOAD_MIN_BYTES, dtype=np.uint8)
    assert _looks_large([big])
    assert _looks_large([b"x" * OFFLOAD_MIN_BYTES])
    assert _looks_large([(1, {"inner": big})])  # inside small containers too
    assert _looks_large([[{"q": i} for i in range(200)]])  # rows that become a table
    assert not _reply_is_large({"enc": "json", "value": None}, [])
    assert _reply_is_large({"enc": "bytes", "type": "bytes", "nbytes": 5, "file": "f.raw"}, [])
    assert _reply_is_large({"enc": "pickle", "buf": 0}, [b"x" * OFFLOAD_MIN_BYTES])
