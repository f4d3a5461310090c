"""The actions widgets, magics and the JupyterLab sidebar offer, in one place.

Each returns a one-line outcome for a person to read, or raises a ``DspexError`` whose
message says what went wrong. Some block (a checkpoint waits for the kernel to reach a
safe point): widgets and the lab bridge call them on a thread, never on the kernel's
main thread.

Restarting a kernel changes nothing in the core: the kernel process is killed
(``KernelWorker.kill``, SIGKILL) and the pool, which watches its kernels, starts a
replacement at once, as after any crash; the action returns once the replacement is up.
Anything running there fails with ``KernelDied`` (a session held there:
``SessionKernelLost``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import DspexError, PoolClosed
from . import registry

if TYPE_CHECKING:
    from ..core.pool import Pool
    from ..core.worker import KernelWorker
    from ..optimizers.mipro import OptimizationRun

ACTION_TIMEOUT_S = 120.0


def _pools_named(name: str) -> list[Pool]:
    pools = [m.pools[name] for m in registry.managers() if name in m.pools]
    if not pools:
        registry.find_pool(name)  # raises the clear "no running pool" error
    return pools


async def _workers_of(pool: Pool) -> list[KernelWorker]:
    """The pool's kernels, read on its loop thread (where they change)."""
    return pool.workers


async def _replacement(pool: Pool, killed: KernelWorker, timeout: float) -> list[str]:
    """Wait until the pool saw ``killed`` die and is back at full size; the new kernels."""
    before = {w.id for w in pool.workers}
    if killed.dead is not None:
        await asyncio.wait({killed.dead}, timeout=timeout)
    await pool.await_ready(timeout)
    return sorted(w.id for w in pool.workers if w.id not in before and w.state != "starting")


def restart_kernel(pool: str, kernel: str, timeout: float = ACTION_TIMEOUT_S) -> str:
    """Kill one kernel of a pool and wait for its replacement (see the module docstring)."""
    for found in _pools_named(pool):
        for worker in found.runner.run(_workers_of(found)):
            if worker.id != kernel:
                continue
            if worker.state in ("dead", "stopping"):
                raise DspexError(f"kernel {kernel} is already {worker.state}")
            pid, session = worker.pid, worker.session
            worker.kill()
            lost = f"; session {session} held there is lost" if session else ""
            new = found.runner.run(_replacement(found, worker, timeout))
            replaced = f"replaced by {', '.join(new)}" if new else "its replacement is starting"
            return f"kernel {kernel} (pid {pid}) killed and {replaced}{lost}"
    raise DspexError(
        f"pool {pool!r} has no kernel {kernel!r}",
        hint="kernel ids look like POOL/NUMBER (see %dspex health)",
    )


def release_session(pool: str, session: str) -> str:
    """Give a session's kernel back to its pool (refused for a running optimization)."""
    for run in registry.runs():
        if run.session.id == session and not run.done:
            raise DspexError(
                f"session {session} runs optimization {run.run_id}",
                hint="cancel the run first; its session is released when it ends",
            )
    for found in _pools_named(pool):
        held = {s.id: s for s in found.sessions}
        if session in held:
            held[session].release()
            return f"session {session} released; its kernel is back in pool {pool!r}"
    raise DspexError(f"pool {pool!r} has no session {session!r}")


def checkpoint_run(run: OptimizationRun | str, timeout: float = ACTION_TIMEOUT_S) -> str:
    """Ask a running optimization for a checkpoint now; wait until it is written."""
    run = _run(run)
    if run.done:
        raise DspexError(f"run {run.run_id} has finished ({run.status}); nothing to checkpoint")
    path = run.checkpoint(timeout=timeout)
    return f"checkpoint written: {path.name} ({trial_text(run)}, run {run.run_id})"


def cancel_run(run: OptimizationRun | str, timeout: float = ACTION_TIMEOUT_S) -> str:
    """Stop a running optimization within one trial; it keeps a resumable checkpoint."""
    run = _run(run)
    if run.done:
        raise DspexError(f"run {run.run_id} has already finished ({run.status})")
    path = run.cancel(timeout=timeout)
    if run.status != "cancelled":
        return f"run {run.run_id} ended {run.status} before the cancel took effect"
    where = f"; resumable checkpoint: {path.name}" if path is not None else ""
    return f"cancelled at {trial_text(run)}{where}"


def trials_done(run: OptimizationRun) -> tuple[int, int | None]:
    """(trials done, num_trials) counted as the dashboard's header counts them ("trial
    3/8"): MIPROv2's ``num_trials`` counts minibatch trials, and the full evaluations come
    on top; a run without minibatches counts the full evaluations after the baseline's.
    A trial evaluated again after a resume counts once."""
    options = (getattr(run, "spec", None) or {}).get("compile") or {}
    total = options.get("num_trials")
    minibatch = bool(options.get("minibatch", True))
    evaluations = {
        event.get("number"): event.get("eval", "minibatch")
        for event in list(run.events)
        if event.get("kind") == "trial"
    }
    full = sum(1 for kind in evaluations.values() if kind == "full")
    done = len(evaluations) - full if minibatch else max(0, full - 1)
    return done, total if isinstance(total, int) else None


def trial_text(run: OptimizationRun) -> str:
    """ "trial 3": the k of the dashboard's "trial k/N"."""
    return f"trial {trials_done(run)[0]}"


def _run(run: OptimizationRun | str) -> OptimizationRun:
    return registry.find_run(run) if isinstance(run, str) else run


def run_pool(run: OptimizationRun) -> Pool:
    """The pool a run's session came from, if it still runs (else one of that name)."""
    pool = run.session.pool
    if not pool.closed:
        return pool
    return registry.find_pool(run.session.pool_name)


def resume_run(
    run: OptimizationRun, snapshot: str | None = None, objects: dict[str, Any] | None = None
) -> tuple[OptimizationRun, str]:
    """Resume a stopped run (from ``snapshot`` or its newest checkpoint) in a new session,
    with the notebook objects it was started with."""
    from ..optimizers.mipro import MIPROv2

    if not run.done:
        raise DspexError(f"run {run.run_id} is still {run.status}", hint="cancel it first")
    if run.status == "completed":
        raise DspexError(f"run {run.run_id} completed; there is nothing to resume")
    try:
        pool = run_pool(run)
    except DspexError as exc:
        raise PoolClosed(
            f"the run's pool {run.session.pool_name!r} is not running",
            hint=f"start it again: %dspex start {run.session.pool_name}",
        ) from exc
    given = {**getattr(run, "resume_objects", {}), **(objects or {})}
    run.close()  # a stopped run's kernel goes back to the pool before the new session
    resumed = MIPROv2.resume(
        Path(run.checkpoint_dir),
        pool,
        program=given.get("program"),
        metric=given.get("metric"),
        task_lm=given.get("task_lm"),
        prompt_lm=given.get("prompt_lm"),
        snapshot=snapshot,
    )
    source = snapshot or "its newest checkpoint"
    return resumed, f"resumed run {run.run_id} from {source} in pool {pool.name!r}"
