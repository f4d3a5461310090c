"""Pools, their kernels and sessions, with restart-kernel and release-session buttons.

Rendered from the snapshot it shares with the sidebar and the GPU widget (``snapshot()`` of
its own managers, if given some) and refreshed every two seconds while displayed. Restarting
a kernel kills its process and lets the pool replace it (see ``actions``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..core.errors import DspexError
from . import actions, registry
from .html_render import ERROR, TEXT, first_line, format_duration, html_table, usage_bar
from .snapshot import SHARED, snapshot
from .timers import PeriodicRefresh, RefreshedWhileShown

if TYPE_CHECKING:
    from ..core.manager import PoolManager

REFRESH_INTERVAL_S = 2.0


def pools_html(state: dict[str, Any]) -> str:
    """The pools of a snapshot as HTML tables."""
    if not state["pools"]:
        return "<i>no pool is running; start one with %dspex start NAME</i>"
    parts = []
    for pool in state["pools"]:
        trouble = f" · last error: {escape(pool['last_error'])}" if pool["last_error"] else ""
        limit = registry.memory_text(pool["name"], pool["max_memory"])
        memory = "no memory limit" if pool["max_memory"] is None else f"memory limit {limit}"
        parts.append(
            f"<div><b>{escape(pool['name'])}</b> · {escape(pool['source'])} · "
            f"{len(pool['kernels'])}/{pool['size']} kernels · "
            f"{len(pool['sessions'])} sessions · {pool['deaths']} deaths · "
            f"{escape(memory)}{trouble}</div>"
        )
        rows = [
            [
                k["id"],
                k["pid"],
                k["state"],
                k["session"],
                usage_bar(k["rss"], pool["max_memory"], total_text=limit),
                format_duration(k["uptime"]),
                k["calls_served"],
            ]
            for k in pool["kernels"]
        ]
        parts.append(
            html_table(
                ["kernel", "pid", "state", "session", "RSS", "uptime", "calls"],
                rows,
                css_class="dspex-pool-kernels",
            )
        )
    return "".join(parts)


class PoolDashboard(RefreshedWhileShown, widgets.VBox):
    """A live table of every running pool, with kernel and session actions."""

    def __init__(
        self, managers: Iterable[PoolManager] | None = None, *, interval: float = REFRESH_INTERVAL_S
    ) -> None:
        self._managers = list(managers) if managers is not None else None
        self.state: dict[str, Any] = {}
        self.table = widgets.HTML()
        self.kernel_picker = widgets.Dropdown(description="kernel", options=[])
        self.restart_button = widgets.Button(
            description="Restart kernel",
            icon="refresh",
            tooltip="kill it; the pool starts a new one",
        )
        self.session_picker = widgets.Dropdown(description="session", options=[])
        self.release_button = widgets.Button(description="Release session", icon="unlock")
        self.outcome = widgets.HTML()
        self._idle = threading.Event()
        self._idle.set()
        self._refreshing = threading.Lock()
        self.restart_button.on_click(lambda _: self._start(self._restart))
        self.release_button.on_click(lambda _: self._start(self._release))
        self.timer = PeriodicRefresh(self.refresh, interval, name="dspex-pool-dashboard")
        super().__init__(
            [
                self.table,
                widgets.HBox([self.kernel_picker, self.restart_button]),
                widgets.HBox([self.session_picker, self.release_button]),
                self.outcome,
            ]
        )
        self.refresh()

    def refresh(self, *, fresh: bool = False) -> None:
        """Read the pools again and redraw; ``fresh``: from a snapshot taken now, not
        the shared one of the last half second (after an action)."""
        with self._refreshing:
            if self._managers is None:
                state = SHARED.get(0.0 if fresh else None)
            else:
                state = snapshot(self._managers, runs=[], gpu=False)
            self._redraw(state)

    def _redraw(self, state: dict[str, Any]) -> None:
        self.state = state
        self.table.value = pools_html(self.state)
        kernels = [
            (k["id"], (p["name"], k["id"])) for p in self.state["pools"] for k in p["kernels"]
        ]
        sessions = [
            (f"{s} ({p['name']})", (p["name"], s))
            for p in self.state["pools"]
            for s in p["sessions"]
        ]
        self._set_options(self.kernel_picker, kernels)
        self._set_options(self.session_picker, sessions)
        busy = not self._idle.is_set()
        self.restart_button.disabled = busy or self.kernel_picker.value is None
        self.release_button.disabled = busy or self.session_picker.value is None

    @staticmethod
    def _set_options(picker: widgets.Dropdown, options: list[tuple[str, Any]]) -> None:
        if list(picker.options) == options:
            return
        chosen = picker.value
        picker.options = options
        values = [value for _, value in options]
        picker.value = chosen if chosen in values else (values[0] if values else None)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def _start(self, action: Callable[[], str]) -> None:
        if not self._idle.is_set():
            return
        self._idle.clear()
        self.restart_button.disabled = self.release_button.disabled = True
        threading.Thread(
            target=self._perform, args=(action,), daemon=True, name="dspex-pool-action"
        ).start()

    def _perform(self, action: Callable[[], str]) -> None:
        try:
            message = action()
        except (DspexError, ValueError, TypeError) as exc:
            message = f"error: {first_line(str(exc))}"
        except Exception as exc:
            message = f"error: {type(exc).__name__}: {first_line(str(exc))}"
        colour = ERROR if message.startswith("error") else TEXT
        self.outcome.value = f'<span style="color:{colour}">{escape(message)}</span>'
        self._idle.set()
        with contextlib.suppress(Exception):
            self.refresh(fresh=True)

    def _restart(self) -> str:
        if self.kernel_picker.value is None:
            raise DspexError("no kernel chosen")
        pool, kernel = self.kernel_picker.value
        return actions.restart_kernel(pool, kernel)

    def _release(self) -> str:
        if self.session_picker.value is None:
            raise DspexError("no session chosen")
        pool, session = self.session_picker.value
        return actions.release_session(pool, session)
