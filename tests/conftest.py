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
