"""``%dspex env list``: one row per environment, as HTML in a notebook and text elsewhere.

Read from each environment's record (``dspex-env.json``): nothing is run, so listing is
instant however many environments there are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .html_render import html_table
from .runs_table import shorten

HEADERS = ("name", "Python", "dspex runtime", "packages", "asked for")


def env_row(env: Any) -> list[str]:
    """An environment's row: its Python, the dspex-jupyter version of its runtime, how
    many packages it holds (its lock) and those it was created with."""
    record = env.record
    asked = list(env.packages)
    requirements = (record.get("requirements") or {}).get("file")
    if requirements:
        asked.append(f"-r {Path(requirements).name}")
    return [
        env.name,
        env.python_version or "?",
        str(record.get("dspex_jupyter_version") or "?"),
        str(len(record.get("lock") or [])),
        shorten(" ".join(asked)) if asked else "-",
    ]


def broken_row(name: str, reason: str) -> list[str]:
    return [name, "not usable", "-", "-", reason]


class EnvsTable:
    """What ``%dspex env list`` displays: ``_repr_html_`` in a notebook, text elsewhere."""

    def __init__(self, rows: list[list[str]]) -> None:
        self.rows = rows

    def _repr_html_(self) -> str:
        return html_table(HEADERS, self.rows, css_class="dspex-envs")

    def __repr__(self) -> str:
        table = [list(HEADERS), *self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in table
        )


def envs_table(home: Path | None = None) -> EnvsTable:
    """Every environment under ``home`` (``$DSPEX_HOME``), usable ones then broken ones."""
    from ..core.envs import broken_environments, list_environments

    rows = [env_row(env) for env in list_environments(home)]
    rows += [broken_row(name, reason) for name, reason in broken_environments(home).items()]
    return EnvsTable(sorted(rows, key=lambda row: row[0]))
