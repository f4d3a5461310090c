"""GPU memory per device and per pool kernel: plain functions returning dicts.

The source is NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``): per device its
name, used and total memory, and per process the memory it holds, which is matched to pool
kernels by pid (a kernel's child processes count as the kernel). Without NVML, torch is
asked, but only if the notebook already imported it and already initialised CUDA (it can
only tell used and total per device, not per process); torch is never imported here.
Without either, ``available`` is False and ``reason`` says why.

    {"available": bool, "source": "nvml" | "torch" | "kernel" | "none", "reason": str,
     "devices": [{"index": int, "name": str, "used": int, "total": int, "host"?: str,
                  "kernels": [{"pid": int, "pool": str, "kernel": str, "used": int}]}]}

Kernels on other machines report their own GPUs (``with_remote_devices``): those devices
carry ``host``, and their kernels' pids are the pids over there.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import psutil


def kernel_refs(health: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{"pid", "pool", "kernel"}`` for every kernel of the given pools' health dicts."""
    refs = []
    for pool in health:
        for kernel in pool.get("kernels", []):
            if kernel.get("pid") is not None:
                refs.append({"pid": kernel["pid"], "pool": pool["name"], "kernel": kernel["id"]})
    return refs


def load_nvml() -> Any | None:
    """The ``pynvml`` module (package ``nvidia-ml-py``), or None if it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _owner(pid: int, kernels: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The pool kernel ``pid`` is, or descends from."""
    if pid in kernels:
        return kernels[pid]
    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process(pid).parents():
            if parent.pid in kernels:
                return kernels[parent.pid]
    return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def nvml_devices(nvml: Any, kernels: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every GPU NVML sees, with the memory each pool kernel holds on it."""
    by_pid = {int(k["pid"]): dict(k) for k in kernels}
    nvml.nvmlInit()
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            shares: dict[str, dict[str, Any]] = {}
            try:
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # not supported on this device or driver
                processes = []
            for process in processes:
                owner = _owner(int(process.pid), by_pid)
                if owner is None:
                    continue
                share = shares.setdefault(
                    owner["kernel"],
                    {
                        "pid": owner["pid"],
                        "pool": owner["pool"],
                        "kernel": owner["kernel"],
                        "used": 0,
                    },
                )
                share["used"] += int(getattr(process, "usedGpuMemory", 0) or 0)
            devices.append(
                {
                    "index": index,
                    "name": _text(nvml.nvmlDeviceGetName(handle)),
                    "used": int(memory.used),
                    "total": int(memory.total),
                    "kernels": sorted(shares.values(), key=lambda s: s["kernel"]),
                }
            )
        return devices
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def torch_devices(torch: Any) -> list[dict[str, Any]]:
    """Used and total memory per device, from torch in this process (no per-kernel shares)."""
    devices = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "used": int(total - free),
                "total": int(total),
                "kernels": [],
            }
        )
    return devices


def gpu_memory(
    kernels: Iterable[Mapping[str, Any]] = (), *, nvml: Any = None, torch: Any = None
) -> dict[str, Any]:
    """GPU memory now (schema in the module docstring). ``nvml``/``torch`` replace the
    modules found in this process (tests inject fakes)."""
    kernels = list(kernels)
    nvml = nvml if nvml is not None else load_nvml()
    reason = "NVML is not available (pip install nvidia-ml-py)"
    if nvml is not None:
        try:
            devices = nvml_devices(nvml, kernels)
        except Exception as exc:  # NVML present, no driver or no GPU
            reason = f"no NVIDIA GPU found: {exc}"
        else:
            if devices:
                return {"available": True, "source": "nvml", "reason": "", "devices": devices}
            reason = "NVML sees no GPU"
    torch = torch if torch is not None else sys.modules.get("torch")
    if torch is not None:
        try:
            usable = torch.cuda.is_available() and torch.cuda.is_initialized()
        except Exception:
            usable = False
        if usable:
            return {
                "available": True,
                "source": "torch",
                "reason": "per-kernel shares need NVML (pip install nvidia-ml-py)",
                "devices": torch_devices(torch),
            }
    return {"available": False, "source": "none", "reason": reason, "devices": []}


def remote_devices(health: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """GPUs of other machines, as their kernels report them (``runtime/health.py``: NVML
    there, not here): one device per host and index, each reporting kernel's share in it.
    A device carries ``host``, and its name says where it is."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for pool in health:
        for kernel in pool.get("kernels", []):
            reported = kernel.get("gpu") or {}
            if kernel.get("figures") != "kernel" or not reported.get("available"):
                continue
            host = str(kernel.get("host") or "?")
            for device in reported.get("devices", []):
                key = (host, int(device["index"]))
                entry = found.setdefault(
                    key,
                    {
                        "index": key[1],
                        "host": host,
                        "name": f"{device.get('name', '')} on {host}",
                        "used": 0,
                        "total": int(device.get("total") or 0),
                        "kernels": [],
                    },
                )
                entry["used"] = max(entry["used"], int(device.get("used") or 0))
                entry["kernels"].append(
                    {
                        "pid": kernel.get("remote_pid"),
                        "pool": pool["name"],
                        "kernel": kernel["id"],
                        "used": int(device.get("kernel_used") or 0),
                    }
                )
    return [found[key] for key in sorted(found)]


def with_remote_devices(
    state: Mapping[str, Any], health: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """This machine's GPU view plus the devices kernels on other machines report."""
    remote = remote_devices(health)
    if not remote:
        return dict(state)
    if not state.get("available"):
        return {"available": True, "source": "kernel", "reason": "", "devices": remote}
    return {**state, "devices": [*state["devices"], *remote]}


def merge_gpu_states(states: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One ``gpu_memory`` view from several taken together (one per manager, each naming
    only its own kernels): the first's devices, with every state's kernel shares."""
    states = list(states)
    if not states:
        return gpu_memory()
    merged = {**states[0], "devices": [dict(d, kernels=[]) for d in states[0]["devices"]]}
    by_index = {(d.get("host"), d["index"]): d for d in merged["devices"]}
    for state in states[1:]:  # another manager's kernels on another machine's GPU
        for device in state.get("devices", []):
            if (device.get("host"), device["index"]) not in by_index:
                by_index[device.get("host"), device["index"]] = dict(device, kernels=[])
                merged["devices"].append(by_index[device.get("host"), device["index"]])
                merged["available"] = True
    for state in states:
        for device in state.get("devices", []):
            by_index[device.get("host"), device["index"]]["kernels"].extend(
                device.get("kernels", [])
            )
    for device in merged["devices"]:
        device["kernels"].sort(key=lambda s: s["kernel"])
    return merged


def kernel_memory_rows(health: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each kernel's RSS against its pool's ``max_memory`` (the no-GPU view)."""
    rows = []
    for pool in health:
        for kernel in pool.get("kernels", []):
            rows.append(
                {
                    "pool": pool["name"],
                    "kernel": kernel["id"],
                    "pid": kernel.get("pid"),
                    "state": kernel.get("state"),
                    "rss": int(kernel.get("rss") or 0),
                    "max_memory": pool.get("max_memory"),
                }
            )
    return rows
