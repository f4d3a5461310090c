"""Graceful shutdown and restore: a manifest of what was running, written before stopping.

The manifest (JSON, checksummed like checkpoints, no pickle) lists the pools' specs, each
active session's state (when it is JSON) and whatever other layers registered: optimizer
runs add their checkpoint folders. ``PoolManager.restore(manifest)`` starts the pools
again, reopens the sessions with their state and lets each layer bring its part back.

A manifest is code: restoring it starts kernels from the Python it names and runs its
start-up code. So it is signed with this user's key (``trust.py``) and only a manifest
this user signed is restored (or one trusted on purpose). It records the NAMES of a
pool's ``env_vars``, never their values (API keys): restore takes them from the caller
or the environment.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import CheckpointError
from ..trust import MANIFEST_FORMAT as MANIFEST_FORMAT
from ..trust import verify_manifest, write_signed_manifest
from .errors import MissingEnvVars, UntrustedManifest
from .spec import PoolSpec

if TYPE_CHECKING:
    from .manager import PoolManager

# kind -> function(manager) -> manifest entries, called before the pools stop.
SAVERS: dict[str, Callable[[PoolManager], list[dict[str, Any]]]] = {}
# kind -> function(manager, entry, objects) -> what was restored.
RESTORERS: dict[str, Callable[[PoolManager, dict[str, Any], dict[str, Any]], Any]] = {}


def register(kind: str, saver: Callable[..., Any], restorer: Callable[..., Any]) -> None:
    SAVERS[kind] = saver
    RESTORERS[kind] = restorer


def spec_to_json(spec: PoolSpec) -> dict[str, Any]:
    """A spec as a manifest records it: ``env_vars`` by name only (values are secrets)."""
    data = dataclasses.asdict(spec)
    data["warmup"] = list(spec.warmup)
    data["env_vars"] = sorted(spec.env_vars)
    data["auth_token"] = None  # a gateway token is a secret: restore reads auth_token_env
    return data


def spec_from_json(data: dict[str, Any], env_values: dict[str, str]) -> PoolSpec:
    return PoolSpec(**{**data, "env_vars": env_values})


def _env_values(
    pool: str, names: Any, given: Mapping[str, Any], missing: dict[str, list[str]]
) -> dict[str, str]:
    """Each named variable's value: ``given[pool][name]``, ``given[name]``, or this
    process's environment; what none has goes into ``missing``."""
    own = given.get(pool)
    values = {}
    for name in names:
        if isinstance(own, Mapping) and isinstance(own.get(name), str):
            values[name] = own[name]
        elif isinstance(given.get(name), str):
            values[name] = given[name]
        elif name in os.environ:
            values[name] = os.environ[name]
        else:
            missing.setdefault(pool, []).append(name)
    return values


def export_session_state() -> dict[str, Any]:
    """Runs in a session's kernel: its state, if it is JSON (nothing else is written)."""
    from ..runtime.state import session_state

    state = session_state()
    json.dumps(state, allow_nan=False)  # raises TypeError for anything but JSON
    return state


def save_manifest(manager: PoolManager, path: Path) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    for kind, saver in SAVERS.items():
        for entry in saver(manager):
            entries.append({"kind": kind, "module": saver.__module__, **entry})
    sessions, skipped = [], []
    for pool in manager.pools.values():
        for session in pool.sessions:
            if not session.active or getattr(session, "owner", None) is not None:
                continue
            try:
                state = session.call(f"{__name__}:export_session_state")
            except Exception as exc:  # state that is not JSON stays behind, said so
                skipped.append({"pool": pool.name, "session": session.id, "why": str(exc)})
                continue
            sessions.append({"pool": pool.name, "session": session.id, "state": state})
    manifest = {
        "written_at": time.time(),
        "pools": [spec_to_json(p.spec) for p in manager.pools.values()],
        "sessions": sessions,
        "skipped_sessions": skipped,
        "entries": entries,
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_signed_manifest(path, manifest, home=manager.home)
    return manifest


def restore(
    manager: PoolManager,
    path: str | Path,
    objects: dict[str, Any],
    *,
    env_vars: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> dict[str, Any]:
    manifest, verdict = verify_manifest(path, home=manager.home)
    if not verdict.trusted and not trust:
        raise UntrustedManifest(
            f"{verdict.reason}; restoring it would start kernels from the Python it names "
            "and run its start-up code, so it was not restored"
        )
    missing: dict[str, list[str]] = {}
    pools = [
        (p, _env_values(p["name"], p.get("env_vars") or [], env_vars or {}, missing))
        for p in manifest["pools"]
    ]
    if missing:
        needed = "; ".join(f"pool {pool!r}: {', '.join(names)}" for pool, names in missing.items())
        first = next(iter(missing.values()))[0]
        raise MissingEnvVars(
            f"the manifest records environment variable names, not values; these have no "
            f"value: {needed}",
            hint=f"pass them: PoolManager.restore(manifest, env_vars={{{first!r}: ...}}) "
            "(or {'POOL': {...}} for one pool), or set them in this process's environment",
        )
    specs = [spec_from_json(p, values) for p, values in pools]
    manager.start(*specs)
    sessions = [manager.pools[s["pool"]].session(state=s["state"]) for s in manifest["sessions"]]
    restored = []
    for entry in manifest["entries"]:
        module = str(entry.get("module", ""))
        if not module.startswith("dspex_jupyter."):
            raise CheckpointError(f"manifest entry names module {module!r}, not dspex's own")
        importlib.import_module(module)  # registers its restorer
        restorer = RESTORERS[entry["kind"]]
        restored.append(restorer(manager, entry, objects))
    return {"sessions": sessions, "restored": restored}


def model_cache_sizes(env: dict[str, str]) -> dict[str, int]:
    """Bytes in the model cache folders a pool's kernels use (Hugging Face, torch)."""
    home = Path(env.get("HOME", os.path.expanduser("~")))
    hf_home = Path(env.get("HF_HOME", home / ".cache" / "huggingface"))
    folders = {
        Path(env.get("HF_HUB_CACHE", hf_home / "hub")),
        Path(env.get("TRANSFORMERS_CACHE", hf_home / "hub")),
        Path(env.get("SENTENCE_TRANSFORMERS_HOME", hf_home / "sentence_transformers")),
        Path(env.get("TORCH_HOME", home / ".cache" / "torch")),
    }
    return {str(f): _folder_bytes(f) for f in sorted(folders) if f.is_dir()}


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
