"""The JupyterLab extension ships inside the wheel: installing it needs no node."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .lab import REPO

EXT = "share/jupyter/labextensions/dspex-jupyter"


def _labextension_list(jupyter: Path | str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [str(jupyter), "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # no colours


def test_labextension_list_shows_it_enabled():
    """In this environment (the editable install of scripts/setup.sh)."""
    listing = _labextension_list(Path(sys.prefix) / "bin" / "jupyter")
    assert re.search(r"dspex-jupyter v0\.1\.0 enabled OK \(python, dspex-jupyter\)", listing), (
        listing
    )


@pytest.mark.envs
def test_wheel_ships_the_extension_and_installs_without_node(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", "-q", "-w", dist, REPO],
        check=True,
        timeout=600,
    )
    (wheel,) = dist.glob("dspex_jupyter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = f"dspex_jupyter-0.1.0.data/data/{EXT}"
    for required in ("package.json", "install.json", "static/style.js"):
        assert f"{data}/{required}" in names, names
    assert any(n.startswith(f"{data}/static/remoteEntry.") for n in names), names
    # Only once: not also as package data inside dspex_jupyter/.
    assert not [n for n in names if n.startswith("dspex_jupyter/labextension")]

    # A fresh environment with no node on PATH: pip install, then JupyterLab finds it.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = str(venv / "bin")  # no node, no npm
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
         wheel, "jupyterlab>=4,<5"],
        check=True,
        timeout=600,
        env=env,
    )  # fmt: skip
    assert (venv / EXT / "package.json").is_file()
    listing = _labextension_list(venv / "bin" / "jupyter", env=env)
    assert re.search(r"dspex-jupyter v0\.1\.0 enabled OK \(python, dspex-jupyter\)", listing), (
        listing
    )


@pytest.mark.envs
def test_runtime_wheel_for_pool_environments_leaves_the_js_out(tmp_path):
    from dspex_jupyter.core.envs import runtime_wheel

    wheel = runtime_wheel(home=tmp_path / "home")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dspex_jupyter/runtime/__init__.py" in names
    assert not [n for n in names if "labextension" in n], names
