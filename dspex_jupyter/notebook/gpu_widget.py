"""GPU memory per device and the share each pool kernel takes, refreshed while shown.

Without a GPU it says so and shows each kernel's RSS against its pool's ``max_memory``.
The refresh timer starts when the widget is displayed and stops when it is closed. It reads
the snapshot it shares with the sidebar and the pool dashboard (its own, if given managers
or an NVML module), so NVML is asked once however many of them are shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..core.gpu import kernel_memory_rows
from ..core.spec import format_bytes
from . import registry
from .html_render import html_table, usage_bar
from .snapshot import SHARED, snapshot
from .timers import PeriodicRefresh, RefreshedWhileShown

if TYPE_CHECKING:
    from ..core.manager import PoolManager

REFRESH_INTERVAL_S = 2.0


class GpuMemoryWidget(RefreshedWhileShown, widgets.VBox):
    """Used/total memory per GPU and per pool kernel (or kernel RSS when there is no GPU)."""

    def __init__(
        self,
        managers: Iterable[PoolManager] | None = None,
        *,
        interval: float = REFRESH_INTERVAL_S,
        nvml: Any = None,
    ) -> None:
        self._managers = list(managers) if managers is not None else None
        self._nvml = nvml
        self.body = widgets.HTML()
        self.state: dict[str, Any] = {}
        self.timer = PeriodicRefresh(self.refresh, interval, name="dspex-gpu-widget")
        super().__init__([self.body])
        self.refresh()

    def refresh(self) -> None:
        """Measure again and redraw."""
        if self._managers is None and self._nvml is None:
            taken = SHARED.get()
        else:
            taken = snapshot(self._managers, runs=[], nvml=self._nvml)
        self.state = taken["gpu"]
        if self.state["available"]:
            self.body.value = self._gpu_html(self.state)
        else:
            rows = kernel_memory_rows(taken["pools"])
            self.body.value = self._no_gpu_html(self.state["reason"], rows)

    @staticmethod
    def _gpu_html(state: dict[str, Any]) -> str:
        parts = []
        for device in state["devices"]:
            parts.append(
                f"<div><b>GPU {device['index']}</b> {escape(device['name'])} "
                f"{usage_bar(device['used'], device['total'], width=240)}</div>"
            )
            rows = [
                [
                    k["pool"],
                    k["kernel"],
                    k["pid"],
                    format_bytes(k["used"]),
                    f"{100 * k['used'] / device['total']:.1f}%" if device["total"] else "-",
                ]
                for k in device["kernels"]
            ]
            if rows:
                parts.append(
                    html_table(
                        ["pool", "kernel", "pid", "GPU memory", "share"],
                        rows,
                        css_class="dspex-gpu-kernels",
                    )
                )
            else:
                parts.append("<div><i>no pool kernel holds memory on this GPU</i></div>")
        if state.get("reason"):
            parts.append(f"<div><i>{escape(state['reason'])}</i></div>")
        return "".join(parts)

    @staticmethod
    def _no_gpu_html(reason: str, rows: list[dict[str, Any]]) -> str:
        head = f"<div><b>No GPU</b>: {escape(reason)}."
        if not rows:
            return head + " No pool is running: start one with %dspex start NAME.</div>"
        limited = any(r["max_memory"] for r in rows)
        head += " Kernel memory (RSS)" + (", against each pool's max_memory" if limited else "")
        table = [
            [
                r["pool"],
                r["kernel"],
                r["pid"],
                r["state"],
                usage_bar(
                    r["rss"],
                    r["max_memory"],
                    total_text=registry.memory_text(r["pool"], r["max_memory"]),
                ),
            ]
            for r in rows
        ]
        headers = ["pool", "kernel", "pid", "state", "RSS / max_memory" if limited else "RSS"]
        return f"{head}:</div>" + html_table(headers, table, css_class="dspex-kernel-memory")
