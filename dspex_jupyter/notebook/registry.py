"""What this notebook holds: its default PoolManager, and how pools and runs are found.

The magics start pools in one notebook-level manager, created on first use (one per
kernel process); the manager's own atexit hook shuts its kernels down when the notebook's
kernel exits. Pools of managers the user made in Python are found too.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..core.errors import DspexError, PoolNotFound

if TYPE_CHECKING:
    from ..core.manager import PoolManager
    from ..core.pool import Pool
    from ..optimizers.runs import OptimizationRun

_lock = threading.Lock()
_default: PoolManager | None = None
# The --max-memory text each pool was started with ("512MB"), shown back as given.
_memory_texts: dict[str, tuple[str, int]] = {}


def close_names(word: str, choices: Iterable[str]) -> str:
    """The names of ``choices`` close to a misspelt ``word``: "'x'" or "'x' or 'y'"."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=3, cutoff=0.6)
    return " or ".join(repr(name) for name in close)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """The start of a hint, "did you mean 'x'? ", or "" when no name is close."""
    close = close_names(word, choices)
    return f"did you mean {close}? " if close else ""


def remember_memory_text(pool: str, text: str | None, parsed: int | None) -> None:
    """Keep what the user typed for ``pool``'s limit, to show it back in their unit."""
    _memory_texts.pop(pool, None)
    if text is not None and parsed is not None:
        _memory_texts[pool] = (text.strip(), parsed)


def memory_text(pool: str, limit: int | None) -> str:
    """A pool's memory limit as the user gave it ("512MB"); for a pool started elsewhere,
    in the unit that holds it exactly (``PoolSpec(max_memory="512MB")`` reads "512MB")."""
    from ..core.spec import format_limit

    if limit is None:
        return "no limit"
    given = _memory_texts.get(pool)
    if given is not None and given[1] == limit:  # the same limit, not a later restart's
        return given[0]
    return format_limit(limit)


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
        hint=f"{did_you_mean(name, running)}running pools: {', '.join(running) or 'none'}; "
        f"start one with %dspex start {name}",
    )


def runs() -> list[OptimizationRun]:
    from ..optimizers.runs import live_runs

    return live_runs()


def find_run(name: str, namespace: Mapping[str, Any] | None = None) -> OptimizationRun:
    """A run by the variable holding it, or by its run id."""
    from ..optimizers.runs import OptimizationRun

    newest = {run.run_id: run for run in runs()}  # a resumed run replaces its predecessor
    held = namespace.get(name) if namespace is not None else None
    if isinstance(held, OptimizationRun):
        return newest.get(held.run_id, held)
    if name in newest:
        return newest[name]
    known = [r.run_id for r in runs()]
    holders = [
        key
        for key, value in (namespace or {}).items()
        if isinstance(value, OptimizationRun) and not key.startswith("_")
    ]
    raise DspexError(
        f"no optimization run called {name!r}",
        hint=did_you_mean(name, [*holders, *known])
        + "give the variable that holds the run (--name of %dspex optimize) or its run id"
        + (f"; run ids: {', '.join(known)}" if known else ""),
    )
