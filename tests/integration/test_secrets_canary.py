"""No API key is ever written to a file: a whole session through a real HTTP LM, then every
file it wrote is searched for the key.

The key is a canary string the loopback server requires (so a run that works has really
used it). Everything the session may write is put under ``tmp_path``: DSPEX_HOME, the
manager's runtime folder (connection files, kernel logs; via TMPDIR), the exchange folder,
DSPy's cache (DSPY_CACHEDIR), the checkpoint folders with run.log, and the manifest. The
runtime folder is removed at shutdown, so the tree is searched while the session is alive
and again after it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import dspy
import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.exchange import ExchangeConfig
from dspex_jupyter.testing import arithmetic
from dspex_jupyter.testing.lm_server import SimulatedLMServer
from dspex_jupyter.testing.mipro_settings import quick_settings
from tests.integration.lm_fixtures import OFFLINE_DSPY_ENV

pytestmark = pytest.mark.integration

CANARY = "sk-canary-7f3a9c1e-DO-NOT-WRITE-5b2d"
TRIALS = 8


def files_with_canary(root: Path, scanned: list[str] | None = None) -> list[str]:
    """Every file under ``root`` whose bytes contain the canary (binary files included);
    the names of all files read are appended to ``scanned``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # a socket or a file removed meanwhile
                continue
            if scanned is not None:
                scanned.append(path.name)
            if CANARY.encode() in data:
                found.append(str(path.relative_to(root)))
    return found


def test_the_scan_finds_a_canary(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "blob.bin").write_bytes(b"\x00\x01" + CANARY.encode() + b"\xff")
    (tmp_path / "clean.txt").write_text("nothing here")
    assert files_with_canary(tmp_path) == ["a/b/blob.bin"]


@pytest.fixture
def private_tree(tmp_path, monkeypatch):
    """Point every place a session writes to under tmp_path."""
    for name in ("home", "tmp", "runs", "exchange", "dspy-cache"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # kernels' temp files
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the runtime folder
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return tmp_path


def _whole_session(tmp_path: Path, lm: dspy.LM, env_vars: dict[str, str]) -> tuple[list, list]:
    """optimize, checkpoint, cancel, resume, shutdown with a manifest; the files holding the
    canary while the session lives and after it, and the events seen."""
    task = arithmetic()
    options, compile_args = quick_settings()
    compile_args["num_trials"] = TRIALS
    env = {**OFFLINE_DSPY_ENV, "DSPY_CACHEDIR": str(tmp_path / "dspy-cache"), **env_vars}
    folder = tmp_path / "runs" / "arith"
    with PoolManager(
        [PoolSpec("canary", size=1, env_vars=env)],
        exchange=ExchangeConfig(folder=str(tmp_path / "exchange")),
    ) as manager:
        pool = manager["canary"]
        run = MIPROv2(pool, metric=task.metric, task_lm=lm, prompt_lm=lm, **options).optimize(
            task.make_program(), task.trainset, task.valset, checkpoint_dir=folder, **compile_args
        )
        run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] >= 2, timeout=300)
        run.checkpoint()
        run.cancel()
        events = list(run.events)
        run.close()
        resumed = MIPROv2.resume(
            folder, pool, program=task.make_program(), metric=task.metric, task_lm=lm, prompt_lm=lm
        )
        resumed.wait_for_event(lambda e: e["kind"] == "trial", timeout=300)
        events += list(resumed.events)
        scanned: list[str] = []
        while_alive = files_with_canary(tmp_path, scanned)
        # The kernel's connection file and log, and the run's log, were among them.
        assert any(n.endswith(".log") and n != "run.log" for n in scanned), scanned
        assert "run.log" in scanned and any(n.endswith(".json") for n in scanned)
        manager.shutdown(manifest=tmp_path / "manifest.json")  # checkpoints the live run
    assert (folder / "run.log").exists() and (tmp_path / "manifest.json").exists()
    return while_alive + files_with_canary(tmp_path), events


def test_key_in_env_vars_is_never_written(private_tree):
    with SimulatedLMServer(api_key=CANARY, latency_s=0.01) as server:
        # The key comes from the pool's env_vars (OPENAI_API_KEY), as recommended; the LM
        # caches its answers, so DSPy's disk cache is written (and searched) too.
        lm = dspy.LM("openai/arithmetic", api_base=server.url, cache=True)
        leaks, events = _whole_session(private_tree, lm, {"OPENAI_API_KEY": CANARY})
        assert server.statuses.get(200, 0) > 0 and 401 not in server.statuses
    assert any(private_tree.joinpath("dspy-cache").rglob("*")), "DSPy's cache was not used"
    assert leaks == []
    assert CANARY not in repr(events)


def test_key_on_the_lm_is_never_written(private_tree):
    with SimulatedLMServer(api_key=CANARY, latency_s=0.01) as server:
        # The key is given on the LM: it travels to the kernel in memory, over the signed
        # channel, and the pool has no key of its own.
        lm = dspy.LM("openai/arithmetic", api_base=server.url, api_key=CANARY, cache=True)
        leaks, events = _whole_session(private_tree, lm, {})
        assert server.statuses.get(200, 0) > 0 and 401 not in server.statuses
    assert leaks == []
    assert CANARY not in repr(events)
