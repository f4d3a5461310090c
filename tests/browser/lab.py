"""JupyterLab on loopback and a Playwright page driving it, for the browser tests.

The server is started by the tests themselves: 127.0.0.1, a free port, a random token, a
temporary root folder and private Jupyter config/data/runtime/settings folders, so nothing of
the user's Jupyter setup takes part. The browser is Debian's chromium driven by the
`playwright` PyPI package (its driver ships in the wheel; no browser download).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nbformat
import psutil

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# Plugins that would reach out to the network or pop up notices over what is tested.
DISABLED_PLUGINS = [
    "@jupyterlab/apputils-extension:announcements",
    "@jupyterlab/extensionmanager-extension:plugin",
]


def find_chromium() -> str | None:
    path = os.environ.get("DSPEX_CHROMIUM") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """`python -m jupyterlab` (or, with ``app="notebook"``, Notebook 7's `python -m notebook`)
    on 127.0.0.1 with token auth, in a temporary root."""

    def __init__(self, base: Path, env: dict[str, str] | None = None, app: str = "lab") -> None:
        if app not in ("lab", "notebook"):
            raise ValueError(f"app must be 'lab' or 'notebook', not {app!r}")
        self.app = app
        self.base = base
        self.root = base / "root"
        self.token = secrets.token_hex(24)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "jupyterlab.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._up = False
        self._reader: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 90) -> LabServer:
        for sub in ("root", "config/labconfig", "data", "runtime", "settings", "workspaces"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        page_config = {"disabledExtensions": {name: True for name in DISABLED_PLUGINS}}
        (self.base / "config" / "labconfig" / "page_config.json").write_text(
            json.dumps(page_config), encoding="utf-8"
        )
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(self.base / "config"),
            JUPYTER_DATA_DIR=str(self.base / "data"),
            JUPYTER_RUNTIME_DIR=str(self.base / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(self.base / "settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.base / "workspaces"),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
        )
        env.pop("JUPYTER_PATH", None)
        env.update(self.extra_env)
        app_class = "LabApp" if self.app == "lab" else "JupyterNotebookApp"
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab" if self.app == "lab" else "notebook",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.open_browser=False",
            "--ServerApp.allow_root=True",  # CI runs as root
            f"--{app_class}.expose_app_in_browser=True",
            *(
                [
                    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    "--LabApp.news_url=",
                ]
                if self.app == "lab"
                else []
            ),
            "--LanguageServerManager.autodetect=False",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self._up:
            log = self.log()
            self.stop()
            raise RuntimeError(f"JupyterLab did not start within {timeout} s:\n{log[-4000:]}")
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        running = re.compile(rf"http://127\.0\.0\.1:{self.port}/")
        with open(self.log_path, "ab") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if not self._up and running.search(line.decode(errors="replace")):
                    self._up = True
                    self._ready.set()
        self._ready.set()  # the server exited: let start() see it

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def stop(self, timeout: float = 30) -> list[str]:
        """Shut the server and its kernels down; return what had to be killed."""
        proc = self.proc
        if proc is None:
            return []
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        if proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown")
            except Exception:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        # Pool kernels exit by themselves once the notebook kernel that started them is gone.
        _, alive = psutil.wait_procs(tree, timeout=15)
        killed = []
        for p in alive:
            try:
                killed.append(f"{p.pid}: {' '.join(p.cmdline())}")
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        if self._reader is not None:
            self._reader.join(10)
        self.proc = None
        return killed

    # -- notebooks ---------------------------------------------------------------------

    def write_notebook(self, name: str, cells: Iterable[str]) -> str:
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
        path = self.root / name
        nbformat.write(nb, path)
        return name


class LabPage:
    """One browser page on the server, with the few JupyterLab moves the tests make."""

    def __init__(self, page: Any, server: LabServer) -> None:
        self.page = page
        self.server = server

    def open_lab(self, timeout: float = 60_000) -> None:
        self.page.goto(f"{self.server.url}/lab?token={self.server.token}")
        self.page.wait_for_selector("#jp-main-dock-panel", timeout=timeout)
        self.page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.started !== undefined", timeout=timeout
        )
        self.page.evaluate("() => window.jupyterapp.started")
        self.page.evaluate("() => window.jupyterapp.restored")

    def open_notebook(self, path: str, timeout: float = 60_000) -> None:
        """Open (or activate) a notebook and wait until its kernel is idle. In Notebook 7 a
        notebook is a page of its own: this loads it."""
        if self.server.app == "notebook":
            self.page.goto(f"{self.server.url}/notebooks/{path}?token={self.server.token}")
            self.page.wait_for_function(
                "() => window.jupyterapp && window.jupyterapp.started !== undefined",
                timeout=timeout,
            )
            self.page.evaluate("() => window.jupyterapp.restored")
        else:
            self.page.evaluate(
                "async (path) => { await window.jupyterapp.commands.execute("
                "'docmanager:open', {path, factory: 'Notebook'}); }",
                path,
            )
        self.page.wait_for_function(
            """(path) => {
              const w = window.jupyterapp.shell.currentWidget;
              if (!w || !w.context || w.context.path !== path) return false;
              const k = w.sessionContext.session && w.sessionContext.session.kernel;
              return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
            }""",
            arg=path,
            timeout=timeout,
        )

    def run_cell(self, index: int, timeout: float = 120_000) -> str:
        """Run cell `index` of the current notebook; wait until it finished; return its text."""
        self.page.evaluate(
            """async (index) => {
              const app = window.jupyterapp;
              const panel = app.shell.currentWidget;
              panel.content.activeCellIndex = index;
              await app.commands.execute('notebook:run-cell');
            }""",
            index,
        )
        return self.wait_cell_done(index, timeout)

    def start_cell(self, index: int) -> None:
        """Start running cell `index` without waiting for it (a long cell)."""
        self.page.evaluate(
            """(index) => {
              const app = window.jupyterapp;
              app.shell.currentWidget.content.activeCellIndex = index;
              void app.commands.execute('notebook:run-cell');
            }""",
            index,
        )

    def wait_cell_done(self, index: int, timeout: float = 120_000) -> str:
        handle = self.page.wait_for_function(
            """(index) => {
              const panel = window.jupyterapp.shell.currentWidget;
              const cell = panel.content.widgets[index];
              const count = cell.model.executionCount;
              if (count === null || cell.promptNode.textContent.includes('*')) return false;
              return cell.outputArea.node.innerText + '\\u0000';
            }""",
            arg=index,
            timeout=timeout,
        )
        text = handle.json_value().rstrip("\u0000")
        return text

    def cell_output(self, index: int) -> Any:
        """The locator of cell `index`'s output area in the current notebook."""
        return (
            self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")
            .nth(index)
            .locator(".jp-OutputArea")
        )

    def restart_kernel(self, timeout: float = 60_000) -> None:
        self.page.evaluate(
            "async () => { await window.jupyterapp.shell.currentWidget"
            ".sessionContext.session.kernel.restart(); }"
        )
        self.page.wait_for_function(
            """() => {
              const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
              return k.status === 'idle';
            }""",
            timeout=timeout,
        )

    def open_sidebar(self) -> Any:
        sidebar = self.page.locator("#dspex-sidebar")
        if self.server.app == "notebook":
            # Notebook 7 has no sidebar tab bar: its View menu (or this command) shows it.
            self.page.evaluate("() => window.jupyterapp.shell.activateById('dspex-sidebar')")
            sidebar.wait_for(state="visible")
            return sidebar
        tab = self.page.locator(".jp-SideBar .lm-TabBar-tab[data-id='dspex-sidebar']")
        tab.wait_for(state="visible")
        if not sidebar.is_visible():
            tab.click()
        sidebar.wait_for(state="visible")
        return sidebar

    def append_cell(self, source: str) -> int:
        """Add a code cell at the end of the current notebook; return its index."""
        return self.page.evaluate(
            """(source) => {
              const shared = window.jupyterapp.shell.currentWidget.content.model.sharedModel;
              shared.insertCell(shared.cells.length, {cell_type: 'code', source});
              return shared.cells.length - 1;
            }""",
            source,
        )

    def run_all(self) -> None:
        """Run every cell of the current notebook (Run All), without waiting."""
        self.page.evaluate(
            "() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
        )

    def screenshot(self, locator: Any, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        locator.screenshot(path=str(path))
        return path


def optimize_cells(pool: str, trials: int, latency_s: float) -> list[str]:
    """The cells that load the extension, start `pool` and start an offline MIPROv2 run stored
    as `run`. The LM is SIMULATED (offline, deterministic: dspex_jupyter.testing), answering
    after `latency_s` per call so the run lasts long enough to watch."""
    return [
        "%load_ext dspex_jupyter",
        f"%dspex start {pool} --size 2",
        "from dspex_jupyter.testing import arithmetic\n"
        "task = arithmetic()\n"
        "program, metric = task.make_program(), task.metric\n"
        "trainset, valset = task.trainset, task.valset\n"
        f"lm = task.lm(latency_s={latency_s})\n"
        "COMPILE = dict(minibatch_size=10, max_bootstrapped_demos=2, max_labeled_demos=2,\n"
        "               program_aware_proposer=False, data_aware_proposer=False,\n"
        "               tip_aware_proposer=False, fewshot_aware_proposer=False)",
        f"%dspex optimize --pool {pool} --program program --trainset trainset --valset valset "
        f"--metric metric --lm lm --num-candidates 4 --num-trials {trials} --seed 0 "
        "--compile-args COMPILE --name run",
    ]
