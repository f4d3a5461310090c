"""GPU memory data source and widget.

There is no GPU on the machines these tests run on, so NVML is MOCKED: ``FakeNvml`` (in
test_notebook_fakes) stands in for the ``pynvml`` module and is injected with ``nvml=``.
The real NVML path is the same code with the real module.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from dspex_jupyter.core.gpu import (
    gpu_memory,
    kernel_memory_rows,
    kernel_refs,
    merge_gpu_states,
    remote_devices,
    with_remote_devices,
)
from dspex_jupyter.notebook.gpu_widget import GpuMemoryWidget
from tests.unit.test_notebook_fakes import FakeManager, FakeNvml

GiB = 2**30


def health_of(manager: FakeManager) -> list[dict]:
    return list(manager.health()["pools"].values())


def test_mocked_nvml_gives_each_kernel_its_share():
    # MOCK NVML (no GPU here): this process holds 3 GiB, a process outside the pools 5 GiB.
    me, outsider = os.getpid(), 1
    nvml = FakeNvml({me: 3 * GiB, outsider: 5 * GiB})
    kernels = kernel_refs(health_of(FakeManager(pids=(me, 999_999))))
    state = gpu_memory(kernels, nvml=nvml)
    assert state["available"] and state["source"] == "nvml" and state["reason"] == ""
    (device,) = state["devices"]
    assert device["name"] == "NVIDIA H100 80GB HBM3 (mock)"  # bytes decoded
    assert (device["index"], device["used"], device["total"]) == (0, 30 * GiB, 80 * GiB)
    assert device["kernels"] == [
        {"pid": me, "pool": "fakepool", "kernel": "fakepool/0", "used": 3 * GiB}
    ]
    assert nvml.initialised == 0  # every nvmlInit was matched by nvmlShutdown


def test_mocked_nvml_counts_a_kernels_child_processes():
    # MOCK NVML: the GPU process is this test process, the "kernel" its parent.
    nvml = FakeNvml({os.getpid(): 2 * GiB, os.getppid(): None})
    kernels = [{"pid": os.getppid(), "pool": "gpu", "kernel": "gpu/7"}]
    (device,) = gpu_memory(kernels, nvml=nvml)["devices"]
    assert device["kernels"] == [
        {"pid": os.getppid(), "pool": "gpu", "kernel": "gpu/7", "used": 2 * GiB}
    ]


def test_without_nvml_torch_is_asked_only_if_cuda_is_already_initialised():
    failing = FakeNvml({}, fail_init=True)  # MOCK: NVML installed, no driver
    fake_torch = SimpleNamespace(
        cuda=SimpleNamespace(
            is_available=lambda: True,
            is_initialized=lambda: True,
            device_count=lambda: 1,
            mem_get_info=lambda i: (60 * GiB, 80 * GiB),
            get_device_name=lambda i: "Fake GPU",
        )
    )
    state = gpu_memory([], nvml=failing, torch=fake_torch)
    assert state["source"] == "torch" and state["available"]
    assert state["devices"] == [
        {"index": 0, "name": "Fake GPU", "used": 20 * GiB, "total": 80 * GiB, "kernels": []}
    ]
    fake_torch.cuda.is_initialized = lambda: False
    state = gpu_memory([], nvml=failing, torch=fake_torch)
    assert not state["available"] and "NVML Shared Library Not Found" in state["reason"]


def test_no_gpu_here_is_reported_and_torch_is_not_imported():
    had_torch = "torch" in sys.modules
    state = gpu_memory([])
    if not had_torch:
        assert "torch" not in sys.modules
    assert state == {"available": False, "source": "none", "reason": state["reason"], "devices": []}
    assert state["reason"]


def test_kernel_memory_rows_compare_rss_with_the_pool_limit():
    rows = kernel_memory_rows(health_of(FakeManager()))
    assert [(r["kernel"], r["rss"], r["max_memory"]) for r in rows] == [
        ("fakepool/0", 300 * 2**20, GiB),
        ("fakepool/1", 300 * 2**20, GiB),
    ]


def test_widget_without_gpu_shows_kernel_rss_against_max_memory():
    widget = GpuMemoryWidget([FakeManager()], nvml=FakeNvml({}, fail_init=True))
    try:
        body = widget.body.value
        assert "<b>No GPU</b>" in body and "NVML Shared Library Not Found" in body
        assert "fakepool/0" in body and "300.0 MiB / 1GiB" in body
    finally:
        widget.close()


def test_widget_with_mocked_gpu_and_its_refresh_timer():
    # MOCK NVML (no GPU here).
    nvml = FakeNvml({4242: 4 * GiB})
    widget = GpuMemoryWidget([FakeManager()], nvml=nvml, interval=0.05)
    try:
        body = widget.body.value
        assert "GPU 0</b> NVIDIA H100 80GB HBM3 (mock)" in body
        assert "30.0 GiB / 80.0 GiB" in body and "fakepool/0" in body and "5.0%" in body
        assert not widget.timer.running
        widget._repr_mimebundle_()  # what displaying it does: refreshing starts
        assert widget.timer.running
    finally:
        widget.close()
    widget.timer._thread.join(5)
    assert not widget.timer.running  # closing the widget stopped it


def _remote_row(kernel_id, host, remote_pid, used, kernel_used):
    """A health row of a kernel on another machine: its runtime measured its host's GPU."""
    gpu = {
        "available": True,
        "source": "nvml",
        "devices": [{"index": 0, "name": "H200", "used": used, "total": 100, "kernel_used": 0}],
    }
    gpu["devices"][0]["kernel_used"] = kernel_used
    return {
        "id": kernel_id,
        "pid": None,
        "figures": "kernel",
        "host": host,
        "remote_pid": remote_pid,
        "gpu": gpu,
    }


def test_gpus_of_other_machines_come_from_their_kernels_reports():
    """No GPU here (mocked away); two kernels on gpu1 share its device 0, one on gpu2."""
    health = [
        {
            "name": "remote",
            "kernels": [
                _remote_row("k0", "gpu1", 11, used=40, kernel_used=30),
                _remote_row("k1", "gpu1", 12, used=45, kernel_used=10),
                _remote_row("k2", "gpu2", 21, used=5, kernel_used=5),
                {"id": "k3", "pid": 99, "figures": "local", "gpu": None},
            ],
        }
    ]
    here = {"available": False, "source": "none", "reason": "NVML sees no GPU", "devices": []}
    state = with_remote_devices(here, health)
    assert state["available"] and state["source"] == "kernel"
    gpu1, gpu2 = state["devices"]
    assert (gpu1["host"], gpu1["index"], gpu1["name"], gpu1["used"]) == (
        "gpu1",
        0,
        "H200 on gpu1",
        45,
    )
    assert [(k["kernel"], k["pid"], k["used"]) for k in gpu1["kernels"]] == [
        ("k0", 11, 30),
        ("k1", 12, 10),
    ]
    assert gpu2["host"] == "gpu2" and [k["kernel"] for k in gpu2["kernels"]] == ["k2"]
    # With a GPU here too, both show; the widget names where each one is.
    local = {
        "available": True,
        "source": "nvml",
        "reason": "",
        "devices": [{"index": 0, "name": "L4", "used": 1, "total": 2, "kernels": []}],
    }
    both = with_remote_devices(local, health)
    assert [d.get("host") for d in both["devices"]] == [None, "gpu1", "gpu2"]
    assert merge_gpu_states([both, both])["devices"][1]["kernels"][0]["kernel"] == "k0"
    assert remote_devices([{"name": "p", "kernels": [{"id": "k", "figures": "local"}]}]) == []
