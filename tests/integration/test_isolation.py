"""Two real environments made by `dspex env create`: each pool sees only its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import DependencyMissing

pytestmark = [pytest.mark.integration, pytest.mark.envs]


def dspex(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dspex_jupyter.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    home = tmp_path_factory.mktemp("iso-home")
    for args in (("iso-a", "--package", "six"), ("iso-b",)):
        done = dspex(home, "env", "create", *args)
        assert done.returncode == 0, done.stderr
    specs = [
        PoolSpec("a", env="iso-a", size=1, env_vars={"ONLY_IN_A": "yes"}, warmup=["six"]),
        PoolSpec("b", env="iso-b", size=1),
    ]
    with PoolManager(specs, home=home) as manager:
        yield home, manager


def test_each_pool_runs_in_its_own_prefix(pools):
    home, manager = pools
    # The helpers module is imported in each kernel from the working folder, as a
    # notebook's own modules would be.
    prefix_a = manager["a"].call("tests.integration.helpers:prefix")
    prefix_b = manager["b"].call("tests.integration.helpers:prefix")
    assert Path(prefix_a) == home / "envs" / "iso-a"
    assert Path(prefix_b) == home / "envs" / "iso-b"
    assert sys.prefix not in (prefix_a, prefix_b)


def test_package_installed_in_one_env_imports_only_there(pools):
    _, manager = pools
    assert manager["a"].call("six:ensure_str", "ok") == "ok"
    with pytest.raises(DependencyMissing) as info:
        manager["b"].call("six:ensure_str", "ok")
    python_b = manager["b"].source.python
    assert info.value.install_command == f"{python_b} -m pip install six"
    # The test runner's own packages do not leak into either environment.
    for name in ("a", "b"):
        with pytest.raises(DependencyMissing):
            manager[name].call("hypothesis:given")


def test_env_vars_are_visible_only_in_their_pool(pools):
    _, manager = pools
    assert manager["a"].call("os:getenv", "ONLY_IN_A") == "yes"
    assert manager["b"].call("os:getenv", "ONLY_IN_A") is None
