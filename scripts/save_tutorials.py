"""Run the tutorials and store their outputs in them, as they ship: readable before they run.

    .venv/bin/python scripts/save_tutorials.py              # notebooks/01_* ... 07_*
    .venv/bin/python scripts/save_tutorials.py notebooks/03_mipro_dashboard.ipynb

Right before each notebook runs, the environments it uses are prepared (as
``run_tutorial.py --setup-envs`` does, so it shows none being made; should one be refreshed
all the same, because dspex-jupyter's files changed meanwhile, the notebook runs again).
Each notebook runs as
``scripts/run_tutorial.py --inplace`` runs it (nbclient, kernel ``python3``, the notebook's
folder as working folder, ``DSPEX_HOME`` = the repository's ``.dspex-tutorials``), with
``store_widget_state``: the widgets' last state is saved in the notebook, so JupyterLab draws
the run dashboard before anything runs. Before writing:

- machine paths in outputs and widget state (the repository, ``DSPEX_HOME``, temporary
  folders, the home folder) become ``$REPO``, ``$DSPEX_HOME``, ``$TMPDIR``, ``~``;
- every widget output gets a readable fallback built from that saved state, for viewers
  without widgets (GitHub, nbviewer, a terminal): ``text/html``, the widget as drawn
  (its HTML parts, progress bars and buttons), and ``text/plain``, its text, instead of
  ipywidgets' ``RunDashboard(children=(HTML(value=...`` repr.

A notebook that still names a machine path after that is reported and the exit status is 1.
Exit status: 0 when every notebook ran and was saved, 1 otherwise.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_tutorial  # this folder's sibling script

REPO = run_tutorial.REPO
TUTORIALS = sorted(run_tutorial.NOTEBOOKS.glob("0[1-9]_*.ipynb"))
WIDGET_MIME = run_tutorial.WIDGET_MIME
STATE_MIME = "application/vnd.jupyter.widget-state+json"
TAG = re.compile(r"<[^>]+>")
SVG = re.compile(r"<svg\b.*?</svg>", re.DOTALL)
# Models whose children are drawn side by side; other boxes stack them.
ROW_MODELS = ("HBoxModel",)
ROW_STYLE = "display:flex;gap:8px;align-items:center"


def machine_paths() -> list[tuple[str, str]]:
    """(path, placeholder), longest path first so ``$DSPEX_HOME`` wins over ``$REPO``."""
    places = {
        os.environ["DSPEX_HOME"]: "$DSPEX_HOME",
        str(Path(os.environ["DSPEX_HOME"]).resolve()): "$DSPEX_HOME",
        str(REPO): "$REPO",
        tempfile.gettempdir(): "$TMPDIR",
        str(Path.home()): "~",
    }
    return sorted(places.items(), key=lambda item: len(item[0]), reverse=True)


def scrub(value: Any, places: list[tuple[str, str]]) -> Any:
    """``value`` (JSON: strings, lists, dicts) with machine paths replaced."""
    if isinstance(value, str):
        for path, placeholder in places:
            value = value.replace(path, placeholder)
        return value
    if isinstance(value, list):
        return [scrub(item, places) for item in value]
    if isinstance(value, dict):
        return {key: scrub(item, places) for key, item in value.items()}
    return value


# ---- widget fallbacks ----------------------------------------------------------------
def widget_html(model_id: str, models: dict[str, Any]) -> str:
    """A widget as static HTML, from its saved state (the parts a reader needs)."""
    model = models.get(model_id)
    if model is None:
        return ""
    name, state = model.get("model_name", ""), model.get("state", {})
    layout = models.get(str(state.get("layout", "")).removeprefix("IPY_MODEL_"), {})
    if layout.get("state", {}).get("display") == "none":
        return ""  # hidden in the live widget too (a confirm button not asked for)
    if name in ("HTMLModel", "HTMLMathModel"):
        return f"<div>{state.get('value', '')}</div>"
    if name == "LabelModel":
        return f"<div>{html.escape(str(state.get('value', '')))}</div>"
    if name in ("IntProgressModel", "FloatProgressModel"):
        label = html.escape(str(state.get("description") or ""))
        return (
            f'<span>{label} <progress value="{state.get("value", 0)}" '
            f'max="{state.get("max", 1)}"></progress></span>'
        )
    if name == "ButtonModel":
        return f"<button disabled>{html.escape(str(state.get('description', '')))}</button>"
    children = [
        widget_html(child.removeprefix("IPY_MODEL_"), models)
        for child in state.get("children", [])
        if isinstance(child, str)
    ]
    if name in ROW_MODELS:
        return (
            '<div style="display:flex;gap:8px;align-items:center">' + "".join(children) + "</div>"
        )
    return "<div>" + "".join(children) + "</div>" if children else ""


def widget_text(fragment: str) -> str:
    """The text a widget's HTML shows, one line per block, tags dropped (a chart is named,
    not spelt out tick by tick)."""
    fragment = SVG.sub("</div>(a chart)</div>", fragment)
    blocks = re.split(r"</(?:div|tr|p|li|h\d)>|<br\s*/?>", fragment)
    lines = []
    for block in blocks:
        block = re.sub(r"</t[dh]>|<(?:button|progress)\b", lambda m: " " + m.group(0), block)
        text = html.unescape(TAG.sub("", block))
        text = " ".join(text.split())
        if text:
            lines.append(text)
    return "\n".join(lines)


def add_widget_fallbacks(nb: Any) -> int:
    """Give every widget output a text/html and text/plain form from the saved state;
    how many outputs got one."""
    models = (nb.metadata.get("widgets") or {}).get(STATE_MIME, {}).get("state", {})
    done = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_MIME)
            if not view:
                continue
            drawn = widget_html(view.get("model_id", ""), models)
            if not drawn:
                continue  # the widget was closed: keep what ipywidgets wrote
            out["data"]["text/html"] = drawn
            out["data"]["text/plain"] = widget_text(drawn) or out["data"].get("text/plain", "")
            done += 1
    return done


def leftover_paths(nb: Any) -> list[str]:
    """Machine paths still in the notebook's outputs or widget state."""
    found = []
    text = repr([cell.get("outputs", []) for cell in nb.cells]) + repr(nb.metadata.get("widgets"))
    for path, _ in machine_paths():
        if path and path in text:
            found.append(path)
    return found


# ---- running -------------------------------------------------------------------------
def made_an_environment(nb: Any) -> bool:
    """Whether a cell shows an environment being made or refreshed (its progress bar):
    dspex-jupyter changed between the setup and the cell, which a shipped notebook must
    not show."""
    return any(
        WIDGET_MIME in out.get("data", {})
        and str(out["data"].get("text/plain", "")).startswith("environment ")
        for cell in nb.cells
        for out in cell.get("outputs", [])
    )


def save(notebook: Path, timeout: float, setup: bool, attempts: int = 3) -> int:
    import nbformat

    names = run_tutorial.notebook_environments(notebook) if setup else []
    for attempt in range(1, attempts + 1):
        # Right before the run, so the notebook finds its environments current.
        if names and run_tutorial.setup_environments(names) != 0:
            return 1
        status = run_tutorial.run_notebook(notebook, notebook, timeout, "python3")
        nb = nbformat.read(notebook, as_version=4)
        if not made_an_environment(nb) or attempt == attempts:
            break
        run_tutorial.say("an environment was refreshed during the run (files changed): again")
    places = machine_paths()
    for cell in nb.cells:
        if "outputs" in cell:
            cell["outputs"] = nbformat.from_dict(scrub(cell["outputs"], places))
    if "widgets" in nb.metadata:
        nb.metadata["widgets"] = nbformat.from_dict(scrub(nb.metadata["widgets"], places))
    fallbacks = add_widget_fallbacks(nb)
    nbformat.write(nb, notebook)
    left = leftover_paths(nb)
    name = notebook.relative_to(REPO) if notebook.is_relative_to(REPO) else notebook
    run_tutorial.say(f"{name}: saved, {fallbacks} widget output(s) with a static fallback")
    if left:
        run_tutorial.say(f"{name}: machine paths still in the outputs: {', '.join(left)}")
        return 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: all tutorials")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one cell may run")
    parser.add_argument(
        "--no-setup", action="store_true", help="do not prepare the environments first"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DSPEX_HOME", str(run_tutorial.DEFAULT_HOME))
    notebooks = [p.resolve() for p in args.notebooks] or TUTORIALS
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        parser.error(f"no notebook at {', '.join(missing)}")
    failed = [p.name for p in notebooks if save(p, args.timeout, not args.no_setup) != 0]
    if failed:
        run_tutorial.say(f"FAILED: {', '.join(failed)}")
        return 1
    run_tutorial.say(f"all {len(notebooks)} notebook(s) saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
