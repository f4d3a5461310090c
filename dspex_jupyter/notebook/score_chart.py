"""The trial score chart as an SVG string: no plotting library, renders in any frontend.

Each trial is a marker (minibatch: a blue circle; full evaluation: an orange square), and
the best full-evaluation score so far is a step line. Elements carry class names
(``trial minibatch``, ``trial full``, ``best-so-far``) so tests and stylesheets can find them.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from .run_progress import TrialPoint

MINIBATCH_COLOUR = "#4c78a8"
FULL_COLOUR = "#f58518"
BEST_COLOUR = "#54a24b"


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def score_chart_svg(trials: Sequence[TrialPoint], *, width: int = 560, height: int = 220) -> str:
    """An SVG chart of every trial's score and the best score so far."""
    left, right, top, bottom = 44, 12, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dspex-score-chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        f'font-size="11">'
    )
    if not trials:
        return (
            f'{head}<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
            f'fill="#888">no trials yet</text></svg>'
        )
    scores = [t.score for t in trials] + [t.best_score for t in trials if t.best_score is not None]
    low, high = min(scores), max(scores)
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    first, last = trials[0].number, max(trials[-1].number, trials[0].number + 1)

    def x(number: float) -> float:
        return left + (number - first) / (last - first) * plot_w

    def y(score: float) -> float:
        return top + (high - score) / (high - low) * plot_h

    parts = [head]
    base_y = top + plot_h
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base_y}" stroke="#999"/>')
    parts.append(
        f'<line x1="{left}" y1="{base_y}" x2="{left + plot_w}" y2="{base_y}" stroke="#999"/>'
    )
    for value in (low, high):
        parts.append(
            f'<text x="{left - 4}" y="{_fmt(y(value) + 4)}" text-anchor="end" '
            f'fill="#555">{value:.3g}</text>'
        )
    for number in (first, trials[-1].number):
        parts.append(
            f'<text x="{_fmt(x(number))}" y="{base_y + 14}" text-anchor="middle" '
            f'fill="#555">{number}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{base_y + 14}" text-anchor="middle" '
        f'fill="#555">trial</text>'
    )

    # Best so far: a step line through the trials that carry it.
    steps: list[str] = []
    previous: float | None = None
    for trial in trials:
        if trial.best_score is None:
            continue
        if previous is not None and trial.best_score != previous:
            steps.append(f"{_fmt(x(trial.number))},{_fmt(y(previous))}")
        steps.append(f"{_fmt(x(trial.number))},{_fmt(y(trial.best_score))}")
        previous = trial.best_score
    if steps:
        parts.append(
            f'<polyline class="best-so-far" fill="none" stroke="{BEST_COLOUR}" '
            f'stroke-width="2" points="{" ".join(steps)}"/>'
        )

    for trial in trials:
        cx, cy = _fmt(x(trial.number)), _fmt(y(trial.score))
        tip = f"<title>trial {trial.number} ({escape(trial.eval)}): {trial.score:.4g}</title>"
        if trial.eval == "full":
            parts.append(
                f'<rect class="trial full" x="{float(cx) - 4:.1f}" y="{float(cy) - 4:.1f}" '
                f'width="8" height="8" fill="{FULL_COLOUR}">{tip}</rect>'
            )
        else:
            parts.append(
                f'<circle class="trial minibatch" cx="{cx}" cy="{cy}" r="3" '
                f'fill="{MINIBATCH_COLOUR}" fill-opacity="0.8">{tip}</circle>'
            )

    legend_y = height - 8
    parts.append(
        f'<circle cx="{left + 6}" cy="{legend_y - 4}" r="3" fill="{MINIBATCH_COLOUR}"/>'
        f'<text x="{left + 14}" y="{legend_y}" fill="#333">minibatch</text>'
        f'<rect x="{left + 82}" y="{legend_y - 8}" width="8" height="8" fill="{FULL_COLOUR}"/>'
        f'<text x="{left + 94}" y="{legend_y}" fill="#333">full evaluation</text>'
        f'<line x1="{left + 190}" y1="{legend_y - 4}" x2="{left + 206}" y2="{legend_y - 4}" '
        f'stroke="{BEST_COLOUR}" stroke-width="2"/>'
        f'<text x="{left + 212}" y="{legend_y}" fill="#333">best so far</text>'
    )
    parts.append("</svg>")
    return "".join(parts)
