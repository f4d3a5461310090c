"""Which files this user wrote: HMAC signatures with a per-user key, notebook side only.

A checkpoint's ``run.json`` names code (program, metric and LM classes) and a manifest
names a Python to start and start-up code to run, so a file someone else wrote must never
get that far. As Jupyter does for trusted notebooks (``NotebookNotary``), dspex signs what
it writes with a secret key kept in ``$DSPEX_HOME/signing.key`` (0600): a file whose
signature checks was written by this user's dspex (or trusted by them with ``dspex trust``);
anything else is data. Unlike the notary, signatures travel with the files
(``signatures.json`` in a checkpoint folder, a ``signature`` field in a manifest's header),
so a folder keeps its trust when moved and loses it when copied to another user.

The key never goes to a kernel: the notebook checks the signatures and tells the kernel's
``resume_run`` whether the folder is trusted (see ``checkpoint.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import (
    CheckpointDir,
    CheckpointError,
    body_sha256,
    read_document,
    read_json_checked,
    scrub_secrets,
    trusted_module_roots,
    write_json_atomic,
)
from .core.errors import TrustError

KEY_FILE = "signing.key"
SIGNATURES_FILE = "signatures.json"
SIGNATURES_FORMAT = "dspex.signatures"
MANIFEST_FORMAT = "dspex.manifest"
# The files of a checkpoint folder that are signed: the only ones that name code (run.json)
# or feed the run (data.json). Snapshots are data and stay checksummed only.
SIGNED_FILES = ("run.json", "data.json")
_ALGORITHM = "hmac-sha256"


# ---- the key --------------------------------------------------------------------------
def key_path(home: str | Path | None = None) -> Path:
    from .core.envs import _as_home

    return _as_home(home) / KEY_FILE


def load_key(home: str | Path | None = None) -> bytes:
    """This user's signing key, made on first use (32 random bytes, file 0600)."""
    from .core.envs import _ensure_dir

    path = key_path(home)
    if not path.exists():
        _ensure_dir(path.parent)
        tmp = path.with_name(f".{KEY_FILE}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic, and loses to a key another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        raise TrustError(
            f"the signing key {path} can be read by other users",
            hint=f"chmod 600 {path} (anyone who reads it can make files this dspex trusts)",
        )
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise TrustError(
            f"the signing key {path} is damaged",
            hint=f"remove {path}; dspex makes a new one (files signed with the old one must "
            "be trusted again with `dspex trust`)",
        )
    return key


def _mac(key: bytes, kind: str, name: str, sha256: str) -> str:
    message = f"dspex-signature-v1\n{kind}\n{name}\n{sha256}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Verdict:
    """Whether this user's key signed a file (or folder), and why not."""

    trusted: bool
    reason: str = ""
    hashes: dict[str, str] | None = None  # file name -> body sha256 that was checked


# ---- checkpoint folders ---------------------------------------------------------------
def sign_checkpoint(
    folder: str | Path | CheckpointDir,
    bodies: dict[str, Any] | None = None,
    *,
    home: str | Path | None = None,
) -> None:
    """Sign a folder's run.json and data.json. ``bodies`` (file name -> body) are what the
    notebook sent to be written, so it signs what it asked for, not what is on disk now;
    without them the files are read (``dspex trust``)."""
    folder = folder if isinstance(folder, CheckpointDir) else CheckpointDir(folder)
    key = load_key(home)
    signatures = {}
    for name in SIGNED_FILES:
        body = (bodies or {}).get(name)
        if body is None:
            body = read_json_checked(folder.path / name)
        signatures[name] = _mac(key, "checkpoint", name, body_sha256(body))
    write_json_atomic(
        folder.path / SIGNATURES_FILE,
        {"algorithm": _ALGORITHM, "files": signatures},
        SIGNATURES_FORMAT,
    )


def sign_new_run(folder: str | Path, spec: dict[str, Any], data: dict[str, Any]) -> None:
    """Sign a run the kernel just started: run.json holds ``spec`` less its secrets. A
    folder this process cannot write (a kernel on another machine) stays unsigned, which
    is safe: resuming it then needs the objects passed."""
    try:
        sign_checkpoint(folder, {"run.json": scrub_secrets(spec), "data.json": data})
    except OSError as exc:
        warnings.warn(
            f"could not sign the checkpoint folder {folder} ({exc}); resuming it will need "
            "program=, metric= and the LMs, or `dspex trust DIR`",
            stacklevel=2,
        )


def verify_checkpoint(
    folder: str | Path | CheckpointDir, *, home: str | Path | None = None
) -> Verdict:
    """Whether this user's key signed the folder's run.json and data.json as they are."""
    folder = folder if isinstance(folder, CheckpointDir) else CheckpointDir(folder)
    try:
        signed = read_json_checked(folder.path / SIGNATURES_FILE, SIGNATURES_FORMAT)
    except CheckpointError:
        return Verdict(False, f"{folder.path} is not signed ({SIGNATURES_FILE} is missing)")
    key = load_key(home)
    hashes = {}
    for name in SIGNED_FILES:
        try:
            sha = body_sha256(read_json_checked(folder.path / name))
        except CheckpointError as exc:  # the kernel reports the damage when it reads it
            return Verdict(False, str(exc))
        given = (signed.get("files") or {}).get(name) if isinstance(signed, dict) else None
        if not isinstance(given, str) or not hmac.compare_digest(
            given, _mac(key, "checkpoint", name, sha)
        ):
            return Verdict(
                False,
                f"{folder.path / name} is not signed by this user's dspex key (written by "
                "someone else, in another DSPEX_HOME, or changed since)",
            )
        hashes[name] = sha
    return Verdict(True, hashes=hashes)


def kernel_trust(
    folder: str | Path | CheckpointDir,
    trusted_modules: Any = (),
    *,
    home: str | Path | None = None,
) -> dict[str, Any] | None:
    """What ``resume_run`` is told: None for an untrusted folder, else the bodies' sha256
    (the kernel checks it reads the same files) and the modules it may import from."""
    roots = trusted_module_roots(trusted_modules)  # a bad name is an error either way
    verdict = verify_checkpoint(folder, home=home)
    if not verdict.trusted or verdict.hashes is None:
        return None
    return {
        "run_sha256": verdict.hashes["run.json"],
        "data_sha256": verdict.hashes["data.json"],
        "trusted_modules": list(roots),
    }


def modules_named(spec: dict[str, Any]) -> tuple[str, ...]:
    """The modules of the references the user gave a run (``"pkg.mod:name"`` strings): a
    run handle of this process may resume with them without listing them again."""
    found = []
    for part in ("program", "metric"):
        entry = spec.get(part) or {}
        if entry.get("kind") == "ref" and isinstance(entry.get("ref"), str):
            found.append(entry["ref"].partition(":")[0])
    return tuple(dict.fromkeys(found))


def references(spec: dict[str, Any]) -> list[str]:
    """What a run.json would make a kernel import, one line each (``dspex trust`` prints
    these so the user knows what they trust)."""
    lines = []
    for part in ("program", "metric"):
        entry = spec.get(part) or {}
        if entry.get("kind") == "ref":
            lines.append(f"{part}: {entry.get('ref')}")
        elif entry.get("kind") == "dspy":
            lines.append(f"{part}: {entry.get('class')} (signature {entry.get('signature')!r})")
        elif entry.get("class") or entry.get("kind") not in (None, "value"):
            lines.append(f"{part}: {entry.get('kind')} {entry.get('class', '')}".rstrip())
        else:
            lines.append(f"{part}: defined in a notebook (not stored; resume needs it passed)")
    record = spec.get("teleprompter")
    if isinstance(record, dict):  # a dspex.compile run: its optimizer is rebuilt by class
        lines.append(f"teleprompter: {record.get('class')}")
    lms = spec.get("lms") if isinstance(spec.get("lms"), dict) else {}
    for part, entry in [("task_lm", spec.get("task_lm")), ("prompt_lm", spec.get("prompt_lm"))] + [
        (f"lm {name}", value) for name, value in lms.items()
    ]:
        if isinstance(entry, dict):
            state = entry.get("state") or {}
            engine = state.get("engine") if isinstance(state.get("engine"), dict) else {}
            extra = f", engine {engine.get('class')}" if engine.get("class") else ""
            where = f", api_base {state.get('api_base')}" if state.get("api_base") else ""
            lines.append(f"{part}: {entry.get('class')} model {state.get('model')!r}{extra}{where}")
    return lines


# ---- manifests ------------------------------------------------------------------------
def manifest_signature(body: Any, *, home: str | Path | None = None) -> dict[str, str]:
    """The header fields that sign a manifest body."""
    return {"signature": _mac(load_key(home), "manifest", "manifest", body_sha256(body))}


def write_signed_manifest(path: Path, body: Any, *, home: str | Path | None = None) -> None:
    write_json_atomic(path, body, MANIFEST_FORMAT, header=manifest_signature(body, home=home))


def verify_manifest(path: str | Path, *, home: str | Path | None = None) -> tuple[Any, Verdict]:
    """A manifest's body (checked) and whether this user's key signed it."""
    body, header = read_document(Path(path), MANIFEST_FORMAT)
    given = header.get("signature")
    expected = manifest_signature(body, home=home)["signature"]
    if not isinstance(given, str):
        return body, Verdict(False, f"manifest {path} is not signed")
    if not hmac.compare_digest(given, expected):
        return body, Verdict(
            False,
            f"manifest {path} is not signed by this user's dspex key (written by someone "
            "else, in another DSPEX_HOME, or changed since)",
        )
    return body, Verdict(True)


# ---- `dspex trust` --------------------------------------------------------------------
def describe(path: str | Path) -> tuple[str, list[str]]:
    """What a checkpoint folder or manifest names: ("checkpoint"|"manifest", lines)."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = CheckpointDir(path)
        if not folder.run_file.is_file():
            raise TrustError(
                f"{folder.path} holds no dspex run (run.json is missing)",
                hint="give a run's checkpoint folder or a manifest written by shutdown()",
            )
        return "checkpoint", references(_checked(folder.run_file))
    if path.is_file():
        body = _checked(path, MANIFEST_FORMAT)
        lines = []
        for pool in body.get("pools", []):
            source = next(
                (f"{k} {pool[k]}" for k in ("python", "env", "kernel") if pool.get(k)),
                "the notebook's Python",
            )
            lines.append(f"pool {pool.get('name')}: kernels from {source}")
            if pool.get("startup"):
                lines.append(f"  runs startup code: {pool['startup']!r}")
            if pool.get("warmup"):
                lines.append(f"  imports: {', '.join(pool['warmup'])}")
        for entry in body.get("entries", []):
            lines.append(f"{entry.get('kind')}: {entry.get('checkpoint_dir', '')}".rstrip())
        return "manifest", lines
    raise TrustError(
        f"{path} does not exist", hint="give a run's checkpoint folder or a manifest file"
    )


def _checked(path: Path, fmt: str | None = None) -> Any:
    try:
        return read_json_checked(path) if fmt is None else read_json_checked(path, fmt)
    except CheckpointError as exc:
        raise TrustError(str(exc).split("\n  hint:")[0], hint=exc.hint) from None


def trust(path: str | Path, *, home: str | Path | None = None) -> str:
    """Sign a checkpoint folder or manifest with this user's key; which of the two it was."""
    kind, _lines = describe(path)
    path = Path(path).expanduser()
    if kind == "checkpoint":
        try:
            sign_checkpoint(path, home=home)
        except CheckpointError as exc:  # data.json missing or damaged
            raise TrustError(str(exc).split("\n  hint:")[0], hint=exc.hint) from None
    else:
        body = _checked(path, MANIFEST_FORMAT)
        write_signed_manifest(path, body, home=home)
    return kind
