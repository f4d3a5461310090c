"""Small HTML pieces the widgets share: tables, durations, bars. Everything is escaped.

Colours are JupyterLab's theme variables (with a light-theme fallback for other
frontends), so the widgets read as well in a dark theme as in the light one.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from ..core.spec import format_bytes


def theme(name: str, fallback: str) -> str:
    """A JupyterLab theme colour: ``var(--jp-NAME, FALLBACK)``."""
    return f"var(--jp-{name}, {fallback})"


TEXT = theme("ui-font-color1", "#212121")
MUTED_TEXT = theme("ui-font-color2", "#616161")
BORDER = theme("border-color2", "#e0e0e0")
TRACK = theme("layout-color2", "#eeeeee")
BRAND = theme("brand-color1", "#1976d2")
SUCCESS = theme("success-color1", "#388e3c")
WARNING = theme("warn-color1", "#f57c00")
ERROR = theme("error-color1", "#d32f2f")

TABLE_STYLE = f"border-collapse:collapse;font-size:12px;margin:2px 0;color:{TEXT}"
CELL_STYLE = f"padding:2px 8px;border-bottom:1px solid {BORDER};text-align:left;vertical-align:top"


def html_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, css_class: str = "dspex-table"
) -> str:
    """An HTML table; cells are escaped unless they are ``Raw``."""
    head = "".join(f'<th style="{CELL_STYLE}">{escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td style="{CELL_STYLE}">{cell_html(c)}</td>' for c in row) + "</tr>"
        for row in rows
    )
    return f'<table class="{css_class}" style="{TABLE_STYLE}"><tr>{head}</tr>{body}</table>'


class Raw(str):
    """HTML that is already safe (built by this module)."""


def cell_html(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_score(score: float | None) -> str:
    """A score as DSPy prints it: 87.5, 47.92, 0.875 (not 87.500)."""
    if score is None:
        return "-"
    text = f"{score:.{2 if abs(score) >= 1 else 3}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def usage_bar(
    used: int,
    total: int | None,
    *,
    width: int = 160,
    colour: str = BRAND,
    total_text: str | None = None,
) -> Raw:
    """A horizontal bar of ``used`` out of ``total`` bytes, with its numbers;
    ``total_text``: the total as the user gave it (a pool's "512MB" limit)."""
    if not total:
        return Raw(escape(format_bytes(used)))
    share = max(0.0, min(1.0, used / total))
    fill = ERROR if share >= 0.9 else colour
    return Raw(
        f'<span style="display:inline-block;width:{width}px;height:9px;background:{TRACK};'
        f'vertical-align:middle"><span style="display:block;width:{share * 100:.1f}%;height:9px;'
        f'background:{fill}"></span></span> {escape(format_bytes(used))} / '
        f"{escape(total_text or format_bytes(total))}"
    )


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""
