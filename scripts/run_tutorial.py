"""Run a tutorial notebook from a terminal, cell by cell, with its outputs as they come.

    .venv/bin/python scripts/run_tutorial.py notebooks/07_complete_pipeline.ipynb \
        --output build/07_complete_pipeline.executed.ipynb
    .venv/bin/python scripts/run_tutorial.py notebooks/01_pools_and_sessions.ipynb --inplace
    .venv/bin/python scripts/run_tutorial.py --setup-envs       # the tutorials' environments

The notebook runs in a kernel of this Python (the ``python3`` kernelspec), with the
notebook's folder as working folder, as JupyterLab and nbval run it. Each code cell is
announced as ``[k/N] <its first line>``; what it prints, and the text of what it displays,
follow as the kernel sends them. The executed notebook is written with its outputs
(``--output``, or ``--inplace`` to store them in the notebook itself, as nbval compares).

The tutorial environments a notebook uses (its ``environment("NAME")`` calls) are prepared
first, each step on a line of this terminal (in the notebook that would be a progress bar,
which a terminal cannot show); ``--no-setup`` skips that. ``DSPEX_HOME`` (where
environments live) defaults to the repository's ``.dspex-tutorials``.
Exit status: 0 when every cell ran, 1 when one failed (the notebook is still written, up to
and including the failing cell), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
DEFAULT_HOME = REPO / ".dspex-tutorials"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Outputs come from the notebook's code only: what other processes (pool kernels) write to the
# kernel's stderr goes to its log file, not into whichever cell happens to be running.
KERNEL_ARGUMENTS = ("--IPKernelApp.capture_fd_output=False",)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# How a tutorial asks for one of its environments: environment("tut-light").
ENVIRONMENT_CALL = re.compile(r"""\benvironment\(\s*["']([\w.-]+)["']""")


def say(message: str) -> None:
    print(f"[tutorial {time.strftime('%H:%M:%S')}] {message}", flush=True)


def first_line(source: str) -> str:
    for line in source.splitlines():
        text = line.strip()
        if text and not text.startswith("# NBVAL"):
            return text if len(text) <= 90 else text[:87] + "..."
    return "(empty cell)"


def make_client(nb: Any, notebook: Path, timeout: float, kernel: str) -> tuple[Any, Any, str]:
    """The notebook client, its kernel manager (ours to shut down), its sockets' folder."""
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class TerminalClient(NotebookClient):
        """nbclient's client, echoing every output to this terminal as it arrives."""

        def output(self, outs, msg, display_id, cell_index):  # type: ignore[no-untyped-def]
            out = super().output(outs, msg, display_id, cell_index)
            echo(msg)
            return out

    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    position = {index: k for k, index in enumerate(code_cells, start=1)}

    def announce(cell: Any, cell_index: int, **_: Any) -> None:
        for heading in headings_before(nb, cell_index):
            print(f"\n{heading}", flush=True)
        print(f"[{position[cell_index]}/{len(code_cells)}] {first_line(cell.source)}", flush=True)

    # IPC transport (Unix sockets in a private folder), as dspex's own kernels use: nothing
    # listens on TCP.
    sockets = tempfile.mkdtemp(prefix="dspex-tutorial-")
    km = AsyncKernelManager(kernel_name=kernel, transport="ipc", ip=os.path.join(sockets, "kernel"))
    client = TerminalClient(
        nb,
        km=km,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(notebook.parent)}},
        record_timing=False,
        on_cell_execute=announce,
        extra_arguments=list(KERNEL_ARGUMENTS),
    )
    return client, km, sockets


def headings_before(nb: Any, cell_index: int) -> list[str]:
    """The markdown headings between the previous code cell and this one."""
    found: list[str] = []
    for cell in reversed(nb.cells[:cell_index]):
        if cell.cell_type == "code":
            break
        found[:0] = [line for line in cell.source.splitlines() if line.startswith("#")]
    return found


def echo(msg: dict[str, Any]) -> None:
    """One kernel output on the terminal: text as is, rich outputs by their text."""
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(content.get("text", ""))
        stream.flush()
    elif kind in ("display_data", "execute_result"):
        data = content.get("data", {})
        if WIDGET_MIME in data:
            print("    (a live widget: open the notebook in JupyterLab to see it)", flush=True)
        elif "text/plain" in data:
            print(data["text/plain"], flush=True)
    elif kind == "error":
        print(f"{content.get('ename')}: {content.get('evalue')}", file=sys.stderr, flush=True)


def scrub_paths(nb: Any) -> None:
    """Replace this machine's DSPEX_HOME and repository paths in outputs by placeholders."""
    places = [(os.environ["DSPEX_HOME"], "$DSPEX_HOME"), (str(REPO), "$REPO")]

    def scrub(text: str) -> str:
        for path, placeholder in places:
            text = text.replace(path, placeholder)
        return text

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if isinstance(out.get("text"), str):
                out["text"] = scrub(out["text"])
            for mime, value in out.get("data", {}).items():
                if isinstance(value, str):
                    out["data"][mime] = scrub(value)


def run_notebook(notebook: Path, output: Path, timeout: float, kernel: str) -> int:
    import nbformat
    from jupyter_core.utils import run_sync
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(notebook, as_version=4)
    code_cells = sum(1 for c in nb.cells if c.cell_type == "code")
    say(f"running {notebook.relative_to(REPO) if notebook.is_relative_to(REPO) else notebook}")
    say(f"{code_cells} code cells; kernel {kernel!r} ({sys.executable}); DSPEX_HOME is")
    print(f"    {os.environ['DSPEX_HOME']}", flush=True)
    client, km, sockets = make_client(nb, notebook, timeout, kernel)
    # Beside the executed notebook; a stored tutorial's in build/.
    log_dir = REPO / "build" if output == notebook else output.parent
    log_path = log_dir / f"{notebook.stem}.kernels.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    status = 0
    log = log_path.open("w")
    try:
        client.execute(stdout=log, stderr=log)
    except CellExecutionError as exc:
        status = 1
        print(file=sys.stderr)
        lines = ANSI.sub("", str(exc)).strip().splitlines()
        say(f"a cell failed: {lines[-1] if lines else type(exc).__name__}")
    except KeyboardInterrupt:
        status = 1
        say("interrupted")
    finally:
        if km.has_kernel:
            run_sync(km.shutdown_kernel)()
        shutil.rmtree(sockets, ignore_errors=True)
        log.close()
    elapsed = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    if output == notebook:  # a stored tutorial: no paths of this machine in its outputs
        scrub_paths(nb)
    nbformat.write(nb, output)
    ran = sum(1 for c in nb.cells if c.cell_type == "code" and c.get("execution_count"))
    errors = sum(
        1
        for c in nb.cells
        if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.outputs)
    )
    print(flush=True)
    say(
        f"{'done' if status == 0 else 'FAILED'}: {ran}/{code_cells} code cells ran, "
        f"{errors} with an error, in {elapsed:.1f} s"
    )
    say(f"executed notebook written to {output}")
    say(f"the kernels' own log: {log_path}")
    return status


def notebook_environments(notebook: Path) -> list[str]:
    """The tutorial environments ``notebook``'s code cells ask for, in order."""
    import nbformat

    sys.path.insert(0, str(NOTEBOOKS))
    from dspex_tutorials import ENVIRONMENTS  # type: ignore[import-not-found]

    nb = nbformat.read(notebook, as_version=4)
    found: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            for name in ENVIRONMENT_CALL.findall(cell.source):
                if name in ENVIRONMENTS and name not in found:
                    found.append(name)
    return found


def setup_environments(names: list[str]) -> int:
    """Create the tutorials' environments that do not exist yet (each one pip call), and
    refresh the runtime of those made with another version of dspex-jupyter."""
    sys.path.insert(0, str(NOTEBOOKS))
    from dspex_tutorials import ENVIRONMENTS, ensure_environment  # type: ignore[import-not-found]

    from dspex_jupyter.core.errors import DspexError

    unknown = sorted(set(names) - set(ENVIRONMENTS))
    if unknown:
        print(f"unknown tutorial environment(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    for name in names or list(ENVIRONMENTS):
        started = time.perf_counter()
        say(f"environment {name!r} ({', '.join(ENVIRONMENTS[name]) or 'runtime only'}) ...")
        try:
            _, action = ensure_environment(name)
        except DspexError as exc:
            say(f"environment {name!r}: FAILED: {exc}")
            return 1
        say(f"environment {name!r}: {action} ({time.perf_counter() - started:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("notebook", nargs="?", type=Path, help="the .ipynb to run")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", type=Path, help="where to write the executed notebook")
    where.add_argument(
        "--inplace", action="store_true", help="store the outputs in the notebook itself"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds one cell may run (default 900)"
    )
    parser.add_argument("--kernel", default="python3", help="kernelspec (default python3)")
    parser.add_argument(
        "--no-setup", action="store_true", help="do not prepare the notebook's environments first"
    )
    parser.add_argument(
        "--setup-envs",
        nargs="*",
        metavar="NAME",
        help="create the tutorials' environments (all, or those named) and exit",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DSPEX_HOME", str(DEFAULT_HOME))
    if args.setup_envs is not None:
        return setup_environments(args.setup_envs)
    if args.notebook is None:
        parser.error("give a notebook (or --setup-envs)")
    notebook = args.notebook.resolve()
    if not notebook.is_file():
        parser.error(f"no notebook at {args.notebook}")
    if args.inplace:
        output = notebook
    elif args.output is not None:
        output = args.output.resolve()
    else:
        output = REPO / "build" / f"{notebook.stem}.executed.ipynb"
    names = [] if args.no_setup else notebook_environments(notebook)
    if names and setup_environments(names) != 0:
        return 1
    return run_notebook(notebook, output, args.timeout, args.kernel)


if __name__ == "__main__":
    sys.exit(main())
