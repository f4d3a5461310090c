"""A progress bar for creating or rebuilding an environment from a notebook cell.

``create_environment`` and ``rebuild_environment`` report each step as an ``EnvStep``
(runtime wheel, virtual environment, packages, kernelspec, lock file); this widget draws
them: a bar of the steps done, the current step's text (pip's count of collected packages
moves while it installs) and the outcome. Without it a cell would sit silent for the 20-60 s
pip takes. Colours are JupyterLab theme variables, so it reads in dark themes too.
"""

from __future__ import annotations

from html import escape

import ipywidgets as widgets

from ..core.envs import STEPS, EnvStep
from .html_render import ERROR, MUTED_TEXT, SUCCESS, TEXT

BAR_WIDTH = "260px"


def step_html(step: EnvStep | None) -> str:
    """The line beside the bar: the environment's name, then what is happening."""
    if step is None:
        return f'<span style="color:{MUTED_TEXT}">starting…</span>'
    colour = {"done": SUCCESS, "failed": ERROR}.get(step.step, TEXT)
    name = f"<b>{escape(step.env)}</b>"
    return f'<span style="color:{colour}">{name} · {escape(str(step))}</span>'


class EnvProgressBar(widgets.HBox):
    """Progress of one environment create or rebuild; call it with each ``EnvStep``."""

    def __init__(self) -> None:
        self.bar = widgets.IntProgress(
            value=0, min=0, max=len(STEPS), layout=widgets.Layout(width=BAR_WIDTH)
        )
        self.label = widgets.HTML(step_html(None))
        self.last: EnvStep | None = None
        super().__init__([self.bar, self.label])

    @classmethod
    def shown(cls) -> EnvProgressBar:
        """A new bar, displayed in the running cell."""
        from IPython.display import display

        bar = cls()
        display(bar)
        return bar

    def __call__(self, step: EnvStep) -> None:
        self.last = step
        self.bar.max = step.total
        if step.step == "done":
            self.bar.value, self.bar.bar_style = step.total, "success"
        elif step.step == "failed":
            self.bar.bar_style = "danger"
        else:
            self.bar.value = step.index - 1  # the steps before this one are done
        self.label.value = step_html(step)

    @property
    def text(self) -> str:
        """What the bar says, as plain text."""
        if self.last is None:
            return "starting…"
        return f"{self.last.env}: {self.last}"

    def __repr__(self) -> str:
        # The text/plain form of the widget (a saved notebook, a terminal frontend).
        return f"environment {self.text}"
