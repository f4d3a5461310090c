"""scripts/run_tutorial.py runs a notebook from a terminal; scripts/gpu_check.py skips cleanly
without a GPU. Both run as the user runs them: as programs (nothing here imports them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[2]
RUN_TUTORIAL = REPO / "scripts" / "run_tutorial.py"
SAVE_TUTORIALS = REPO / "scripts" / "save_tutorials.py"
GPU_CHECK = REPO / "scripts" / "gpu_check.py"


def run_script(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSPEX_HOME": str(home)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=240, env=env, check=False
    )


def write_notebook(path: Path, *cells: object) -> Path:
    nb = new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


@pytest.mark.integration
def test_run_tutorial_streams_progress_and_writes_the_executed_notebook(tmp_path):
    notebook = write_notebook(
        tmp_path / "demo.ipynb",
        new_markdown_cell("## Step one"),
        new_code_cell(
            f"import os\nprint('cwd is the notebook folder:', os.getcwd() == {str(tmp_path)!r})"
        ),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\n6 * 7"),
    )
    out = tmp_path / "out" / "demo.executed.ipynb"
    done = run_script(str(RUN_TUTORIAL), str(notebook), "--output", str(out), home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "## Step one" in lines
    assert "[1/2] import os" in lines and "[2/2] 6 * 7" in lines  # NBVAL markers skipped
    assert "cwd is the notebook folder: True" in lines and "42" in lines
    assert "done: 2/2 code cells ran, 0 with an error" in done.stdout
    executed = nbformat.read(out, as_version=4)
    assert executed.cells[2].outputs[0]["data"]["text/plain"] == "42"
    assert "execution" not in executed.cells[1].metadata  # no timings: stable files


@pytest.mark.integration
def test_run_tutorial_fails_on_a_failing_cell_and_keeps_what_ran(tmp_path):
    notebook = write_notebook(
        tmp_path / "bad.ipynb",
        new_code_cell("print('before')"),
        new_code_cell("raise ValueError('broken on purpose')"),
        new_code_cell("print('never')"),
    )
    out = tmp_path / "bad.executed.ipynb"
    done = run_script(str(RUN_TUTORIAL), str(notebook), "--output", str(out), home=tmp_path)
    assert done.returncode == 1
    assert "ValueError: broken on purpose" in done.stderr
    assert "FAILED: 2/3 code cells ran, 1 with an error" in done.stdout
    executed = nbformat.read(out, as_version=4)
    assert executed.cells[1].outputs[0]["output_type"] == "error"
    assert executed.cells[2].outputs == []


@pytest.mark.integration
def test_save_tutorials_stores_widget_state_with_fallbacks_and_no_machine_paths(tmp_path):
    home = tmp_path / "home"
    notebook = write_notebook(
        tmp_path / "widgets.ipynb",
        new_code_cell(
            "import ipywidgets as w\n"
            "bar = w.IntProgress(value=3, max=8, description='search')\n"
            "w.VBox([w.HTML('<b>trial 3/8</b> &middot; 1 full evaluation'), bar])"
        ),
        new_code_cell(
            "import os, tempfile\n"
            f"print(os.environ['DSPEX_HOME'] + '/envs/tut-opt/bin/python')\n"
            f"print({str(REPO)!r} + '/notebooks')\n"
            "print(tempfile.gettempdir() + '/dspex-abc/kernel.sock')"
        ),
    )
    done = run_script(str(SAVE_TUTORIALS), "--no-setup", str(notebook), home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 widget output(s) with a static fallback" in done.stdout
    saved = nbformat.read(notebook, as_version=4)
    state = saved.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    data = saved.cells[0].outputs[0]["data"]
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] in state
    assert data["text/plain"] == "trial 3/8 · 1 full evaluation\nsearch"  # not VBox(children=
    assert (
        '<progress value="3" max="8">' in data["text/html"]
        and "<b>trial 3/8</b>" in data["text/html"]
    )
    assert saved.cells[1].outputs[0]["text"].splitlines() == [
        "$DSPEX_HOME/envs/tut-opt/bin/python",
        "$REPO/notebooks",
        "$TMPDIR/dspex-abc/kernel.sock",
    ]


def test_run_tutorial_usage_errors(tmp_path):
    done = run_script(str(RUN_TUTORIAL), str(tmp_path / "missing.ipynb"), home=tmp_path)
    assert done.returncode == 2 and "no notebook at" in done.stderr
    done = run_script(str(RUN_TUTORIAL), "--setup-envs", "no-such-env", home=tmp_path)
    assert done.returncode == 2 and "unknown tutorial environment" in done.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be visible here")
def test_gpu_check_skips_every_check_without_a_gpu(tmp_path):
    done = run_script(str(GPU_CHECK), "--home", str(tmp_path / "home"), home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    skips = [
        line for line in done.stdout.splitlines() if line.endswith("no NVIDIA GPU visible: SKIP")
    ]
    assert len(skips) == 5
    assert "summary: 0 passed, 0 failed, 5 skipped" in done.stdout
    assert not (tmp_path / "home").exists()  # nothing was created
