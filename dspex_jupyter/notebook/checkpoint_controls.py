"""Buttons for a run: checkpoint now, cancel, and resume from a chosen checkpoint.

A button is enabled only when its action can work (checkpoint and cancel while the run
runs; resume once it stopped, from a valid checkpoint). Actions run on a thread, since
they wait for the kernel, and the outcome appears in the status line.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from html import escape
from typing import Any

import ipywidgets as widgets

from ..checkpoint import CheckpointError
from ..core.errors import DspexError
from . import actions
from .html_render import first_line

NO_CHECKPOINT = "(no checkpoint to resume from)"
# Resuming needs a stopped run, so the list is read once it stops (not at every trial).
WHILE_RUNNING = "(listed once the run stops)"


def checkpoint_label(row: dict[str, Any]) -> str:
    """A checkpoint as the dropdown shows it: time, phase, trial, best score."""
    when = datetime.datetime.fromtimestamp(row["written_at"]).strftime("%H:%M:%S")
    best = row.get("best_score")
    best_text = f"best {best:.4g}" if isinstance(best, int | float) else "no score yet"
    return f"{when} · {row['phase']} · trial {row['trial']} · {best_text} ({row['name']})"


class CheckpointControls(widgets.VBox):
    """Checkpoint, cancel and resume buttons for one ``OptimizationRun``."""

    def __init__(
        self,
        run: Any,
        *,
        on_resumed: Callable[[Any], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.run = run
        self._on_resumed = [on_resumed] if on_resumed else []
        self._on_change = on_change
        self._busy = threading.Lock()  # held while an action runs
        self._refreshing = threading.RLock()
        self._idle = threading.Event()
        self._idle.set()
        self._listed_for: tuple[str, str, int] | None = None
        self.checkpoint_button = widgets.Button(
            description="Checkpoint now", icon="save", tooltip="write a checkpoint within one trial"
        )
        self.cancel_button = widgets.Button(
            description="Cancel", icon="stop", tooltip="stop within one trial, resumably"
        )
        self.resume_button = widgets.Button(
            description="Resume", icon="play", tooltip="go on from the chosen checkpoint"
        )
        self.checkpoint_picker = widgets.Dropdown(
            options=[(WHILE_RUNNING, "")],
            value="",
            description="from",
            layout=widgets.Layout(width="420px"),
        )
        self.outcome = widgets.HTML(value="")
        self.checkpoint_button.on_click(lambda _: self._start("checkpoint", self._checkpoint))
        self.cancel_button.on_click(lambda _: self._start("cancel", self._cancel))
        self.resume_button.on_click(lambda _: self._start("resume", self._resume))
        self.checkpoint_picker.observe(lambda _: self.refresh(), names="value")
        buttons = widgets.HBox(
            [self.checkpoint_button, self.cancel_button, self.checkpoint_picker, self.resume_button]
        )
        super().__init__([buttons, self.outcome])
        self.refresh()

    # ---- state ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no action is running (tests; returns False on timeout)."""
        return self._idle.wait(timeout)

    def on_resumed(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(new_run)`` when the resume button started a new run."""
        self._on_resumed.append(callback)

    def refresh(self) -> None:
        """Enable the buttons whose action is possible now; list checkpoints once stopped."""
        with self._refreshing:
            run, busy = self.run, self.busy
            running = not run.done
            if not running:
                self._list_checkpoints()
            chosen = self.checkpoint_picker.value
            self.checkpoint_button.disabled = busy or not running
            self.cancel_button.disabled = busy or not running
            self.checkpoint_picker.disabled = busy or running
            self.resume_button.disabled = busy or running or run.status == "completed" or not chosen

    def _list_checkpoints(self) -> None:
        key = (self.run.run_id, self.run.status, id(self.run))
        if self._listed_for == key:
            return
        self._listed_for = key
        try:
            rows = [r for r in self.run.checkpoints() if r.get("ok") and r.get("phase") != "done"]
        except (OSError, CheckpointError):
            rows = []
        options = [(checkpoint_label(r), r["name"]) for r in reversed(rows)]
        self.checkpoint_picker.options = options or [(NO_CHECKPOINT, "")]
        self.checkpoint_picker.value = options[0][1] if options else ""

    def follow(self, run: Any) -> None:
        """Control another run (the one a resume started)."""
        self.run = run
        self._listed_for = None
        self.checkpoint_picker.options = [(WHILE_RUNNING, "")]
        self.refresh()

    # ---- actions ----------------------------------------------------------------
    def _start(self, name: str, action: Callable[[], str]) -> None:
        if not self._busy.acquire(blocking=False):
            return
        self._idle.clear()
        self._say(f"{name}: waiting for the kernel…")
        self.refresh()
        threading.Thread(
            target=self._perform, args=(action,), name=f"dspex-{name}", daemon=True
        ).start()

    def _perform(self, action: Callable[[], str]) -> None:
        try:
            message = action()
        except (DspexError, CheckpointError, TimeoutError, ValueError, TypeError) as exc:
            message = f"error: {first_line(str(exc))}"
        except Exception as exc:  # shown, not raised: this runs on a widget thread
            message = f"error: {type(exc).__name__}: {first_line(str(exc))}"
        finally:
            self._busy.release()
        try:
            self._say(message)
            self.refresh()
            if self._on_change is not None:
                self._on_change()
        finally:
            self._idle.set()

    def _say(self, message: str) -> None:
        colour = "#c0392b" if message.startswith("error") else "#333"
        self.outcome.value = f'<span style="color:{colour}">{escape(message)}</span>'

    def _checkpoint(self) -> str:
        return actions.checkpoint_run(self.run)

    def _cancel(self) -> str:
        return actions.cancel_run(self.run)

    def _resume(self) -> str:
        snapshot = self.checkpoint_picker.value or None
        new_run, message = actions.resume_run(self.run, snapshot)
        self.follow(new_run)
        for callback in list(self._on_resumed):
            callback(new_run)
        return message
