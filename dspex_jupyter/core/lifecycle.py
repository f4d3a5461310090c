"""Graceful shutdown and restore: a manifest of what was running, written before stopping.

The manifest (JSON, checksummed like checkpoints, no pickle) lists the pools' specs, each
active session's state (when it is JSON) and whatever other layers registered: optimizer
runs add their checkpoint folders. ``PoolManager.restore(manifest)`` starts the pools
again, reopens the sessions with their state and lets each layer bring its part back.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import CheckpointError, read_json_checked, write_json_atomic
from .spec import PoolSpec

if TYPE_CHECKING:
    from .manager import PoolManager

MANIFEST_FORMAT = "dspex.manifest"
# kind -> function(manager) -> manifest entries, called before the pools stop.
SAVERS: dict[str, Callable[[PoolManager], list[dict[str, Any]]]] = {}
# kind -> function(manager, entry, objects) -> what was restored.
RESTORERS: dict[str, Callable[[PoolManager, dict[str, Any], dict[str, Any]], Any]] = {}


def register(kind: str, saver: Callable[..., Any], restorer: Callable[..., Any]) -> None:
    SAVERS[kind] = saver
    RESTORERS[kind] = restorer


def spec_to_json(spec: PoolSpec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)
    data["warmup"] = list(spec.warmup)
    return data


def spec_from_json(data: dict[str, Any]) -> PoolSpec:
    return PoolSpec(**data)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest, MANIFEST_FORMAT)
    return manifest


def restore(manager: PoolManager, path: str | Path, objects: dict[str, Any]) -> dict[str, Any]:
    manifest = read_json_checked(Path(path), MANIFEST_FORMAT)
    specs = [spec_from_json(p) for p in manifest["pools"]]
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
