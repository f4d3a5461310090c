"""Checkpoints back to the notebook, notebook side: a run's files land in its
``checkpoint_dir`` on this machine even when its kernel writes them somewhere else.

A kernel on another machine (an SSH host, a pod) cannot write the notebook's folder, so
its run writes a folder of its own (``kernel_checkpoint_dir``: one the user names, by
default ``$DSPEX_HOME/kernel-runs/RUN_ID`` on the kernel's machine) and sends each snapshot
and log chunk back as a run event (``runtime/checkpoint_mirror.py``). Here they are written
atomically into ``checkpoint_dir`` (0600 files in a 0700 folder): ``run.json`` and
``data.json`` are written and signed by this side from what it sent (``trust.py``), as for a
local run, snapshots arrive as the checksummed documents the kernel wrote. A resume sends
the folder's files to the new kernel's folder first, so killing a kernel on one host and
resuming on another goes on exactly from the user's folder.

Mirroring is on when the run's kernel is not on this machine, or when ``kernel_checkpoint_dir``
names a folder other than ``checkpoint_dir``; a path both sides see (a shared file system)
is named as both, and then nothing is mirrored.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import CheckpointDir, CheckpointError, scrub_secrets, write_json_atomic

if TYPE_CHECKING:
    from ..core.session import Session

KERNEL_SIDE = "dspex_jupyter.runtime.checkpoint_mirror"
MIRROR_EVENT = "mirror"  # runtime/checkpoint_mirror.py's
# Files an event may write: a run's, by name only (never a path from elsewhere).
_SNAPSHOT = re.compile(r"^ckpt-\d{6}\.json$")
_lock = threading.Lock()
_requested: dict[str, str | None] = {}  # run id: the kernel_checkpoint_dir asked for
_kernel_dirs: dict[Path, set[str]] = {}  # checkpoint_dir: kernel-side folders of its runs
_log_bases: dict[tuple[Path, str], int] = {}  # (checkpoint_dir, kernel log): where it starts


def kernel_elsewhere(session: Session) -> bool:
    """Whether the session's kernel is on another machine (no local process): the one
    switch, as for the kernel-reported figures (``core/kernel_figures.py``)."""
    return session.pid is None


def _mirrors(session: Session, folder: Path, requested: str | None) -> bool:
    if requested is not None:
        return requested != str(folder)  # the same path: a folder both sides see
    return kernel_elsewhere(session)


def _private_folder(folder: Path) -> CheckpointDir:
    local = CheckpointDir(folder)
    local.create()
    os.chmod(local.path, 0o700)
    return local


def _remember(folder: Path, run_id: str, requested: str | None, kernel_dir: str) -> None:
    with _lock:
        _requested[run_id] = requested
        _kernel_dirs.setdefault(folder, set()).add(kernel_dir)


def start(
    session: Session,
    folder: Path,
    spec: dict[str, Any],
    data: dict[str, Any],
    kernel_checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Before a new run starts in ``session``: the spec it starts with. When its files are
    to be mirrored, the kernel's folder is made and named in the spec
    (``kernel_checkpoint_dir``), and run.json and data.json are written here."""
    requested = None if kernel_checkpoint_dir is None else str(kernel_checkpoint_dir)
    if not _mirrors(session, folder, requested):
        return spec
    local = CheckpointDir(folder)
    if local.run_file.exists():
        raise CheckpointError(
            f"{local.path} already holds a run",
            hint="resume it with dspex.resume(dir), or choose an empty checkpoint_dir",
        )
    reply = session.call(f"{KERNEL_SIDE}:prepare", requested, spec["run_id"])
    spec = {**spec, "kernel_checkpoint_dir": reply["folder"]}
    local = _private_folder(folder)
    write_json_atomic(local.run_file, scrub_secrets(spec))  # what the kernel writes too
    write_json_atomic(local.data_file, data)
    _remember(local.path, spec["run_id"], requested, reply["folder"])
    return spec


def _resume_files(folder: Path) -> dict[str, str]:
    """run.json, data.json and every snapshot of the notebook's folder, as text."""
    local = CheckpointDir(folder)
    paths = [local.run_file, local.data_file, *local.snapshots()]
    return {path.name: path.read_bytes().decode("utf-8") for path in paths}


def _resume_request(
    session: Session, folder: Path, run_id: str, kernel_checkpoint_dir: str | Path | None
) -> tuple[str | None, bool]:
    """The kernel folder asked for (this call's, else the one the run used before, as an
    automatic resume has it) and whether the resume mirrors."""
    with _lock:
        requested = _requested.get(run_id)
    if kernel_checkpoint_dir is not None:
        requested = str(kernel_checkpoint_dir)
    return requested, _mirrors(session, folder, requested)


def resume_folder(
    session: Session, folder: Path, run_id: str, kernel_checkpoint_dir: str | Path | None = None
) -> str:
    """The folder a resume in ``session`` reads: ``folder`` itself when the kernel sees it,
    else a folder of the kernel's that first gets ``folder``'s files."""
    requested, mirrors = _resume_request(session, folder, run_id, kernel_checkpoint_dir)
    if not mirrors:
        return str(folder)
    reply = session.call(f"{KERNEL_SIDE}:prepare", requested, run_id, _resume_files(folder))
    _remember(Path(folder), run_id, requested, reply["folder"])
    return str(reply["folder"])


async def aresume_folder(
    session: Session, folder: Path, run_id: str, kernel_checkpoint_dir: str | Path | None = None
) -> str:
    requested, mirrors = _resume_request(session, folder, run_id, kernel_checkpoint_dir)
    if not mirrors:
        return str(folder)
    files = await session.runner.offload(_resume_files, folder)
    reply = await session.acall(f"{KERNEL_SIDE}:prepare", requested, run_id, files)
    _remember(Path(folder), run_id, requested, reply["folder"])
    return str(reply["folder"])


# ---- events ---------------------------------------------------------------------------
def on_event(folder: Path, event: dict[str, Any]) -> dict[str, Any] | None:
    """A run event as the notebook keeps it: a mirror event is written into ``folder`` and
    dropped (None); paths in the kernel's folder are shown as paths in ``folder``."""
    folder = Path(folder)
    if event.get("kind") == MIRROR_EVENT:
        _receive(folder, event)
        return None
    with _lock:
        kernel_dirs = tuple(_kernel_dirs.get(folder, ()))
    if not kernel_dirs:
        return event
    changed = dict(event)
    for key in ("path", "checkpoint"):
        value = event.get(key)
        if isinstance(value, str) and str(Path(value).parent) in kernel_dirs:
            changed[key] = str(folder / Path(value).name)
    return changed


def _receive(folder: Path, event: dict[str, Any]) -> None:
    name, text = event.get("file"), event.get("text")
    if not isinstance(name, str) or not isinstance(text, str):
        return
    kernel_dir = event.get("folder")
    if isinstance(kernel_dir, str):
        with _lock:
            _kernel_dirs.setdefault(folder, set()).add(kernel_dir)
    local = _private_folder(folder)
    if _SNAPSHOT.match(name):
        # As the kernel committed it: the document (checksummed; read back only through
        # checkpoint.py's checks), then LATEST. Not fsynced here, on the manager's loop:
        # the kernel's copy is on its disk.
        _write_private(local.path / name, text.encode("utf-8"))
        _write_private(local.path / "LATEST", name.encode())
    elif name == "run.log" and isinstance(event.get("offset"), int):
        _append_log(local.log_file, str(event.get("log")), event["offset"], text)


def _write_private(path: Path, data: bytes) -> None:
    """Write a whole file under another name, then rename it into place (0600)."""
    tmp = path.with_name(f".{path.name}.mirror.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _append_log(path: Path, log: str, offset: int, text: str) -> None:
    """Write a kernel log's chunk where it belongs: each kernel log (one per resume) starts
    where the file ended when its first chunk came, so a chunk seen twice is written once."""
    data = text.encode("utf-8", "surrogateescape")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with _lock:
            base = _log_bases.setdefault((path.parent, log), os.fstat(fd).st_size - offset)
        os.pwrite(fd, data, base + offset)
    finally:
        os.close(fd)
