"""The trial score chart as an SVG string: no plotting library, renders in any frontend.

Each evaluation is a marker (minibatch: a circle; full evaluation: a square), and the best
full-evaluation score so far is a step line. The x-axis counts trials as the dashboard's
header does ("trial 8/8 · 3 full evaluations"): MIPROv2's ``num_trials`` counts minibatch
trials, so minibatch trial k sits at k and a full evaluation made after trial k sits at k
too (the baseline's at 0); without minibatches (``minibatch=False``) the evaluations after
the baseline's are the trials. Points of other optimizers (all full evaluations, and no
``minibatch`` given) sit at their own numbers. The plot is drawn over a "score" axis with
round ticks and gridlines. Percent scores (DSPy's, 0-100) get the whole 0-100 axis, so two
charts compare at a glance and one point is not blown up to fill the plot. Colours are
JupyterLab theme variables (set through ``style``: SVG presentation attributes do not take
``var()``).
Elements carry class names (``trial minibatch``, ``trial full``, ``best-so-far``, ``grid``,
``y-tick``) so tests and stylesheets can find them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from .html_render import BORDER, BRAND, MUTED_TEXT, SUCCESS, TEXT, WARNING, format_score
from .run_progress import TrialPoint

MINIBATCH_COLOUR = BRAND
FULL_COLOUR = WARNING
BEST_COLOUR = SUCCESS
AXIS_COLOUR = MUTED_TEXT
TICKS = 5  # about this many intervals on an axis


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def nice_step(span: float, intervals: int = TICKS) -> float:
    """The round step (1, 2 or 5 times a power of ten) that cuts ``span`` into about
    ``intervals`` pieces."""
    raw = max(span, 1e-12) / intervals
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def score_axis(values: Sequence[float]) -> tuple[float, float, float]:
    """(low, high, step) of the score axis: 0-100 for percentages, 0-1 for fractions,
    else round bounds around the values (one value: a band of a few points around it)."""
    low, high = min(values), max(values)
    if low >= 0 and high <= 1:
        return 0.0, 1.0, 0.2
    if low >= 0 and high <= 100:
        return 0.0, 100.0, 20.0
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    step = nice_step(high - low)
    return math.floor(low / step) * step, math.ceil(high / step) * step, step


def _ticks(low: float, high: float, step: float) -> list[float]:
    count = round((high - low) / step)
    return [low + i * step for i in range(count + 1)]


def _tick_text(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def _style(prop: str, colour: str) -> str:
    return f'style="{prop}:{colour}"'


def trial_positions(trials: Sequence[TrialPoint], minibatch: bool | None = None) -> list[int]:
    """Each evaluation's place on the trial axis: how many trials (as ``num_trials``
    counts them) were done once it was made. ``minibatch``: whether the run evaluates
    minibatches (None: whether any evaluation is one)."""
    if minibatch is None:
        minibatch = any(t.eval != "full" for t in trials)
    positions: list[int] = []
    done = 0
    for trial in trials:
        if not minibatch:
            positions.append(done)  # the baseline's is 0, then trial 1, 2, ...
            done += 1
            continue
        if trial.eval != "full":
            done += 1
        positions.append(done)
    return positions


def _tip(trial: TrialPoint, position: int, by_trial: bool = True) -> str:
    score = format_score(trial.score)
    if not by_trial or trial.eval != "full":
        return f"trial {position} ({escape(trial.eval)}): {score}"
    if position == 0:
        return f"baseline (full evaluation): {score}"
    return f"full evaluation after trial {position}: {score}"


def score_chart_svg(
    trials: Sequence[TrialPoint],
    *,
    width: int = 560,
    height: int = 230,
    num_trials: int | None = None,
    minibatch: bool | None = None,
) -> str:
    """An SVG chart of every evaluation's score and the best score so far, over the trials;
    ``num_trials`` (the run's) makes the axis span the whole search from the start."""
    by_trial = minibatch is not None or any(t.eval != "full" for t in trials)
    left, right, top, bottom = 58, 12, 10, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dspex-score-chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        f'font-size="11">'
    )
    if not trials:
        return (
            f'{head}<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
            f"{_style('fill', MUTED_TEXT)}>no trials yet</text></svg>"
        )
    scores = [t.score for t in trials] + [t.best_score for t in trials if t.best_score is not None]
    low, high, step = score_axis(scores)
    positions = trial_positions(trials, minibatch) if by_trial else [t.number for t in trials]
    first = 0 if by_trial else positions[0]
    last = max(max(positions), num_trials or 0, first + 1)

    def x(number: float) -> float:
        return left + (number - first) / (last - first) * plot_w

    def y(score: float) -> float:
        return top + (high - score) / (high - low) * plot_h

    parts = [head]
    base_y = top + plot_h
    for value in _ticks(low, high, step):
        ty = _fmt(y(value))
        parts.append(
            f'<line class="grid" x1="{left}" y1="{ty}" x2="{left + plot_w}" y2="{ty}" '
            f"{_style('stroke', BORDER)}/>"
            f'<text class="y-tick" x="{left - 5}" y="{_fmt(y(value) + 4)}" text-anchor="end" '
            f"{_style('fill', TEXT)}>{_tick_text(value, step)}</text>"
        )
    axis = _style("stroke", AXIS_COLOUR)
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base_y}" {axis}/>')
    parts.append(f'<line x1="{left}" y1="{base_y}" x2="{left + plot_w}" y2="{base_y}" {axis}/>')
    middle_y = top + plot_h / 2
    parts.append(
        f'<text class="axis-title" x="14" y="{_fmt(middle_y)}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_fmt(middle_y)})" {_style("fill", TEXT)}>score</text>'
    )
    x_step = max(1, round(nice_step(last - first)))
    numbers = list(range(first, last + 1, x_step))
    for number in numbers:
        parts.append(
            f'<text class="x-tick" x="{_fmt(x(number))}" y="{base_y + 14}" '
            f'text-anchor="middle" {_style("fill", TEXT)}>{number}</text>'
        )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2}" y="{base_y + 27}" '
        f'text-anchor="middle" {_style("fill", TEXT)}>trial</text>'
    )

    # Best so far: a step line through the trials that carry it.
    steps: list[str] = []
    previous: float | None = None
    for trial, position in zip(trials, positions, strict=True):
        if trial.best_score is None:
            continue
        if previous is not None and trial.best_score != previous:
            steps.append(f"{_fmt(x(position))},{_fmt(y(previous))}")
        steps.append(f"{_fmt(x(position))},{_fmt(y(trial.best_score))}")
        previous = trial.best_score
    if steps:
        parts.append(
            f'<polyline class="best-so-far" fill="none" stroke-width="2" '
            f'points="{" ".join(steps)}" {_style("stroke", BEST_COLOUR)}/>'
        )

    for trial, position in zip(trials, positions, strict=True):
        cx, cy = x(position), y(trial.score)
        tip = f"<title>{_tip(trial, position, by_trial)}</title>"
        if trial.eval == "full":
            parts.append(
                f'<rect class="trial full" x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" '
                f'height="8" {_style("fill", FULL_COLOUR)}>{tip}</rect>'
            )
        else:
            parts.append(
                f'<circle class="trial minibatch" cx="{_fmt(cx)}" cy="{_fmt(cy)}" r="3" '
                f'fill-opacity="0.8" {_style("fill", MINIBATCH_COLOUR)}>{tip}</circle>'
            )

    legend_y = height - 6
    text = _style("fill", TEXT)
    parts.append(
        f'<g class="legend"><circle cx="{left + 6}" cy="{legend_y - 4}" r="3" '
        f"{_style('fill', MINIBATCH_COLOUR)}/>"
        f'<text x="{left + 14}" y="{legend_y}" {text}>minibatch</text>'
        f'<rect x="{left + 82}" y="{legend_y - 8}" width="8" height="8" '
        f"{_style('fill', FULL_COLOUR)}/>"
        f'<text x="{left + 94}" y="{legend_y}" {text}>full evaluation</text>'
        f'<line x1="{left + 190}" y1="{legend_y - 4}" x2="{left + 206}" y2="{legend_y - 4}" '
        f'stroke-width="2" {_style("stroke", BEST_COLOUR)}/>'
        f'<text x="{left + 212}" y="{legend_y}" {text}>best so far</text></g>'
    )
    parts.append("</svg>")
    return "".join(parts)
