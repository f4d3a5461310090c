"""Figures a kernel reports about itself: memory of its process tree, CPU, GPU memory, host.

The notebook side reads a local kernel's figures from /proc and NVML itself; a kernel on
another machine (SSH host, pod, container) can only be measured from inside. The pool then
asks for them here (op ``kernel_figures``) or, to see them while the kernel is busy with a
call, streams them (``figures_feed``, a generator the stream machinery runs on its own
threads, so samples keep coming while the kernel's main thread works).

Standard library only, as the rest of the runtime: psutil (a runtime dependency) is used when
it is importable, NVML (``nvidia-ml-py``) when installed, torch only if already loaded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import proc_tree
from .ops import OpContext
from .registry import op

# The feed samples this often, and this often when its tree is above NEAR_FRACTION of the
# limit it was given (the notebook side's /proc watch uses the same two intervals).
FEED_INTERVAL_S = 0.5
NEAR_INTERVAL_S = 0.05
NEAR_FRACTION = 0.8
# NVML is asked at most this often: one query takes milliseconds.
GPU_EVERY_S = 2.0


# ---- memory of the kernel's process tree ---------------------------------------------
def _proc_tree(me: int) -> list[int]:
    pids, todo = [me], [me]
    scanned: dict[int, list[int]] | None = None
    while todo:
        pid = todo.pop()
        children = proc_tree.thread_children(pid)
        if children is None:
            scanned = proc_tree.children_by_scan() if scanned is None else scanned
            children = scanned.get(pid, [])
        pids.extend(children)
        todo.extend(children)
    return pids


def _tree() -> tuple[list[int], int]:
    """The kernel's pid and its descendants' pids, and their total RSS."""
    me = os.getpid()
    try:
        import psutil
    except ImportError:
        pids = _proc_tree(me)
        return pids, sum(proc_tree.statm_rss(pid) for pid in pids)
    process = psutil.Process(me)
    processes = [process]
    with contextlib.suppress(psutil.Error):
        processes.extend(process.children(recursive=True))
    total = 0
    pids = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
            pids.append(proc.pid)
    return pids, total


def _memory_total() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * proc_tree.PAGE_SIZE
    except (OSError, ValueError):
        return None


# ---- CPU ------------------------------------------------------------------------------
class _CpuMeter:
    """CPU use of this process (all its threads) between two samples, in % of one core."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, float] | None = None

    def sample(self) -> tuple[float | None, float]:
        times = os.times()
        used = times.user + times.system
        now = time.monotonic()
        with self._lock:
            last, self._last = self._last, (now, used)
        if last is None or now <= last[0]:
            return None, used
        return round(100.0 * (used - last[1]) / (now - last[0]), 1), used


_CPU = _CpuMeter()


# ---- GPU ------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_devices(pids: set[int]) -> list[dict[str, Any]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # not supported on this device or driver
                processes = []
            mine = sum(
                int(getattr(p, "usedGpuMemory", 0) or 0) for p in processes if int(p.pid) in pids
            )
            devices.append(
                {
                    "index": index,
                    "name": _text(pynvml.nvmlDeviceGetName(handle)),
                    "used": int(memory.used),
                    "total": int(memory.total),
                    "kernel_used": mine,
                }
            )
        return devices
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def gpu_figures(pids: set[int]) -> dict[str, Any]:
    """GPU memory per device and what this kernel's processes hold on each: NVML, else torch
    (if this kernel already loaded it and used CUDA), else not available and why.

    In a container NVML names processes by the host's pids, which the kernel cannot see:
    there ``kernel_used`` stays 0 and only the device figures count."""
    reason = "NVML is not available in the kernel (pip install nvidia-ml-py)"
    try:
        import pynvml  # noqa: F401
    except ImportError:
        pass
    else:
        try:
            devices = _nvml_devices(pids)
        except Exception as exc:  # NVML present, no driver or no GPU
            reason = f"no NVIDIA GPU found: {exc}"
        else:
            if devices:
                return {"available": True, "source": "nvml", "reason": "", "devices": devices}
            reason = "NVML sees no GPU"
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                devices = []
                for index in range(torch.cuda.device_count()):
                    free, total = torch.cuda.mem_get_info(index)
                    devices.append(
                        {
                            "index": index,
                            "name": torch.cuda.get_device_name(index),
                            "used": int(total - free),
                            "total": int(total),
                            "kernel_used": int(torch.cuda.memory_reserved(index)),
                        }
                    )
                return {"available": True, "source": "torch", "reason": "", "devices": devices}
    return {"available": False, "source": "none", "reason": reason, "devices": []}


class _GpuCache:
    """The last GPU figures, refreshed at most every GPU_EVERY_S (the feed samples faster)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = -GPU_EVERY_S
        self._value: dict[str, Any] | None = None

    def get(self, pids: set[int], fresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            if fresh or self._value is None or now - self._at >= GPU_EVERY_S:
                self._value, self._at = gpu_figures(pids), now
            return self._value


_GPU = _GpuCache()


# ---- the figures --------------------------------------------------------------------
def kernel_figures(fresh_gpu: bool = False) -> dict[str, Any]:
    """This kernel's figures now: what the pool's health and memory limit use for a kernel
    that is not on the notebook's machine."""
    pids, rss = _tree()
    cpu_percent, cpu_seconds = _CPU.sample()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "rss": rss,
        "processes": len(pids),
        "cpu_percent": cpu_percent,
        "cpu_seconds": round(cpu_seconds, 3),
        "memory_total": _memory_total(),
        "gpu": _GPU.get(set(pids), fresh=fresh_gpu),
    }


@op("kernel_figures")
def kernel_figures_op(ctx: OpContext) -> dict[str, Any]:
    return kernel_figures(fresh_gpu=True)


def figures_feed(
    interval_s: float = FEED_INTERVAL_S,
    limit: int | None = None,
    near_interval_s: float = NEAR_INTERVAL_S,
) -> Iterator[dict[str, Any]]:
    """Figures forever, every ``interval_s``, every ``near_interval_s`` while the tree is
    above NEAR_FRACTION of ``limit`` (so a breach is seen within about that long). Run as a
    stream (``stream_open``): it stops when the stream is closed."""
    while True:
        figures = kernel_figures()
        yield figures
        near = limit is not None and figures["rss"] > NEAR_FRACTION * limit
        time.sleep(near_interval_s if near else interval_s)  # the sampling period itself
