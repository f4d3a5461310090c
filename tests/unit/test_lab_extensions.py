"""What a user of this project's .venv sees in JupyterLab: the dspex extension, and not the
Lab panel of ipyparallel, which the dev extra installs only as the benchmarks' baseline
(scripts/setup.sh disables it in .venv's own Jupyter config)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def labextensions() -> dict[str, str]:
    """Each installed lab extension -> its state line, as `jupyter labextension list` says."""
    jupyter = Path(sys.executable).with_name("jupyter")
    done = subprocess.run(
        [str(jupyter), "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = {}
    for line in ANSI.sub("", done.stdout + done.stderr).splitlines():
        words = line.split()
        if len(words) >= 3 and words[1].startswith("v") and words[2] in ("enabled", "disabled"):
            found[words[0]] = line.strip()
    return found


def test_ipyparallel_lab_panel_is_disabled_and_dspex_enabled():
    pytest.importorskip("jupyterlab")
    pytest.importorskip("ipyparallel", reason="the bench extra (ipyparallel) is not installed")
    found = labextensions()
    assert " enabled" in found["dspex-jupyter"], found
    assert " disabled" in found["ipyparallel-labextension"], found
    # Disabled in this environment's own config, not the user's (~/.jupyter).
    config = Path(sys.prefix) / "etc" / "jupyter" / "labconfig" / "page_config.json"
    assert '"ipyparallel-labextension": true' in config.read_text()
