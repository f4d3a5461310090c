"""Suite-wide fixtures: a private DSPEX_HOME, and a check that no kernel outlives the suite."""

from __future__ import annotations

import os

import psutil
import pytest


@pytest.fixture(autouse=True, scope="session")
def _no_leaked_kernels():
    """Fail the run if any process started by the suite is still alive at its end."""
    yield
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=10)
    leaked = [f"{p.pid}: {' '.join(p.cmdline())}" for p in alive if p.is_running()]
    assert not leaked, "processes left running by the test suite:\n" + "\n".join(leaked)


@pytest.fixture(autouse=True)
def _private_dspex_home(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.dspex: every test gets a private home unless it sets one."""
    if "DSPEX_HOME" not in os.environ or not os.environ["DSPEX_HOME"].startswith(
        str(tmp_path_factory.getbasetemp())
    ):
        monkeypatch.setenv("DSPEX_HOME", str(tmp_path_factory.mktemp("dspex-home")))
    yield


# The loopback SIMULATED LM server fixture (lm_server), for tests of LMs over real HTTP.
pytest_plugins = ["tests.integration.lm_fixtures"]


@pytest.fixture(autouse=True, scope="session")
def _session_dspex_home():
    """Module- and session-scoped fixtures run before the per-test home above is set, and
    dspex writes there too (its signing key): they get a private home of their own, outside
    pytest's temp folder so that each test still gets a fresh one."""
    import shutil
    import tempfile

    home = tempfile.mkdtemp(prefix="dspex-session-home-")
    patch = pytest.MonkeyPatch()
    patch.setenv("DSPEX_HOME", home)
    yield
    patch.undo()
    shutil.rmtree(home, ignore_errors=True)
