"""Graceful shutdown writes a manifest; PoolManager.restore brings pools, sessions, runs back."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.checkpoint import (
    CheckpointError,
    read_json_checked,
    write_json_atomic,
)
from dspex_jupyter.cli import main
from dspex_jupyter.core.errors import MissingEnvVars, UntrustedManifest
from dspex_jupyter.core.lifecycle import MANIFEST_FORMAT
from dspex_jupyter.trust import write_signed_manifest
from tests.integration import mipro_helpers as mh
from tests.integration.test_mipro import in_process_reference, trials_of

pytestmark = pytest.mark.integration
H = "tests.integration.helpers"


def test_shutdown_with_manifest_then_restore(tmp_path):
    task = mh.task()
    lm = task.lm(latency_s=0.002)
    manifest = tmp_path / "manifest.json"
    manager = PoolManager([PoolSpec("work", size=2, env_vars={"MARK": "1"})])
    try:
        manager.start()
        session = manager["work"].session(state={"seed": 3})
        session.call(f"{H}:remember", "a")
        optimizer = MIPROv2(
            manager["work"], metric=task.metric, task_lm=lm, prompt_lm=lm, **mh.OPTIONS
        )
        run = optimizer.optimize(
            task.make_program(),
            task.trainset,
            task.valset,
            checkpoint_dir=tmp_path / "run",
            **mh.COMPILE,
        )
        run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 3, timeout=120)
    finally:
        manager.shutdown(manifest=manifest)
    assert run.status == "cancelled"
    body = read_json_checked(manifest, MANIFEST_FORMAT)
    # Names of env_vars only: their values are the caller's to give again.
    assert body["pools"][0]["name"] == "work" and body["pools"][0]["env_vars"] == ["MARK"]
    assert body["sessions"] == [
        {"pool": "work", "session": session.id, "state": {"seed": 3, "items": ["a"]}}
    ]
    assert [e["run_id"] for e in body["entries"]] == [run.run_id]
    assert "pickle" not in manifest.read_text()

    objects = {
        run.run_id: {
            "program": task.make_program(),
            "metric": task.metric,
            "task_lm": lm,
            "prompt_lm": lm,
        }
    }
    restored = PoolManager.restore(manifest, objects=objects, env_vars={"MARK": "1"})
    try:
        (session_back,) = restored.restored["sessions"]
        assert session_back.call(f"{H}:remember", "b") == ["a", "b"]
        assert restored["work"].call("os:getenv", "MARK") == "1"
        (run_back,) = restored.restored["restored"]
        result = run_back.result(timeout=120)
        assert (trials_of(result), result.state) == in_process_reference(task, task.lm())
    finally:
        restored.shutdown()


def test_a_tampered_manifest_is_refused(tmp_path):
    manifest = tmp_path / "m.json"
    with PoolManager([PoolSpec("p")]) as manager:
        manager.shutdown(manifest=manifest)
    data = json.loads(manifest.read_text())
    data["body"]["pools"][0]["size"] = 3
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="checksum"):
        PoolManager.restore(manifest)


# ---- trust and secrets ---------------------------------------------------------------
CANARY = f"sk-canary-{uuid.uuid4().hex}"


def files_holding(text: str, *roots: Path | None) -> list[str]:
    """Every file under ``roots`` whose bytes contain ``text``."""
    found = []
    for root in roots:
        if root is None or not root.exists():
            continue
        for path in [root] if root.is_file() else root.rglob("*"):
            try:
                if path.is_file() and text.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:  # a file removed while we walk
                continue
    return found


def test_no_secret_reaches_a_file_that_shutdown_or_restore_writes(tmp_path):
    """A canary API key in a pool's env_vars (where the README says keys go): not in the
    manifest, the checkpoint, the signing home, the runtime or exchange folders, nor
    anywhere under tmp_path. (The SIMULATED LM refuses an api_key of its own.)"""
    home = Path(os.environ["DSPEX_HOME"])
    task = mh.task()
    lm = task.lm(latency_s=0.002)
    manifest = tmp_path / "manifests" / "m.json"
    spec = PoolSpec("work", size=1, env_vars={"OPENAI_API_KEY": CANARY})
    assert CANARY not in repr(spec) and "'OPENAI_API_KEY': '***'" in repr(spec)
    manager = PoolManager([spec])
    written: list[str] = []
    try:
        manager.start()
        assert manager["work"].call("os:getenv", "OPENAI_API_KEY") == CANARY
        optimizer = MIPROv2(manager["work"], metric=task.metric, task_lm=lm, **mh.OPTIONS)
        run = optimizer.optimize(
            task.make_program(), task.trainset, task.valset, checkpoint_dir=tmp_path / "run",
            **mh.COMPILE,
        )  # fmt: skip
        run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 2, timeout=120)
        written += files_holding(CANARY, manager.runtime_dir, manager.exchange.root)
    finally:
        manager.shutdown(manifest=manifest)
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert stat.S_IMODE(manifest.parent.stat().st_mode) == 0o700
    assert read_json_checked(manifest, MANIFEST_FORMAT)["pools"][0]["env_vars"] == [
        "OPENAI_API_KEY"
    ]
    objects = {run.run_id: {"program": task.make_program(), "metric": task.metric}}
    restored = PoolManager.restore(
        manifest, objects=objects, env_vars={"work": {"OPENAI_API_KEY": CANARY}}
    )
    try:
        assert restored["work"].call("os:getenv", "OPENAI_API_KEY") == CANARY
        (run_back,) = restored.restored["restored"]
        assert run_back.result(timeout=120).score is not None
        written += files_holding(CANARY, restored.runtime_dir, restored.exchange.root)
    finally:
        restored.shutdown()
    written += files_holding(CANARY, home, tmp_path, manifest.parent, tmp_path / "run")
    assert written == []
    assert (tmp_path / "run" / "run.json").is_file() and home.joinpath("signing.key").is_file()


def test_restore_names_the_env_vars_it_needs(tmp_path, monkeypatch):
    manifest = tmp_path / "m.json"
    spec = PoolSpec("p", env_vars={"DSPEX_TEST_KEY": CANARY, "DSPEX_TEST_OTHER": "x"})
    with PoolManager([spec]) as manager:
        manager.shutdown(manifest=manifest)
    monkeypatch.delenv("DSPEX_TEST_KEY", raising=False)
    monkeypatch.delenv("DSPEX_TEST_OTHER", raising=False)
    with pytest.raises(MissingEnvVars) as info:
        PoolManager.restore(manifest)
    assert "these have no value: pool 'p': DSPEX_TEST_KEY, DSPEX_TEST_OTHER" in str(info.value)
    assert "env_vars={'DSPEX_TEST_KEY': ...}" in info.value.hint
    assert "environment" in info.value.hint
    # A flat mapping for every pool, a pool's own table, and the environment, combined.
    monkeypatch.setenv("DSPEX_TEST_OTHER", "from-env")
    restored = PoolManager.restore(manifest, env_vars={"p": {"DSPEX_TEST_KEY": "k"}})
    try:
        assert restored["p"].call("os:getenv", "DSPEX_TEST_KEY") == "k"
        assert restored["p"].call("os:getenv", "DSPEX_TEST_OTHER") == "from-env"
    finally:
        restored.shutdown()


def test_a_manifest_this_user_did_not_sign_is_refused(tmp_path, capsys):
    manifest = tmp_path / "m.json"
    marker = tmp_path / "startup-ran"
    startup = f"open({str(marker)!r}, 'w').close()"
    with PoolManager([PoolSpec("p", startup=startup)]) as manager:
        marker.unlink()  # the start-up code ran once, at the start
        manager.shutdown(manifest=manifest)
    # Signed in another DSPEX_HOME (another user), and not signed at all.
    body = read_json_checked(manifest, MANIFEST_FORMAT)
    write_signed_manifest(manifest, body, home=tmp_path / "someone-else")
    with pytest.raises(UntrustedManifest) as info:
        PoolManager.restore(manifest)
    assert "is not signed by this user's dspex key" in str(info.value)
    assert "start kernels from the Python it names and run its start-up code" in str(info.value)
    assert "`dspex trust MANIFEST`" in info.value.hint and "trust=True" in info.value.hint
    write_json_atomic(manifest, body, MANIFEST_FORMAT)
    with pytest.raises(UntrustedManifest, match="is not signed;"):
        PoolManager.restore(manifest)
    assert not marker.exists()  # no kernel started, no start-up code ran
    # `dspex trust` shows what it would run, then signs it; now it restores.
    assert main(["trust", str(manifest)]) == 0
    shown = capsys.readouterr().out
    assert "pool p: kernels from the notebook's Python" in shown and startup in shown
    restored = PoolManager.restore(manifest)
    try:
        assert marker.exists()
    finally:
        restored.shutdown()
    # trust=True restores a foreign manifest on purpose.
    write_signed_manifest(manifest, body, home=tmp_path / "someone-else")
    marker.unlink()
    PoolManager.restore(manifest, trust=True).shutdown()
    assert marker.exists()
