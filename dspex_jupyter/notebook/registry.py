"""What this notebook holds: its default PoolManager, and how pools and runs are found.

The magics start pools in one notebook-level manager, created on first use (one per
kernel process); the manager's own atexit hook shuts its kernels down when the notebook's
kernel exits. Pools of managers the user made in Python are found too.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..core.errors import DspexError, PoolNotFound

if TYPE_CHECKING:
    from ..core.manager import PoolManager
    from ..core.pool import Pool
    from ..optimizers.mipro import OptimizationRun

_lock = threading.Lock()
_default: PoolManager | None = None


def default_manager() -> PoolManager:
    """The notebook's manager for pools started with ``%dspex start`` (made on first use)."""
    global _default
    from ..core.manager import PoolManager

    with _lock:
        if _default is None or _default.closed:
            _default = PoolManager()
        return _default


def shutdown_default_manager() -> None:
    """Stop the default manager's kernels now (tests; the atexit hook does it otherwise)."""
    global _default
    with _lock:
        manager, _default = _default, None
    if manager is not None:
        manager.shutdown(now=True)


def managers() -> list[PoolManager]:
    """Every manager of this process that is not shut down, the default one first."""
    from ..core.manager import live_managers

    return sorted(live_managers(), key=lambda m: m is not _default)


def find_pool(name: str) -> Pool:
    """The running pool called ``name`` (the default manager's first)."""
    for manager in managers():
        if name in manager.pools:
            return manager.pools[name]
    running = sorted({p for m in managers() for p in m.pools})
    raise PoolNotFound(
        f"no running pool named {name!r}",
        hint=f"running pools: {', '.join(running) or 'none'}; start one with %dspex start {name}",
    )


def runs() -> list[OptimizationRun]:
    from ..optimizers.mipro import live_runs

    return live_runs()


def find_run(name: str, namespace: Mapping[str, Any] | None = None) -> OptimizationRun:
    """A run by the variable holding it, or by its run id."""
    from ..optimizers.mipro import OptimizationRun

    newest = {run.run_id: run for run in runs()}  # a resumed run replaces its predecessor
    held = namespace.get(name) if namespace is not None else None
    if isinstance(held, OptimizationRun):
        return newest.get(held.run_id, held)
    if name in newest:
        return newest[name]
    known = [r.run_id for r in runs()]
    raise DspexError(
        f"no optimization run called {name!r}",
        hint="give the variable that holds the run (--name of %dspex optimize) or its run id"
        + (f"; run ids: {', '.join(known)}" if known else ""),
    )
