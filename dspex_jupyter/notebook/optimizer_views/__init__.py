"""What each optimizer's run shows beyond what every run shows: one small module each.

A view module provides ``progress_items(run_state) -> [(label, text), ...]`` (rows for
the run dashboard and the JupyterLab sidebar) and may provide ``chart_points(run_state)``
(``[{"number", "score", "eval", "best_score"}]`` for the score chart). ``run_state`` is
the plain dict ``run_state(run)`` makes from a run handle (keys in its docstring), so a
view is a pure function of JSON, easy to test and shared by both renderers.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

# Optimizer display name (runtime/runs.py's adapters) -> its view module.
VIEW_MODULES = {
    "MIPROv2": "dspex_jupyter.notebook.optimizer_views.mipro",
    "GEPA": "dspex_jupyter.notebook.optimizer_views.gepa",
    "BootstrapFewShotWithRandomSearch": "dspex_jupyter.notebook.optimizer_views.bootstrap_rs",
    "COPRO": "dspex_jupyter.notebook.optimizer_views.copro",
    "SIMBA": "dspex_jupyter.notebook.optimizer_views.simba",
}
GENERIC_VIEW = "dspex_jupyter.notebook.optimizer_views.generic"


def view_for(optimizer: str | None) -> ModuleType:
    """The view of ``optimizer``'s runs; the generic one for any other teleprompter."""
    module = VIEW_MODULES.get(optimizer or "")
    if module is not None:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return importlib.import_module(GENERIC_VIEW)


def run_state(run: Any) -> dict[str, Any]:
    """A run handle's state as views read it (always every key):

    ``optimizer`` (display name), ``status``, ``phase``/``step``/``total`` (the newest
    phase event), ``best_score``, ``usage``, ``budget``, ``progress`` (the fields of every
    "progress" event merged, newest last), ``progress_events`` (those events in order),
    ``trials`` (MIPROv2's trial events; [] for others), ``spec`` (optimizer and compile
    options as run.json records them)."""
    phase: dict[str, Any] = {}
    trials = []
    for event in list(getattr(run, "events", []) or []):
        kind = event.get("kind")
        if kind == "phase":
            phase = event
        elif kind == "trial":
            trials.append(event)
    metrics = getattr(run, "metrics", {}) or {}
    spec = getattr(run, "spec", None) or {}
    return {
        "optimizer": getattr(run, "optimizer", None) or "MIPROv2",
        "status": getattr(run, "status", "starting"),
        "phase": phase.get("phase"),
        "step": int(phase.get("step") or 0),
        "total": phase.get("total"),
        "best_score": metrics.get("best_score"),
        "usage": dict(metrics.get("usage") or {}),
        "budget": dict(metrics.get("budget") or {}),
        "progress": dict(metrics.get("progress") or {}),
        "progress_events": list(getattr(run, "progress_events", []) or []),
        "trials": trials,
        "spec": {"optimizer": spec.get("optimizer") or {}, "compile": spec.get("compile") or {}},
    }


def progress_items(run: Any) -> list[tuple[str, str]]:
    """The rows ``run``'s optimizer view makes of its state ([] if the view fails: a view
    must never break a dashboard or the sidebar)."""
    state = run_state(run)
    with contextlib.suppress(Exception):
        return [
            (str(label), str(text))
            for label, text in view_for(state["optimizer"]).progress_items(state)
        ]
    return []


def chart_points(run: Any) -> list[dict[str, Any]] | None:
    """The view's score chart points, or None when its view draws none."""
    state = run_state(run)
    view = view_for(state["optimizer"])
    draw = getattr(view, "chart_points", None)
    if draw is None:
        return None
    with contextlib.suppress(Exception):
        return list(draw(state))
    return None
