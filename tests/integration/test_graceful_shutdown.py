"""Graceful shutdown writes a manifest; PoolManager.restore brings pools, sessions, runs back."""

from __future__ import annotations

import json

import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.checkpoint import CheckpointError, read_json_checked
from dspex_jupyter.core.lifecycle import MANIFEST_FORMAT
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
    assert body["pools"][0]["name"] == "work" and body["pools"][0]["env_vars"] == {"MARK": "1"}
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
    restored = PoolManager.restore(manifest, objects=objects)
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
