"""PoolManager: starts and owns pools, inside the process that uses them.

It runs on its own event-loop thread (see loop.py), so kernels are watched and replaced
while notebook cells run or block. Use it as a context manager, or call ``shutdown()``;
it also shuts its kernels down when the process exits normally, and the kernels exit on
their own if the process is killed (ipykernel watches its parent).
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..exchange import ExchangeConfig
from .errors import InvalidSpec, PoolNotFound
from .exchange_dirs import ExchangeArea
from .gpu import gpu_memory, kernel_refs, with_remote_devices
from .launch import resolve_source
from .lifecycle import model_cache_sizes, restore, save_manifest
from .loop import LoopThread
from .pool import Pool
from .session import Session
from .spec import PoolSpec, load_pool_specs

_live_managers: weakref.WeakSet[PoolManager] = weakref.WeakSet()
# Model-cache folders are walked again after this many seconds (see _model_caches).
MODEL_CACHE_TTL_S = 10.0


@atexit.register
def _shutdown_live_managers() -> None:
    for manager in list(_live_managers):
        manager.shutdown(now=True)


class PoolManager:
    """The pools of one notebook (or program), started concurrently and shut down together."""

    def __init__(
        self,
        specs: Iterable[PoolSpec] = (),
        *,
        home: str | Path | None = None,
        start_timeout: float = 120.0,
        exchange: ExchangeConfig | None = None,
    ) -> None:
        self._specs: dict[str, PoolSpec] = {}
        for spec in specs:
            self._add_spec(spec)
        self.home = Path(home).expanduser() if home is not None else None
        self.start_timeout = start_timeout
        # Values past a message's size travel as files in this private folder (tiers and
        # thresholds: dspex_jupyter/exchange.py); folders of killed managers go here.
        self.exchange = ExchangeArea(exchange)
        # Connection files and IPC sockets live here: private to the user (mkdtemp: 0700),
        # and short enough for a Unix socket path.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="dspex-"))
        self.pools: dict[str, Pool] = {}
        self._runner = LoopThread(name="dspex-manager")
        self._closed = False
        self._model_cache: dict[str, tuple[float, dict[str, int]]] = {}  # name: (when, sizes)
        self.restored: dict[str, Any] = {}
        _live_managers.add(self)

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kwargs: Any) -> PoolManager:
        """A manager for the pools of ``dspex.toml`` or ``[tool.dspex]`` in pyproject.toml."""
        return cls(load_pool_specs(path), **kwargs)

    def __repr__(self) -> str:
        return f"<PoolManager pools={sorted(self.pools)} runtime_dir={str(self.runtime_dir)!r}>"

    def _add_spec(self, spec: PoolSpec) -> None:
        if not isinstance(spec, PoolSpec):
            raise InvalidSpec(f"expected a PoolSpec, got {type(spec).__name__}")
        existing = self._specs.get(spec.name)
        if existing is not None and existing != spec:
            raise InvalidSpec(f"two different pools are named {spec.name!r}")
        self._specs[spec.name] = spec

    # ---- loop-thread implementation -------------------------------------------------
    async def _start_pool(self, spec: PoolSpec) -> Pool:
        scratch = self.runtime_dir / "pools" / spec.name
        scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        source = resolve_source(spec, self.home, scratch)
        self.exchange.sweep()  # exchange files of killed managers
        pool = Pool(spec, source, self._runner, self.runtime_dir, self.exchange)
        self.pools[spec.name] = pool
        try:
            await pool._start(self.start_timeout)
        except BaseException:
            self.pools.pop(spec.name, None)
            await pool._shutdown(now=True)
            raise
        return pool

    async def _start(self, specs: list[PoolSpec]) -> list[Pool]:
        todo = [s for s in specs if s.name not in self.pools]
        results = await asyncio.gather(*(self._start_pool(s) for s in todo), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # A pool that failed to start is forgotten, so a corrected spec may take its name.
            for spec in todo:
                if spec.name not in self.pools:
                    self._specs.pop(spec.name, None)
            raise errors[0]
        return [self.pools[s.name] for s in specs]

    async def _stop(self, name: str, now: bool) -> None:
        pool = self.pools.pop(name, None)
        if pool is None:
            raise self._not_found(name)
        await pool._shutdown(now=now)

    async def _shutdown(self, now: bool) -> None:
        pools = list(self.pools.values())
        self.pools.clear()
        await asyncio.gather(*(p._shutdown(now=now) for p in pools), return_exceptions=True)

    async def _health(self) -> dict[str, Any]:
        """Everything slow here (RSS from /proc, model-cache folder walks, NVML) runs on
        the loop's worker threads: a sidebar polling twice a second must not delay calls."""
        running = list(self.pools.items())
        found = await asyncio.gather(*(pool._health() for _, pool in running))
        pools = {name: health for (name, _), health in zip(running, found, strict=True)}
        for (name, _), size in zip(running, await self._model_caches(running), strict=True):
            pools[name]["model_cache"] = size
        gpu = await self._runner.offload(gpu_memory, kernel_refs(pools.values()))
        gpu = with_remote_devices(gpu, pools.values())
        return {
            "pools": pools,
            "gpu": gpu,
            "kernels": sum(len(p["kernels"]) for p in pools.values()),
            "sessions": sum(len(p["sessions"]) for p in pools.values()),
            "runtime_dir": str(self.runtime_dir),
            "exchange_dir": str(self.exchange.root) if self.exchange.root else None,
        }

    async def _model_caches(self, pools: list[tuple[str, Pool]]) -> list[dict[str, int]]:
        """Model-cache sizes of each pool, walked at most every ``MODEL_CACHE_TTL_S``
        (a Hugging Face cache holds thousands of files and changes only on downloads)."""
        now = time.monotonic()
        sizes = []
        for name, pool in pools:
            cached = self._model_cache.get(name)
            if cached is None or now - cached[0] > MODEL_CACHE_TTL_S:
                cached = (now, await self._runner.offload(model_cache_sizes, pool._env))
                self._model_cache[name] = cached
            sizes.append(dict(cached[1]))
        return sizes

    def _not_found(self, name: str) -> PoolNotFound:
        return PoolNotFound(
            f"no pool named {name!r}",
            hint=f"running pools: {', '.join(sorted(self.pools)) or 'none'}; start one with "
            "manager.start(PoolSpec(...))",
        )

    def _specs_for(self, specs: tuple[PoolSpec | str, ...]) -> list[PoolSpec]:
        if not specs:
            return list(self._specs.values())
        chosen = []
        for item in specs:
            if isinstance(item, str):
                if item not in self._specs:
                    raise self._not_found(item)
                chosen.append(self._specs[item])
            else:
                self._add_spec(item)
                chosen.append(item)
        return chosen

    # ---- public API -----------------------------------------------------------------
    def start(self, *specs: PoolSpec | str) -> list[Pool]:
        """Start pools (all configured ones by default) concurrently; return when every
        kernel has answered, run its warm-up imports and its start-up code."""
        return self._runner.run(self._start(self._specs_for(specs)))

    async def astart(self, *specs: PoolSpec | str) -> list[Pool]:
        return await self._runner.wrap(self._start(self._specs_for(specs)))

    def pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise self._not_found(name) from None

    __getitem__ = pool

    def session(self, pool: str, state: dict[str, Any] | None = None, **kwargs: Any) -> Session:
        return self.pool(pool).session(state, **kwargs)

    def stop(self, name: str, *, now: bool = False) -> None:
        """Shut one pool's kernels down."""
        self._runner.run(self._stop(name, now))

    async def astop(self, name: str, *, now: bool = False) -> None:
        await self._runner.wrap(self._stop(name, now))

    def health(self) -> dict[str, Any]:
        """Every pool's kernels: pid, state, session, RSS, uptime, calls served."""
        return self._runner.run(self._health())

    async def ahealth(self) -> dict[str, Any]:
        return await self._runner.wrap(self._health())

    def shutdown(self, *, now: bool = False, manifest: str | Path | None = None) -> None:
        """Stop every kernel and remove connection files, sockets and the runtime folder.

        With ``manifest``, first checkpoint every active run and session and write what is
        needed to bring them back with ``PoolManager.restore(manifest)``."""
        if self._closed:
            return
        if manifest is not None:
            save_manifest(self, Path(manifest))
        self._closed = True
        try:
            if self._runner.running:
                self._runner.run(self._shutdown(now), timeout=60)
        finally:
            self._runner.stop()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.exchange.close()
            _live_managers.discard(self)

    async def ashutdown(self, *, now: bool = False) -> None:
        if self._closed:
            return
        await self._runner.wrap(self._shutdown(now))
        self.shutdown(now=now)

    @classmethod
    def restore(
        cls,
        manifest: str | Path,
        *,
        objects: dict[str, Any] | None = None,
        env_vars: dict[str, Any] | None = None,
        trust: bool = False,
        **kwargs: Any,
    ) -> PoolManager:
        """A new manager running what a graceful shutdown recorded: its pools, sessions
        (with their state) and runs (resumed; ``objects`` maps a run id to the
        program/metric/LMs it needs when those were notebook objects). What came back is
        in ``manager.restored``.

        The manifest holds the names of the pools' ``env_vars``, not their values:
        ``env_vars`` gives them (``{"NAME": value}`` for every pool, ``{"POOL": {...}}``
        for one), else this process's environment does. Only a manifest signed with this
        user's key is restored (it starts kernels and runs start-up code), unless
        ``trust=True``."""
        manager = cls(**kwargs)
        try:
            manager.restored = restore(
                manager, manifest, objects or {}, env_vars=env_vars, trust=trust
            )
        except BaseException:
            manager.shutdown(now=True)
            raise
        return manager

    def __enter__(self) -> PoolManager:
        if self._specs:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> PoolManager:
        if self._specs:
            await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ashutdown()

    # ---- public read-only views (for notebook/ and optimizers/, which stay off privates)
    @property
    def closed(self) -> bool:
        """True once ``shutdown()`` ran."""
        return self._closed

    def spec(self, name: str) -> PoolSpec | None:
        """The settings the pool called ``name`` was configured or started with, if any."""
        return self._specs.get(name)

    def forget_spec(self, name: str) -> None:
        """Drop the settings of a pool that is not running, so that another spec may take
        its name (a running pool keeps its own: stop it first)."""
        if name in self.pools:
            raise InvalidSpec(
                f"pool {name!r} is running with these settings",
                hint=f"stop it first: manager.stop({name!r})",
            )
        self._specs.pop(name, None)


def live_managers() -> list[PoolManager]:
    """Every manager of this process that is not shut down yet."""
    return [m for m in list(_live_managers) if not m.closed]
