"""Checkpoint files: JSON only, versioned, checksummed, written atomically.

A run's checkpoint folder holds ``run.json`` (what was asked: optimizer and compile
settings, how to rebuild program, metric and LMs, never an API key), ``data.json`` (the
datasets) and numbered progress snapshots ``ckpt-NNNNNN.json``; ``LATEST`` names the
newest complete snapshot. Each file is ``{"format", "version", "sha256", "body"}``: a
reader checks all three before it uses anything, so a corrupted, truncated or foreign
file is refused whole, never half-loaded. Nothing here executes code or unpickles.

Trust. The checksum catches damage, not tampering: anyone can rewrite a file and its
sha256. ``run.json`` is the only file that names code (program, metric and LM classes to
import), so it and ``data.json`` are signed by the notebook side with this user's HMAC key
(``dspex_jupyter/trust.py``; the key stays out of kernels) in ``signatures.json``. Before a
resume the notebook checks those signatures and tells the kernel whether the folder is
trusted, with the sha256 of the bodies it checked (the kernel refuses files that differ).
An untrusted folder is data: listing snapshots and reading scores work, but the kernel
imports none of its references (the caller passes program, metric and LMs). Even a trusted
folder only names modules from an allowed set (``trusted_module_roots``), checked before
anything is imported. Snapshots hold data only (demos, instructions, scores, RNG states):
they stay checksummed, not signed, and nothing in them is ever imported.

Shared by the kernel (writes) and the notebook (lists, verifies): standard library only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from .core.errors import DspexError  # standard library only, like this module

FORMAT = "dspex.run.checkpoint"
# Formats a reader of FORMAT also accepts: runs written when dspex ran MIPROv2 only.
OLDER_FORMATS = {FORMAT: ("dspex.mipro.checkpoint",)}
VERSION = 1
_SNAPSHOT = re.compile(r"^ckpt-(\d{6})\.json$")
# Keys whose values never go into a checkpoint, an event or a log.
# ("prompt_tokens" and "max_tokens" are counts, not secrets: only a key ending in "token".)
SECRET_KEY_PATTERN = re.compile(
    r"(api[_-]?key|secret|password|passwd|authorization|credential|bearer|(^|_)token$)", re.I
)


class CheckpointError(DspexError):
    """A checkpoint that cannot be used: missing, corrupted, truncated or foreign."""

    hint = "check the folder the message names; run.checkpoints() lists usable snapshots"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)


def canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def scrub_secrets(value: Any) -> Any:
    """A copy of ``value`` with every secret-looking key's value removed."""
    if isinstance(value, dict):
        return {
            k: scrub_secrets(v) for k, v in value.items() if not SECRET_KEY_PATTERN.search(str(k))
        }
    if isinstance(value, list | tuple):
        return [scrub_secrets(v) for v in value]
    return value


def encode_document(body: Any, fmt: str = FORMAT, *, header: dict[str, Any] | None = None) -> bytes:
    """The file's bytes: format, version and checksum wrapped around ``body`` (plus any
    ``header`` fields, e.g. a manifest's signature)."""
    data = canonical(body)
    head = {"format": fmt, "version": VERSION, "sha256": hashlib.sha256(data).hexdigest()}
    head.update(header or {})
    # The body is serialized once: the document is the header's JSON with it spliced in.
    return json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"body":' + data + b"}"


def example_to_json(example: Any) -> dict[str, Any]:
    """A ``dspy.Example`` (or a plain dict) as JSON, its input keys kept: how datasets and
    demos are written to checkpoints and sent with a run (no DSPy import needed)."""
    if isinstance(example, dict):
        return {"data": dict(example), "inputs": None}
    inputs = getattr(example, "_input_keys", None)
    return {"data": example.toDict(), "inputs": sorted(inputs) if inputs else None}


def write_bytes_atomic(path: Path, document: bytes, *, sync: bool = True) -> None:
    """Write to a private temporary file, fsync, rename into place: never half a file.
    With ``sync=False`` the caller calls ``make_durable`` later (off its hot path): until
    then the file survives a killed process, not a power cut."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(document)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def make_durable(*paths: Path) -> None:
    """fsync files written with ``sync=False``, and the folders that name them."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in {path.parent for path in paths}:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(
    path: Path,
    body: Any,
    fmt: str = FORMAT,
    *,
    sync: bool = True,
    header: dict[str, Any] | None = None,
) -> None:
    write_bytes_atomic(path, encode_document(body, fmt, header=header), sync=sync)


def body_sha256(body: Any) -> str:
    """What a document's ``sha256`` field holds for ``body`` (signatures cover this)."""
    return hashlib.sha256(canonical(body)).hexdigest()


def read_json_checked(path: Path, fmt: str = FORMAT) -> Any:
    """The body of a checkpoint file, after checking its format, version and checksum."""
    return read_document(path, fmt)[0]


def read_document(path: Path, fmt: str = FORMAT) -> tuple[Any, dict[str, Any]]:
    """A checked file's body and its header fields (format, version, sha256, signature)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint file {path} is not valid JSON (truncated or corrupted): {exc}",
            hint="resume from an earlier checkpoint of the run (run.checkpoints())",
        ) from None
    what = "MIPROv2 checkpoint" if fmt == FORMAT else f"{fmt} file"
    accepted = (fmt, *OLDER_FORMATS.get(fmt, ()))
    if not isinstance(document, dict) or document.get("format") not in accepted:
        raise CheckpointError(
            f"{path} is not a dspex {what} (format {document.get('format')!r})"
            if isinstance(document, dict)
            else f"{path} is not a dspex {what}",
            hint="point resume() at a folder written by dspex's MIPROv2",
        )
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {document.get('version')!r}; this dspex reads "
            f"version {VERSION}",
            hint="resume it with the dspex-jupyter version that wrote it",
        )
    body = document.get("body")
    if hashlib.sha256(canonical(body)).hexdigest() != document.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path} fails its checksum (it was changed or damaged)",
            hint="resume from an earlier checkpoint of the run (run.checkpoints())",
        )
    return body, {k: v for k, v in document.items() if k != "body"}


class CheckpointDir:
    """A run's checkpoint folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self._last_number: int | None = None  # saves listing the folder at every write

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    @property
    def data_file(self) -> Path:
        return self.path / "data.json"

    @property
    def log_file(self) -> Path:
        """What DSPy printed during the run (kept across resumes; secrets masked)."""
        return self.path / "run.log"

    def snapshot_path(self, number: int) -> Path:
        return self.path / f"ckpt-{number:06d}.json"

    def snapshots(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if _SNAPSHOT.match(p.name))

    def next_number(self) -> int:
        if self._last_number is None:
            found = [int(_SNAPSHOT.match(p.name).group(1)) for p in self.snapshots()]  # type: ignore[union-attr]
            self._last_number = max(found, default=0)
        return self._last_number + 1

    def prepare_snapshot(self, body: dict[str, Any]) -> tuple[Path, bytes]:
        """Number and encode the next snapshot (cheap: the caller's thread does it)."""
        number = self.next_number()
        self._last_number = number
        return self.snapshot_path(number), encode_document({**body, "written_at": time.time()})

    def commit_snapshot(self, path: Path, document: bytes) -> None:
        """Write a prepared snapshot and point LATEST at it (the slow part: disk)."""
        write_bytes_atomic(path, document)
        tmp = self.path / f".LATEST.{uuid.uuid4().hex[:8]}"
        tmp.write_text(path.name)
        os.replace(tmp, self.path / "LATEST")

    def write_snapshot(self, body: dict[str, Any]) -> Path:
        path, document = self.prepare_snapshot(body)
        self.commit_snapshot(path, document)
        return path

    def latest(self) -> Path:
        pointer = self.path / "LATEST"
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        if not self.run_file.is_file():
            raise CheckpointError(
                f"{self.path} holds no dspex run (run.json is missing)",
                hint="point resume() at the checkpoint_dir given to optimize()",
            )
        if pointer.is_file():
            name = pointer.read_text().strip()
            if _SNAPSHOT.match(name) and (self.path / name).is_file():
                return self.path / name
        snapshots = self.snapshots()
        if not snapshots:
            raise CheckpointError(f"{self.path} holds no checkpoint snapshot yet")
        return snapshots[-1]

    def newest_readable(self) -> tuple[Path | None, dict[str, Any], list[str]]:
        """Where a resume goes on from: the newest snapshot that reads back whole, its body,
        and the names of newer ones skipped because they are damaged or foreign. Every
        snapshot is a clean resume point (an abandoned trial or step is never written), so
        skipping a damaged one costs only the trials after the one before it.
        ``(None, {}, skipped)`` when no snapshot reads back (a run killed before its first)."""
        skipped: list[str] = []
        for path in reversed(self.snapshots()):
            try:
                return path, read_json_checked(path), skipped
            except CheckpointError:
                skipped.append(path.name)
        return None, {}, skipped

    def listing(self) -> list[dict[str, Any]]:
        """Each snapshot's time, phase, trial and best score (a bad file says why)."""
        rows = []
        for path in self.snapshots():
            try:
                body = read_json_checked(path)
                rows.append(
                    {
                        "path": str(path),
                        "name": path.name,
                        "written_at": body.get("written_at"),
                        "phase": body.get("phase"),
                        "trial": body.get("trials_done", 0),
                        "best_score": body.get("best_score"),
                        "reason": body.get("reason"),
                        "ok": True,
                    }
                )
            except CheckpointError as exc:
                rows.append({"path": str(path), "name": path.name, "ok": False, "error": str(exc)})
        return rows


# ---- what a checkpoint may make a kernel import ---------------------------------------
# Modules a trusted checkpoint may name without the user listing them: DSPy's own and the
# offline test doubles. Users add theirs with ``trusted_modules=`` or this variable
# (comma-separated module names; a name covers its submodules).
DEFAULT_TRUSTED_MODULES = ("dspy", "dspex_jupyter.testing")
TRUSTED_MODULES_ENV = "DSPEX_TRUSTED_MODULES"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
UNTRUSTED_HINT = (
    "pass the objects instead (MIPROv2.resume(dir, pool, program=..., metric=..., "
    "task_lm=..., prompt_lm=...)), or, if you know who wrote the folder and what it names, "
    "trust it: `dspex trust DIR` or MIPROv2.resume(..., trust=True)"
)


class UntrustedCheckpointError(CheckpointError):
    """A folder this user's key did not sign asks the kernel to import code."""


class ForbiddenReferenceError(CheckpointError):
    """A checkpoint names a module outside the allowed set, or an object of the wrong kind."""


def trusted_module_roots(extra: Any = (), environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The allowed module names: dspex's defaults, ``extra`` and ``$DSPEX_TRUSTED_MODULES``."""
    environ = os.environ if environ is None else environ
    from_env = re.split(r"[,\s]+", environ.get(TRUSTED_MODULES_ENV, "").strip())
    names = [*DEFAULT_TRUSTED_MODULES, *([extra] if isinstance(extra, str) else extra)]
    names += [n for n in from_env if n]
    for name in names:
        if not isinstance(name, str) or not _MODULE_NAME.match(name):
            raise ForbiddenReferenceError(
                f"trusted module {name!r} is not a module name",
                hint="give dotted module names such as 'myproject.metrics' "
                f"(trusted_modules=... or ${TRUSTED_MODULES_ENV}, comma-separated)",
            )
    return tuple(dict.fromkeys(names))


def module_allowed(module: str, roots: Any) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def _refuse(what: str, ref: str, module: str, roots: Any) -> ForbiddenReferenceError:
    return ForbiddenReferenceError(
        f"the checkpoint's {what} {ref!r} is in module {module!r}, which is not a trusted "
        f"module ({', '.join(roots)}); nothing was imported",
        hint=f"if {module!r} is your own code, add it: trusted_modules=({module!r},) or "
        f"${TRUSTED_MODULES_ENV}; otherwise pass the object to MIPROv2.resume()",
    )


def import_reference(ref: Any, roots: Any, what: str) -> Any:
    """The object ``"package.module:name"`` names, if the module is allowed: checked before
    the import (importing a module runs its top-level code), and the object's own module
    checked after (an allowed module may re-export ``os.system``)."""
    module_name, _, qualname = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    if not _MODULE_NAME.match(module_name) or not _MODULE_NAME.match(qualname):
        raise ForbiddenReferenceError(
            f"the checkpoint's {what} reference {ref!r} is not 'package.module:name'",
            hint="the file was changed by hand; pass the object to MIPROv2.resume()",
        )
    if not module_allowed(module_name, roots):
        raise _refuse(what, ref, module_name, roots)
    if any(part.startswith("__") for part in qualname.split(".")):  # __builtins__, __loader__
        raise ForbiddenReferenceError(
            f"the checkpoint's {what} {ref!r} names a special (dunder) attribute",
            hint="refer to a module-level name; or pass the object to MIPROv2.resume()",
        )
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ForbiddenReferenceError(
                f"the checkpoint's {what} {ref!r} does not exist",
                hint="pass the object to MIPROv2.resume()",
            )
    owner = getattr(obj, "__module__", None) or ""
    if not module_allowed(owner, roots):
        raise _refuse(what, ref, owner, roots)
    return obj
