"""A process tree read from /proc (Linux), standard library only.

Both sides measure process trees: the notebook's /proc watch for its local kernels
(core/memory_limits.py) and a kernel on another machine for itself (runtime/health.py).
psutil does this too, but walking it per process costs more than these reads, and a kernel's
environment may lack psutil.
"""

from __future__ import annotations

import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def statm_rss(pid: int) -> int:
    """Resident memory of one process; 0 when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def has_children_files() -> bool:
    """Whether this Linux has /proc/<pid>/task/<tid>/children (it is a build option)."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def thread_children(pid: int) -> list[int] | None:
    """Direct children of every thread of ``pid``; None where the kernel does not tell."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                found.extend(int(child) for child in fh.read().split())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            continue
    return found


def children_by_scan() -> dict[int, list[int]]:
    """Parent pid -> child pids, from one scan of /proc."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree
