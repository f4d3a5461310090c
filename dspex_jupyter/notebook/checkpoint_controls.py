"""Buttons for a run: checkpoint now, cancel, and resume from a chosen checkpoint.

A button is enabled only when its action can work (checkpoint and cancel while the run
runs; resume once it stopped, from a valid checkpoint), and a disabled one says why in its
tooltip. Cancel asks first: ipywidgets has no modal dialog, so the first click turns the
button into "Confirm cancel?" next to a "Keep running" button. Actions run on a thread,
since they wait for the kernel, and the outcome appears in the status line.
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
from .html_render import ERROR, TEXT, first_line, format_score

NO_CHECKPOINT = "(no checkpoint to resume from)"
# Resuming needs a stopped run, so the list is read once it stops (not at every trial).
WHILE_RUNNING = "(listed once the run stops)"


CANCEL_TIP = "stop within one trial, resumably (asks first)"
CONFIRM_TIP = "click again to stop the run; it stays resumable from its checkpoint"
TIPS = {
    "checkpoint": "write a checkpoint within one trial",
    "resume": "go on from the chosen checkpoint",
}


def checkpoint_label(row: dict[str, Any], trial_of: Callable[[int], int] | None = None) -> str:
    """A checkpoint as the dropdown shows it: "trial 8 · best 47.5 · 14:27:32" in the
    search, "proposed · 14:25:02" before it. A snapshot counts evaluations (full ones
    included); ``trial_of`` turns that into the trial the dashboard shows."""
    when = datetime.datetime.fromtimestamp(row["written_at"]).strftime("%H:%M:%S")
    if row.get("phase") != "search":
        return f"{row['phase']} · {when}"
    best = row.get("best_score")
    best_text = f"best {format_score(best)}" if isinstance(best, int | float) else "no score yet"
    trial = trial_of(int(row["trial"])) if trial_of is not None else row["trial"]
    return f"trial {trial} · {best_text} · {when}"


def snapshot_number(name: str) -> str:
    """ "ckpt-000011.json" -> "11" (the name itself when it is not numbered)."""
    digits = "".join(ch for ch in name if ch.isdigit())
    return str(int(digits)) if digits else name


def checkpoint_options(
    rows: list[dict[str, Any]], trial_of: Callable[[int], int] | None = None
) -> list[tuple[str, str]]:
    """(label, name) per checkpoint, newest first; labels that would read the same get
    their snapshot number, so every entry is distinct."""
    labels = [checkpoint_label(r, trial_of) for r in rows]
    options = [
        (f"{label} · snapshot {snapshot_number(r['name'])}" if labels.count(label) > 1 else label)
        for label, r in zip(labels, rows, strict=True)
    ]
    return list(reversed(list(zip(options, [r["name"] for r in rows], strict=True))))


class CheckpointControls(widgets.VBox):
    """Checkpoint, cancel and resume buttons for one ``OptimizationRun``."""

    def __init__(
        self,
        run: Any,
        *,
        on_resumed: Callable[[Any], None] | None = None,
        on_change: Callable[[], None] | None = None,
        announce_cancel: bool = True,
        trial_of: Callable[[int], int] | None = None,
    ) -> None:
        self.run = run
        # False where another widget (the run dashboard) reports the cancel: one line.
        self.announce_cancel = announce_cancel
        self.confirming_cancel = False
        self.trial_of = trial_of
        self._on_resumed = [on_resumed] if on_resumed else []
        self._on_change = on_change
        self._busy = threading.Lock()  # held while an action runs
        self._refreshing = threading.RLock()
        self._idle = threading.Event()
        self._idle.set()
        self._listed_for: tuple[str, str, int] | None = None
        self.checkpoint_button = widgets.Button(
            description="Checkpoint now", icon="save", tooltip=TIPS["checkpoint"]
        )
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", tooltip=CANCEL_TIP)
        self.keep_button = widgets.Button(
            description="Keep running",
            tooltip="do not cancel",
            layout=widgets.Layout(display="none"),
        )
        self.resume_button = widgets.Button(
            description="Resume", icon="play", tooltip=TIPS["resume"]
        )
        self.checkpoint_picker = widgets.Dropdown(
            options=[(WHILE_RUNNING, "")],
            value="",
            description="from",
            layout=widgets.Layout(width="420px"),
        )
        self.outcome = widgets.HTML(value="")
        self.checkpoint_button.on_click(lambda _: self._start("checkpoint", self._checkpoint))
        self.cancel_button.on_click(lambda _: self._cancel_clicked())
        self.keep_button.on_click(lambda _: self._set_confirming(False))
        self.resume_button.on_click(lambda _: self._start("resume", self._resume))
        self.checkpoint_picker.observe(lambda _: self.refresh(), names="value")
        buttons = widgets.HBox(
            [
                self.checkpoint_button,
                self.cancel_button,
                self.keep_button,
                self.checkpoint_picker,
                self.resume_button,
            ]
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
            if self.confirming_cancel and (busy or not running):
                self._set_confirming(False)  # nothing left to confirm
            chosen = self.checkpoint_picker.value
            ended = "was cancelled" if run.status == "cancelled" else run.status
            stopped = f"the run {ended}: nothing to"
            why = {
                "checkpoint": "another action is running" if busy else f"{stopped} checkpoint",
                "cancel": "another action is running" if busy else f"{stopped} cancel",
            }
            self.checkpoint_button.disabled = busy or not running
            self.cancel_button.disabled = busy or not running
            self.checkpoint_picker.disabled = busy or running
            if busy:
                why["resume"] = "another action is running"
            elif running:
                why["resume"] = "the run is still running: cancel it first"
            elif run.status == "completed":
                why["resume"] = "the run completed: nothing to resume"
            elif not chosen:
                why["resume"] = "no valid checkpoint to resume from"
            self.resume_button.disabled = "resume" in why
            self.checkpoint_button.tooltip = (
                why["checkpoint"] if self.checkpoint_button.disabled else TIPS["checkpoint"]
            )
            if self.cancel_button.disabled:
                self.cancel_button.tooltip = why["cancel"]
            elif not self.confirming_cancel:
                self.cancel_button.tooltip = CANCEL_TIP
            self.resume_button.tooltip = why.get("resume", TIPS["resume"])

    def _list_checkpoints(self) -> None:
        key = (self.run.run_id, self.run.status, id(self.run))
        if self._listed_for == key:
            return
        self._listed_for = key
        try:
            rows = [r for r in self.run.checkpoints() if r.get("ok") and r.get("phase") != "done"]
        except (OSError, CheckpointError):
            rows = []
        options = checkpoint_options(rows, self.trial_of)
        self.checkpoint_picker.options = options or [(NO_CHECKPOINT, "")]
        self.checkpoint_picker.value = options[0][1] if options else ""

    def relist(self) -> None:
        """Read the checkpoint list again (its labels depend on what ``trial_of`` knows)."""
        self._listed_for = None
        self.refresh()

    def follow(self, run: Any) -> None:
        """Control another run (the one a resume started)."""
        self.run = run
        self._listed_for = None
        self.checkpoint_picker.options = [(WHILE_RUNNING, "")]
        self.refresh()

    # ---- actions ----------------------------------------------------------------
    def _set_confirming(self, on: bool) -> None:
        """Show the cancel button as "Confirm cancel?" (with "Keep running") or as is."""
        self.confirming_cancel = on
        self.cancel_button.description = "Confirm cancel?" if on else "Cancel"
        self.cancel_button.button_style = "danger" if on else ""
        self.cancel_button.tooltip = CONFIRM_TIP if on else CANCEL_TIP
        self.keep_button.layout.display = "" if on else "none"

    def _cancel_clicked(self) -> None:
        if not self.confirming_cancel:
            self._set_confirming(True)
            return
        self._set_confirming(False)
        self._start("cancel", self._cancel)

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
        if not message:
            self.outcome.value = ""
            return
        colour = ERROR if message.startswith("error") else TEXT
        self.outcome.value = f'<span style="color:{colour}">{escape(message)}</span>'

    def _checkpoint(self) -> str:
        return actions.checkpoint_run(self.run)

    def _cancel(self) -> str:
        message = actions.cancel_run(self.run)
        if not self.announce_cancel and self.run.status == "cancelled":
            return ""  # said once, by the widget that announces it
        return message

    def _resume(self) -> str:
        snapshot = self.checkpoint_picker.value or None
        new_run, message = actions.resume_run(self.run, snapshot)
        self.follow(new_run)
        for callback in list(self._on_resumed):
            callback(new_run)
        return message
