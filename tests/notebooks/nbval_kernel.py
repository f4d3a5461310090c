"""pytest plugin for the tutorials' nbval run (``pytest -p tests.notebooks.nbval_kernel``).

The tutorials start pool kernels from the notebook's kernel; those processes inherit its
stderr. ipykernel forwards what any process writes there into whichever cell is running
(``IPKernelApp.capture_fd_output``), so a pool kernel's log line could land in a random cell
and make nbval's output comparison flaky. This plugin points ``IPYTHONDIR`` at a private
profile that turns that forwarding off, for the kernels nbval starts (and theirs): the cells'
outputs are then what the notebook's code prints, as ``scripts/run_tutorial.py`` stores them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

KERNEL_CONFIG = "c.IPKernelApp.capture_fd_output = False\n"


def pytest_configure(config: pytest.Config) -> None:
    folder = Path(tempfile.mkdtemp(prefix="dspex-nbval-ipython-"))
    profile = folder / "profile_default"
    profile.mkdir()
    (profile / "ipython_kernel_config.py").write_text(KERNEL_CONFIG)
    config._dspex_ipythondir = (folder, os.environ.get("IPYTHONDIR"))  # type: ignore[attr-defined]
    os.environ["IPYTHONDIR"] = str(folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = getattr(config, "_dspex_ipythondir", None)
    if saved is None:
        return
    folder, previous = saved
    if previous is None:
        os.environ.pop("IPYTHONDIR", None)
    else:
        os.environ["IPYTHONDIR"] = previous
    shutil.rmtree(folder, ignore_errors=True)
