"""The manager's private exchange folder: one sub-folder per kernel, and the clean-up of
folders left behind by killed processes.

Layout (default parent ``/dev/shm``, memory-backed, so a "file" costs no disk I/O)::

    /dev/shm/dspex-<uid>/                       0700, shared by this user's managers
        <pid>-<start time>-<random>/            0700, one manager
            <pool>/k<n>/                        0700, one kernel: its requests and replies

A kernel's folder is removed when the kernel dies (whatever it was writing goes with
it) and a pool's when the pool stops. A manager killed with SIGKILL cannot clean up: the
next manager (at start, at each pool start, and at shutdown) removes every folder whose
owner process no longer exists; the start time in the name guards against a reused pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

import psutil

from ..exchange import ExchangeConfig, ExchangeError, have_module, private_folder_problem

_OWNER = re.compile(r"^(\d+)-(\d+)-[0-9a-f]{8}$")


def default_parent() -> Path:
    """``/dev/shm/dspex-<uid>`` where there is a /dev/shm, else the temp folder's."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else tempfile.gettempdir()
    return Path(base) / f"dspex-{os.getuid()}"


def _start_stamp(pid: int) -> int | None:
    """A process's start time in centiseconds (None when it does not exist)."""
    try:
        return round(psutil.Process(pid).create_time() * 100)
    except psutil.Error:
        return None


def _owner_alive(name: str) -> bool:
    match = _OWNER.match(name)
    if match is None:
        return True  # not ours: never touched
    stamp = _start_stamp(int(match.group(1)))
    return stamp is not None and abs(stamp - int(match.group(2))) <= 1


def sweep_stale(parent: str | Path) -> list[Path]:
    """Remove manager folders under ``parent`` whose process is gone; return them."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if not _owner_alive(entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _usable_parent(path: Path, ours: bool) -> None:
    """Make the parent folder if needed, and refuse one where another user could swap
    our folder: the default one must be private to us, a given one ours or sticky."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    mine = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    if ours and mine and info.st_mode & 0o077:
        os.chmod(path, 0o700)
    problem = private_folder_problem(str(path)) if ours else None
    if not ours and not stat.S_ISDIR(info.st_mode):
        problem = f"{path} is not a folder"
    elif not ours and not mine and not info.st_mode & stat.S_ISVTX:
        problem = f"{path} belongs to another user and is not sticky"
    if problem:
        raise ExchangeError(
            f"cannot use {path} for exchange files: {problem}; pass "
            "PoolManager(exchange=ExchangeConfig(folder=...)) to use another place"
        )


class ExchangeArea:
    """One manager's exchange folder (None when shared memory is off)."""

    def __init__(self, config: ExchangeConfig | None = None) -> None:
        self.config = config or ExchangeConfig()
        given = self.config.folder
        self.parent = Path(given).expanduser() if given else default_parent()
        self.root: Path | None = None
        if not self.config.shared_memory:
            return
        _usable_parent(self.parent, ours=not self.config.folder)
        self.sweep()
        me = os.getpid()
        name = f"{me}-{_start_stamp(me)}-{secrets.token_hex(4)}"
        self.root = self.parent / name
        self.root.mkdir(mode=0o700)
        os.chmod(self.root, 0o700)  # whatever the umask

    def sweep(self) -> list[Path]:
        """Remove the folders of managers that were killed."""
        return sweep_stale(self.parent) if self.config.shared_memory else []

    def kernel_folder(self, pool: str, number: int) -> Path | None:
        if self.root is None:
            return None
        folder = self.root / pool / f"k{number}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (folder.parent, folder):
            os.chmod(path, 0o700)
        return folder

    def configure_args(self, folder: Path | None) -> dict[str, object]:
        """The ``configure_exchange`` op's arguments for a kernel using ``folder``."""
        return {
            "folder": str(folder) if folder is not None else None,
            "inline_max": self.config.inline_max,
            "file_max": self.config.file_max,
            "shared_memory": folder is not None,
            "arrow": self.config.arrow and have_module("pyarrow"),
        }

    def remove_kernel(self, pool: str, number: int) -> None:
        if self.root is not None:
            shutil.rmtree(self.root / pool / f"k{number}", ignore_errors=True)

    def remove_pool(self, pool: str) -> None:
        if self.root is not None:
            shutil.rmtree(self.root / pool, ignore_errors=True)

    def close(self) -> None:
        """Remove this manager's folder and any left by killed managers."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.sweep()
