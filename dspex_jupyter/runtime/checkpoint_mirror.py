"""Checkpoints back to the notebook, kernel side: a run whose kernel writes to a folder the
notebook cannot see (a kernel on another machine, or a ``kernel_checkpoint_dir`` the user
named) sends each snapshot, and what its run.log gained, back as run events.

The notebook side (``optimizers/checkpoint_mirror.py``) writes them into the run's
``checkpoint_dir``, so the user's folder holds the same snapshots whichever machine ran the
run, and a resume goes on from there: it sends the folder's files here first (``prepare``).
Events are JSON: a snapshot travels as its document's text (it is JSON already, checksummed),
a log chunk as text with its offset (undecodable bytes kept with ``surrogateescape``).
"""

from __future__ import annotations

import os
import re
import threading
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import CheckpointDir, CheckpointError, write_bytes_atomic

if TYPE_CHECKING:
    from .runs import RunRecorder

MIRROR_EVENT = "mirror"
# What the notebook may send a kernel's folder: the run's files, nothing else.
_FILE_NAME = re.compile(r"^(run\.json|data\.json|ckpt-\d{6}\.json)$")
_mirrored: set[str] = set()  # kernel-side folders whose runs send their files back
# Per run recorder: a token naming its log (the notebook appends each one's chunks at their
# offsets, so a chunk seen twice is written once) and how many bytes were sent.
_log_sent: weakref.WeakKeyDictionary[RunRecorder, tuple[str, int]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def default_folder(run_id: str) -> Path:
    """Where a run's files go on a kernel's machine when the user named no folder there."""
    home = os.environ.get("DSPEX_HOME") or "~/.dspex"
    return Path(home).expanduser() / "kernel-runs" / run_id


def prepare(folder: str | None, run_id: str, files: dict[str, str] | None = None) -> dict[str, Any]:
    """Make the run's kernel-side folder (0700), put the notebook's ``files`` in it (a
    resume's run.json, data.json and snapshots: it then holds what the notebook's folder
    holds, no snapshot more), and send back every snapshot later written there."""
    path = (Path(folder).expanduser() if folder else default_folder(run_id)).resolve()
    if files is None and (path / "run.json").exists():
        raise CheckpointError(
            f"{path} (the kernel's checkpoint folder) already holds a run",
            hint="give another kernel_checkpoint_dir, or resume that run",
        )
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    if files is not None or not (path / "run.json").exists():
        # The notebook's folder is the run's: a log left here was sent already (or belongs
        # to a run that never started), and would be sent again from its start.
        (path / "run.log").unlink(missing_ok=True)
    if files is not None:
        bad = [name for name in files if not _FILE_NAME.match(name)]
        if bad:
            raise ValueError(f"not files of a dspex run: {', '.join(map(repr, bad))}")
        for stale in CheckpointDir(path).snapshots():
            stale.unlink()
        (path / "LATEST").unlink(missing_ok=True)
        for name, text in files.items():
            write_bytes_atomic(path / name, text.encode("utf-8"))
    with _lock:
        _mirrored.add(str(path))
    return {"folder": str(path)}


def _is_mirrored(rec: RunRecorder) -> bool:
    with _lock:
        return str(rec.folder.path) in _mirrored


def mirror_snapshot(rec: RunRecorder, path: Path, document: bytes) -> None:
    """After a snapshot is on disk here: the log so far, then the snapshot, as events (in
    that order, before the run's "checkpoint" event that names it)."""
    if not _is_mirrored(rec):
        return
    mirror_log(rec)
    rec.emit(
        MIRROR_EVENT,
        folder=str(rec.folder.path),
        file=path.name,
        text=document.decode("utf-8"),
    )


def mirror_log(rec: RunRecorder) -> None:
    """What the run's log gained since it was last sent (at each snapshot and at the end)."""
    if not _is_mirrored(rec):
        return
    with _lock:
        token, offset = _log_sent.get(rec) or (uuid.uuid4().hex, 0)
    try:
        with open(rec.folder.log_file, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except OSError:
        return
    if not chunk:
        return
    with _lock:
        _log_sent[rec] = (token, offset + len(chunk))
    rec.emit(
        MIRROR_EVENT,
        folder=str(rec.folder.path),
        file="run.log",
        log=token,
        offset=offset,
        text=chunk.decode("utf-8", "surrogateescape"),
    )
