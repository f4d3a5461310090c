"""A pool's ``max_memory``, enforced by the OS where it can be, watched cheaply where not.

- ``CgroupLimits``: each kernel runs in its own memory cgroup (v1, created under this
  process's own memory cgroup, which needs root or a delegated hierarchy). The kernel
  joins it before it allocates anything: ``sh -c 'echo $$ > cgroup.procs; exec kernel'``
  (cgroup v1 cannot move charges made before a move). The kernel's OOM killer enforces
  the limit; an eventfd on ``memory.oom_control`` says when, and one on a
  ``memory.usage_in_bytes`` threshold gives the 90 % warning. Nothing polls.
- ``ProcWatch``: elsewhere, one ``/proc/<pid>/statm`` read per process of the kernel's tree,
  every 0.5 s while far below the limit and every 50 ms above 80 % of it (the tree itself
  is looked up every 2 s, and at every check near the limit).

- ``KernelReportedWatch``: a kernel that is not on this machine (another provisioner: SSH,
  Kubernetes, Docker) is measured by itself: its runtime streams the RSS of its process tree
  (``runtime/health.py``), every 0.5 s and every 50 ms above 80 % of the limit, also while it
  runs a call; each figure is compared with the limit as it arrives. The other two hand such
  kernels to it (``kernel_figures.reports_figures`` says which they are).

``memory_limits()`` picks one; ``DSPEX_MEMORY_LIMITS=cgroup|proc`` forces it (the tests run
both). Either way a breach calls ``on_breach`` and the pool stops the kernel, whose caller
gets ``MemoryLimitExceeded``. cgroup v2 (``memory.max``, via a delegated subtree or
``systemd-run --user --scope``) is not implemented yet: such machines get the /proc watch.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime import proc_tree
from . import kernel_figures
from .errors import MemoryLimitsUnavailable

if TYPE_CHECKING:
    from .worker import KernelWorker

ENV_VAR = "DSPEX_MEMORY_LIMITS"
MODES = ("auto", "cgroup", "proc")
# A warning (once per kernel) when it passes this share of its limit.
WARN_FRACTION = 0.9
# /proc watch: how often a kernel's tree is read, by how close it is to its limit. Far
# below, a jump past the limit is still seen within FAR_INTERVAL_S.
FAR_INTERVAL_S = 0.5
NEAR_INTERVAL_S = 0.05
NEAR_FRACTION = 0.8
# Checks falling due within this much of each other run in the same wake-up.
BATCH_SLACK_S = 0.1
# A kernel's descendants are looked up again at most this often while it is far below its
# limit (every check near it): from /proc/<pid>/task/<tid>/children, or, on a kernel built
# without CONFIG_PROC_CHILDREN, from one scan of /proc.
DESCENDANTS_REFRESH_S = 2.0
# A kernel's cgroup is removed once what ran in it has exited: retried this often, this
# many times.
REMOVE_RETRY_S = 0.1
REMOVE_TRIES = 50
# Put before a local kernel's command: join the cgroup ($0), then become the kernel.
_JOIN_SCRIPT = 'echo $$ > "$0"; exec "$@"'
logger = logging.getLogger("dspex_jupyter.memory")

Callback = Callable[["KernelWorker", int], None]  # (kernel, bytes it uses)


class MemoryLimits(ABC):
    """Keeps one pool's kernels under ``limit`` bytes; tells the pool of a breach."""

    kind = ""

    def __init__(self, limit: int, on_breach: Callback, on_warning: Callback) -> None:
        self.limit = limit
        self._on_breach = on_breach
        self._on_warning = on_warning
        self._warned: set[KernelWorker] = set()

    def prepare(self, worker: KernelWorker) -> None:  # noqa: B027 - optional hook
        """Called before the kernel is launched."""

    @abstractmethod
    def watch(self, worker: KernelWorker) -> None:
        """Start enforcing the limit on a launched (and answering) kernel."""

    @abstractmethod
    def unwatch(self, worker: KernelWorker) -> None:
        """Stop: the kernel is dead or being shut down."""

    @abstractmethod
    def usage(self, worker: KernelWorker) -> int:
        """Bytes the kernel uses, as counted against the limit."""

    def breach_at_death(self, worker: KernelWorker) -> int | None:
        """Bytes used if the OS stopped the kernel for its memory, else None. Asked when a
        death is seen, whichever of the death and the breach event came first."""
        return None

    def _warn_once(self, worker: KernelWorker, used: int) -> None:
        if used > WARN_FRACTION * self.limit and worker not in self._warned:
            self._warned.add(worker)
            self._on_warning(worker, used)


# ---- the /proc watch ----------------------------------------------------------------
class _Descendants:
    """Finds a process's descendants: from /proc children files where the kernel has them,
    else from a /proc scan shared by every kernel. Either costs far more than reading RSS
    (a kernel has a dozen threads, each with a children file), so a kernel's descendants
    are looked up again at most every DESCENDANTS_REFRESH_S, or when asked to (near the
    limit): a new subprocess counts within that time."""

    def __init__(self) -> None:
        self._use_children_files = proc_tree.has_children_files()
        self._tree: dict[int, list[int]] = {}
        self._tree_at = -DESCENDANTS_REFRESH_S
        self._known: dict[int, tuple[float, list[int]]] = {}  # pid: (when, descendants)

    def of(self, pid: int, fresh: bool = False) -> list[int]:
        now = time.monotonic()
        known = self._known.get(pid)
        if known is not None and not fresh and now - known[0] < DESCENDANTS_REFRESH_S:
            return known[1]
        if self._use_children_files:
            found = self._walk(pid, proc_tree.thread_children)
        else:
            if now - self._tree_at >= DESCENDANTS_REFRESH_S:
                self._tree, self._tree_at = proc_tree.children_by_scan(), now
            found = self._walk(pid, lambda p: self._tree.get(p, []))
        self._known[pid] = (now, found)
        return found

    def forget(self, pid: int | None) -> None:
        self._known.pop(pid or 0, None)

    @staticmethod
    def _walk(pid: int, children: Callable[[int], list[int] | None]) -> list[int]:
        found, todo = [], [pid]
        while todo:
            for child in children(todo.pop()) or []:
                found.append(child)
                todo.append(child)
        return found


def process_tree_rss(
    pid: int | None, descendants: _Descendants | None = None, fresh: bool = True
) -> int:
    """RSS of a process and its descendants (what the /proc watch compares with the limit)."""
    if pid is None:
        return 0
    descendants = descendants or _Descendants()
    return proc_tree.statm_rss(pid) + sum(
        proc_tree.statm_rss(child) for child in descendants.of(pid, fresh)
    )


class ProcWatch(MemoryLimits):
    """Reads each kernel's tree from /proc on a schedule that tightens near the limit.
    One timer serves every kernel of the pool (checks falling due together run in one
    wake-up): a wake-up of the loop thread costs more than the reads themselves."""

    kind = "proc"

    def __init__(self, limit: int, on_breach: Callback, on_warning: Callback) -> None:
        super().__init__(limit, on_breach, on_warning)
        self._due: dict[KernelWorker, tuple[float, bool]] = {}  # (when, near the limit)
        self._timer: asyncio.TimerHandle | None = None
        self._descendants = _Descendants()
        self._reported = KernelReportedWatch(limit, on_breach, on_warning)

    def watch(self, worker: KernelWorker) -> None:
        if kernel_figures.reports_figures(worker) or worker.pid is None:
            self._reported.watch(worker)
            return
        self._check(worker, near=True)
        self._reschedule()

    def unwatch(self, worker: KernelWorker) -> None:
        self._reported.unwatch(worker)
        self._due.pop(worker, None)
        self._warned.discard(worker)
        self._descendants.forget(worker.pid)
        if not self._due and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def usage(self, worker: KernelWorker) -> int:
        if self._reported.watches(worker):
            return self._reported.usage(worker)
        return process_tree_rss(worker.pid, self._descendants)

    def breach_at_death(self, worker: KernelWorker) -> int | None:
        return self._reported.breach_at_death(worker)

    def _check(self, worker: KernelWorker, near: bool) -> None:
        self._due.pop(worker, None)
        if worker.state in ("dead", "stopping"):
            return
        used = process_tree_rss(worker.pid, self._descendants, fresh=near)
        if used > self.limit:
            self._on_breach(worker, used)
            return
        self._warn_once(worker, used)
        near = used > NEAR_FRACTION * self.limit
        interval = NEAR_INTERVAL_S if near else FAR_INTERVAL_S
        self._due[worker] = (time.monotonic() + interval, near)

    def _tick(self) -> None:
        self._timer = None
        horizon = time.monotonic() + BATCH_SLACK_S
        for worker, (when, near) in list(self._due.items()):
            if when <= horizon:
                self._check(worker, near)
        self._reschedule()

    def _reschedule(self) -> None:
        if not self._due:
            return
        when = min(due for due, _ in self._due.values())
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if self._timer.when() <= loop.time() + (when - time.monotonic()):
                return
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, when - time.monotonic()), self._tick)


# ---- figures the kernel reports --------------------------------------------------------
class KernelReportedWatch(MemoryLimits):
    """For kernels not on this machine: each figure the kernel streams about its own process
    tree is compared with the limit as it arrives (``core/kernel_figures.py``). A breach
    stops the kernel through its provisioner, as the /proc watch does for a local one."""

    kind = "kernel"

    def __init__(self, limit: int, on_breach: Callback, on_warning: Callback) -> None:
        super().__init__(limit, on_breach, on_warning)
        self._used: dict[KernelWorker, int] = {}

    def watches(self, worker: KernelWorker) -> bool:
        return worker in self._used

    def watch(self, worker: KernelWorker) -> None:
        self._used[worker] = 0
        kernel_figures.follow(worker, limit=self.limit, listener=self._on_figures)

    def unwatch(self, worker: KernelWorker) -> None:
        kernel_figures.unfollow(worker, self._on_figures)
        self._warned.discard(worker)
        self._used.pop(worker, None)

    def usage(self, worker: KernelWorker) -> int:
        return self._used.get(worker, 0)

    def breach_at_death(self, worker: KernelWorker) -> int | None:
        used = self._used.get(worker, 0)
        return used if used > self.limit else None

    def _on_figures(self, worker: KernelWorker, figures: dict[str, Any]) -> None:
        if worker not in self._used or worker.state in ("dead", "stopping"):
            return
        used = int(figures.get("rss") or 0)
        self._used[worker] = used
        if used > self.limit:
            self._on_breach(worker, used)
            return
        self._warn_once(worker, used)


# ---- cgroup v1 ------------------------------------------------------------------------
def own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory folder, if there is one it may create children in."""
    try:
        with open("/proc/self/cgroup") as fh:
            cgroups = fh.read().splitlines()
        with open("/proc/self/mountinfo") as fh:
            mounts = fh.read().splitlines()
    except OSError:
        return None
    relative = next(
        (
            line.split(":", 2)[2]
            for line in cgroups
            if line.count(":") >= 2 and "memory" in line.split(":", 2)[1].split(",")
        ),
        None,
    )
    if relative is None:
        return None
    for line in mounts:
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or len(tail_parts) < 3 or tail_parts[0] != "cgroup":
            continue
        if "memory" not in tail_parts[2].split(","):
            continue
        root, mount_point = parts[3], parts[4]
        if root != "/" and not relative.startswith(root):
            continue
        inside = relative[len(root) :] if root != "/" else relative
        folder = Path(mount_point) / inside.lstrip("/")
        if (folder / "memory.limit_in_bytes").exists() and os.access(folder, os.W_OK):
            return folder
    return None


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _oom_kills(folder: Path) -> int:
    try:
        for line in (folder / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _remove_cgroup(folder: Path, tries: int = REMOVE_TRIES) -> None:
    """Kill what is left in a kernel's cgroup (the kernel is gone), then remove it; its
    charges go to the parent cgroup."""
    with contextlib.suppress(OSError, ValueError):
        for pid in (folder / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    try:
        folder.rmdir()
        _LEFTOVERS.discard(folder)
    except FileNotFoundError:
        _LEFTOVERS.discard(folder)
    except OSError as exc:  # busy: what was killed is still exiting
        _LEFTOVERS.add(folder)
        with contextlib.suppress(RuntimeError):  # on a loop: try again shortly
            if tries > 1:
                asyncio.get_running_loop().call_later(
                    REMOVE_RETRY_S, _remove_cgroup, folder, tries - 1
                )
                return
        logger.warning("memory cgroup %s could not be removed: %s", folder, exc)


def _sweep_stale(parent: Path) -> None:
    """Remove kernel cgroups left by dspex processes that no longer run (killed)."""
    for folder in parent.glob("dspex-*-*"):
        owner = folder.name.split("-")[1]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            _remove_cgroup(folder, tries=1)


def _remove_leftovers() -> None:
    for folder in list(_LEFTOVERS):
        _remove_cgroup(folder, tries=1)


# Kernel cgroups whose processes were still exiting; removed later, at the latest at exit.
_LEFTOVERS: set[Path] = set()
atexit.register(_remove_leftovers)


@dataclass
class _Group:
    folder: Path
    fds: list[int]  # eventfds and the files they watch, closed on unwatch


class CgroupLimits(MemoryLimits):
    """One cgroup v1 memory cgroup per kernel, with the OS enforcing the limit."""

    kind = "cgroup"

    def __init__(self, limit: int, on_breach: Callback, on_warning: Callback, parent: Path) -> None:
        super().__init__(limit, on_breach, on_warning)
        self._parent = parent
        self._groups: dict[KernelWorker, _Group] = {}
        self._fallback = ProcWatch(limit, on_breach, on_warning)

    def prepare(self, worker: KernelWorker) -> None:
        folder = self._parent / f"dspex-{os.getpid()}-{worker.number}"
        try:
            folder.mkdir(mode=0o700)
            (folder / "memory.limit_in_bytes").write_text(str(self.limit))
            memsw = folder / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # with swap, the limit covers swap too
                with contextlib.suppress(OSError):
                    memsw.write_text(str(self.limit))
        except OSError as exc:
            logger.warning("no memory cgroup for kernel %s (%s): watching /proc", worker.id, exc)
            with contextlib.suppress(OSError):
                folder.rmdir()
            return
        self._groups[worker] = _Group(folder, [])
        worker.launch_prefix = ["/bin/sh", "-c", _JOIN_SCRIPT, str(folder / "cgroup.procs")]
        worker.when_gone.append(lambda: _remove_cgroup(folder))

    def watch(self, worker: KernelWorker) -> None:
        if kernel_figures.reports_figures(worker):
            self._fallback.watch(worker)  # measured by the kernel itself
            return
        group = self._groups.get(worker)
        pid = worker.pid
        if group is None or pid is None or not self._holds(group, pid):
            if group is not None:
                logger.warning(
                    "kernel %s did not join its memory cgroup: watching /proc", worker.id
                )
            self._fallback.watch(worker)
            return
        loop = asyncio.get_running_loop()
        oom = self._event(group, "memory.oom_control", "")
        loop.add_reader(oom, self._on_oom, worker, oom)
        warn = self._event(group, "memory.usage_in_bytes", f" {int(WARN_FRACTION * self.limit)}")
        loop.add_reader(warn, self._on_threshold, worker, warn)

    def unwatch(self, worker: KernelWorker) -> None:
        self._fallback.unwatch(worker)
        self._warned.discard(worker)
        group = self._groups.pop(worker, None)
        if group is None:
            return
        loop = asyncio.get_running_loop()
        for fd in group.fds:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def usage(self, worker: KernelWorker) -> int:
        group = self._groups.get(worker)
        if group is None or kernel_figures.reports_figures(worker):
            return self._fallback.usage(worker)
        return _read_int(group.folder / "memory.usage_in_bytes")

    def breach_at_death(self, worker: KernelWorker) -> int | None:
        group = self._groups.get(worker)
        if group is None or kernel_figures.reports_figures(worker):
            return self._fallback.breach_at_death(worker)
        if _oom_kills(group.folder) == 0:
            return None
        return self._peak(group)

    def _peak(self, group: _Group) -> int:
        return max(_read_int(group.folder / "memory.max_usage_in_bytes"), self.limit)

    @staticmethod
    def _holds(group: _Group, pid: int) -> bool:
        try:
            return str(pid) in (group.folder / "cgroup.procs").read_text().split()
        except OSError:
            return False

    @staticmethod
    def _event(group: _Group, control: str, argument: str) -> int:
        """An eventfd the kernel signals on ``control``'s event (cgroup.event_control)."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        group.fds.append(efd)
        cfd = os.open(group.folder / control, os.O_RDONLY | os.O_CLOEXEC)
        group.fds.append(cfd)
        (group.folder / "cgroup.event_control").write_text(f"{efd} {cfd}{argument}")
        return efd

    def _on_oom(self, worker: KernelWorker, efd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(efd)
        group = self._groups.get(worker)
        # Signalled as the OOM killer starts (before its kill is counted), and when the
        # cgroup is removed, which happens only after unwatch.
        if group is not None:
            self._on_breach(worker, self._peak(group))

    def _on_threshold(self, worker: KernelWorker, efd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(efd)
        self._warn_once(worker, self.usage(worker))


def _cgroup_parent_usable(parent: Path) -> bool:
    """Create and remove a probe cgroup: the only sure test that creating one works."""
    probe = parent / f"dspex-probe-{os.getpid()}"
    try:
        probe.mkdir(mode=0o700)
        (probe / "memory.limit_in_bytes").write_text(str(1 << 30))
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return True


def memory_limits(limit: int, on_breach: Callback, on_warning: Callback) -> MemoryLimits:
    """The best way to enforce ``limit`` here, or the one ``$DSPEX_MEMORY_LIMITS`` names."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise MemoryLimitsUnavailable(
            f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}",
            hint=f"unset {ENV_VAR} (dspex picks what works here), or set it to cgroup or proc",
        )
    if mode != "proc":
        parent = own_memory_cgroup()
        if parent is not None and _cgroup_parent_usable(parent):
            _sweep_stale(parent)
            return CgroupLimits(limit, on_breach, on_warning, parent)
        if mode == "cgroup":
            raise MemoryLimitsUnavailable(
                f"{ENV_VAR}=cgroup, but this process cannot create memory cgroups "
                f"(cgroup v1 memory controller, writable: {parent or 'not found'})",
                hint=f"run as root on a cgroup v1 machine, or set {ENV_VAR}=proc",
            )
    return ProcWatch(limit, on_breach, on_warning)
