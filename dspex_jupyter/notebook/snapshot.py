"""One JSON-ready picture of everything dspex runs in this notebook.

The pool dashboard widget renders it and the lab bridge sends it to the JupyterLab
sidebar, whose TypeScript codes against this schema (every key is always present; sizes
are bytes, times are seconds, ``time`` is a Unix timestamp):

    {
      "time": float,                       # when the snapshot was taken
      "pools": [
        {
          "name": str,
          "source": str,                   # where its kernels come from, in words
          "size": int,                     # kernels the pool keeps
          "max_memory": int | null,        # per-kernel RSS limit, bytes
          "deaths": int,                   # kernels that died since the pool started
          "last_error": str,               # "" when none
          "kernels": [
            {
              "id": str,                   # "POOL/NUMBER": the target of restart_kernel
              "pid": int | null,
              "state": str,                # starting | idle | busy | session | stopping | dead
              "session": str | null,       # id of the session holding it
              "rss": int,                  # bytes, the kernel and its children
              "uptime": float,             # seconds
              "calls_served": int
            }
          ],
          "sessions": [str],               # ids of the pool's open sessions
          "session_names": {str: str}      # session id -> what holds it ("run NAME");
                                           # only sessions a known run holds
        }
      ],
      "runs": [
        {
          "run_id": str,
          "optimizer": str,                # "MIPROv2", "GEPA", ... or a teleprompter's class
          "status": str,                   # starting | running | completed | cancelled | failed
          "phase": str | null,             # MIPROv2: bootstrap | propose | search; others theirs
          "step": int,                     # progress within the phase ...
          "total": int | null,             # ... out of this many (search: trials)
          "trials": int,                   # trials evaluated so far
          "best_score": float | null,
          "usage": {"calls": int, "cached_calls": int, "prompt_tokens": int,
                    "completion_tokens": int, "total_tokens": int, "cost": float},
                                           # {} before the first trial
          "budget": {"max_calls": int, "max_tokens": int, "max_cost": float},  # those set
          "notice": str | null,            # "waiting for the LM: ...", or a warning
          "pool": str,
          "checkpoint_dir": str,
          "error": str | null,             # one line
          "progress_items": [[str, str]]   # (label, text) rows of the optimizer's view
        }
      ],
      "gpu": {
        "available": bool,
        "reason": str,                     # why not available (or what is missing); "" if none
        "devices": [
          {
            "index": int, "name": str, "used": int, "total": int,
            "kernels": [{"pid": int, "pool": str, "kernel": str, "used": int}]
          }
        ]
      },
      "sessions_active": int,              # open sessions over all pools
      "cwd": str                           # the notebook kernel's working folder: with the
                                           # notebook's path it tells the sidebar where the
                                           # server's root is, to open checkpoints there
    }
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..core.gpu import gpu_memory, kernel_refs, merge_gpu_states, with_remote_devices
from . import registry
from .html_render import first_line

if TYPE_CHECKING:
    from ..core.manager import PoolManager
    from ..optimizers.runs import OptimizationRun

KERNEL_KEYS = ("id", "pid", "state", "session", "rss", "uptime", "calls_served")
# The shared snapshot is taken again once it is this old (the sidebar asks twice a second).
SHARED_MAX_AGE_S = 0.5


def manager_health(managers: Iterable[PoolManager] | None = None) -> list[dict[str, Any]]:
    """``PoolManager.health()`` of every live manager (or of ``managers``)."""
    found = []
    for manager in registry.managers() if managers is None else managers:
        try:
            found.append(manager.health())
        except RuntimeError:  # shut down meanwhile
            continue
    return found


def pool_health(managers: Iterable[PoolManager] | None = None) -> list[dict[str, Any]]:
    """``Pool.health()`` of every running pool (of every live manager by default)."""
    return [pool for health in manager_health(managers) for pool in health["pools"].values()]


def run_summary(run: OptimizationRun) -> dict[str, Any]:
    phase: dict[str, Any] = {}
    for event in reversed(run.events):
        if event["kind"] == "phase":
            phase = event
            break
    error = first_line(str(run.error)) if run.error is not None else None
    from .optimizer_views import progress_items

    return {
        "run_id": run.run_id,
        "optimizer": getattr(run, "optimizer", None) or "MIPROv2",
        "status": run.status,
        "phase": phase.get("phase"),
        "step": int(phase.get("step") or 0),
        "total": phase.get("total"),
        "trials": int(run.metrics.get("trials", 0)),
        "best_score": run.metrics.get("best_score"),
        "usage": dict(run.metrics.get("usage") or {}),
        "budget": dict(run.metrics.get("budget") or {}),  # max_calls/max_tokens/max_cost
        "notice": getattr(run, "notice", None),  # "waiting for the LM: ...", a warning
        "pool": run.session.pool_name,
        "checkpoint_dir": str(run.checkpoint_dir),
        "error": error,
        "progress_items": [list(item) for item in progress_items(run)],
    }


def session_names(runs: Iterable[OptimizationRun]) -> dict[str, str]:
    """Session id -> "run RUN_ID" for the sessions runs hold: the sidebar names a session by
    what holds it instead of its hex id."""
    names = {}
    for run in runs:
        session_id = getattr(getattr(run, "session", None), "id", None)
        if isinstance(session_id, str):
            names[session_id] = f"run {run.run_id}"
    return names


def snapshot(
    managers: Iterable[PoolManager] | None = None,
    runs: Iterable[OptimizationRun] | None = None,
    *,
    gpu: bool = True,
    nvml: Any = None,
) -> dict[str, Any]:
    """Pools, kernels, sessions, runs and GPU memory now (schema in the module docstring).

    Blocks briefly on the managers' threads: call it from the notebook's thread or a
    timer thread, never from an event callback. Readers that poll use ``shared_snapshot``."""
    healths = manager_health(managers)
    health = [pool for h in healths for pool in h["pools"].values()]
    known_runs = list(registry.runs() if runs is None else runs)
    names = session_names(known_runs)
    pools = [
        {
            "name": p["name"],
            "source": p["source"],
            "size": p["size"],
            "max_memory": p["max_memory"],
            "deaths": p["deaths"],
            "last_error": p["last_error"],
            "kernels": [{k: kernel[k] for k in KERNEL_KEYS} for kernel in p["kernels"]],
            "sessions": list(p["sessions"]),
            "session_names": {s: names[s] for s in p["sessions"] if s in names},
        }
        for p in health
    ]
    if gpu:
        measured = [h["gpu"] for h in healths if "gpu" in h]
        if nvml is None and healths and len(measured) == len(healths):
            memory = merge_gpu_states(measured)  # health() asked NVML already, off its loop
        else:
            memory = with_remote_devices(gpu_memory(kernel_refs(health), nvml=nvml), health)
        gpu_state = {k: memory[k] for k in ("available", "reason", "devices")}
    else:
        gpu_state = {"available": False, "reason": "not measured", "devices": []}
    return {
        "time": time.time(),
        "pools": pools,
        "runs": [run_summary(r) for r in known_runs],
        "gpu": gpu_state,
        "sessions_active": sum(len(p["sessions"]) for p in pools),
        "cwd": os.getcwd(),
    }


class SharedSnapshot:
    """One snapshot for every reader that polls (the JupyterLab sidebar, the pool
    dashboard, the GPU widget): taken at most once per ``max_age`` seconds however many
    read it, so the pools' health and NVML are asked once, not once per reader. It is
    taken on the reading thread (a timer or the bridge's thread), never on a manager's
    event loop. Readers must not modify what ``get`` returns: it is shared."""

    def __init__(
        self,
        make: Callable[[], dict[str, Any]] = snapshot,
        max_age: float = SHARED_MAX_AGE_S,
    ) -> None:
        self._make = make
        self.max_age = max_age
        self._lock = threading.Lock()  # held while taking one: others wait, then share it
        self._state: dict[str, Any] | None = None
        self._taken = float("-inf")
        self.taken = 0  # snapshots taken so far (for tests and benchmarks)

    def get(self, max_age: float | None = None) -> dict[str, Any]:
        """The latest snapshot, taken now if it is older than ``max_age`` (default: the
        source's); ``max_age=0`` for one taken after everything done so far."""
        limit = self.max_age if max_age is None else max_age
        asked = time.monotonic()
        with self._lock:
            # One taken after this call began is fresh enough for any max_age.
            if self._state is None or (self._taken < asked and asked - self._taken >= limit):
                started = time.monotonic()
                self._state = self._make()
                self._taken = started
                self.taken += 1
            return self._state

    def invalidate(self) -> None:
        """Something changed (an action ran): the next ``get`` takes a new snapshot."""
        with self._lock:
            self._state = None


SHARED = SharedSnapshot()


def shared_snapshot(max_age: float | None = None) -> dict[str, Any]:
    """``snapshot()`` of every live manager and run, shared by all its readers."""
    return SHARED.get(max_age)
