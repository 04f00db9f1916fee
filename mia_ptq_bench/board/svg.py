"""Inline SVG plots generated at build time: no JavaScript, no CDN, readable from file://.

Every string that reaches the markup goes through ``escape``; the result is marked safe
only once it is whole.

Each plot is a ``<figure>`` body: the SVG (marks, axes, no per-point labels, so labels never
collide or run off the edge), an HTML legend with one entry per plotted method (HTML wraps on a
phone, SVG text would not), and a text listing of every plotted value that the SVG names as its
description (screen readers, and readers who cannot hover a point).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from markupsafe import Markup, escape

# A small viewBox keeps text readable when a phone scales the plot down to ~350 px (13 units -> ~10 px).
WIDTH, HEIGHT = 440, 320
LEFT, RIGHT, TOP, BOTTOM = 72, 24, 14, 52  # RIGHT holds half of the last x tick ('100%')
FONT = 13  # px in viewBox units; style.css sets the same size on svg.plot

# Plans of one method on an entry page share the method's colour and differ by dash (colour stays the method's).
DASHES = ("", "8 4", "2 3", "10 3 2 3", "4 4")


@dataclass(frozen=True)
class Point:
    label: str
    colour: str
    x: float
    x_low: float
    x_high: float
    y: float
    y_low: float
    y_high: float
    reference: bool
    pareto: bool
    self_reported: bool = False  # its numbers are the document's own, not recomputed: drawn hollow, off the axes' range


@dataclass(frozen=True)
class Curve:
    label: str
    colour: str
    fpr: list[float]
    tpr: list[float]
    reference: bool
    dash: str = ""


def percent(value: float) -> str:
    """A fraction as a short percentage: 0.001 -> '0.1%', 1e-5 -> '0.001%'."""
    return f"{100 * value:.6g}%"


class LogAxis:
    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        self.low, self.high, self.start, self.end = math.log10(low), math.log10(high), start, end
        self.floor = low

    def __call__(self, value: float) -> float:
        v = math.log10(max(value, self.floor))
        return self.start + (v - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self) -> list[tuple[float, str]]:
        decades = range(math.ceil(self.low - 1e-9), math.floor(self.high + 1e-9) + 1)
        # Two decades or fewer leave too few ticks to read a value off: add 2x and 5x between them.
        steps = (1, 2, 5) if len(decades) <= 3 else (1,)
        values = [m * 10.0**e for e in decades for m in steps if m * 10.0**e <= 10**self.high * (1 + 1e-9)]
        return [(v, percent(v)) for v in values]


def nice_step(span: float, count: int = 5) -> float:
    """The 1, 2 or 5 times a power of ten that cuts ``span`` into about ``count`` pieces."""
    raw = span / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


class LinearAxis:
    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        self.low, self.high, self.start, self.end = low, high, start, end

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self, count: int = 5) -> list[tuple[float, str]]:
        """Round values inside the axis (never its arbitrary ends), as many decimals as the step needs."""
        step = nice_step(self.high - self.low, count)
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        first = math.ceil(self.low / step - 1e-9)
        values = [i * step for i in range(first, math.floor(self.high / step + 1e-9) + 1)]
        return [(v, f"{v:.{decimals}f}") for v in values]


def plot_id(key: str) -> str:
    """An HTML id from a board or group name (dots and dashes kept, anything else replaced)."""
    return "plot-" + re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _frame(x_axis, y_axis, x_label: str, y_label: str, title: str, key: str) -> list[str]:
    ident = plot_id(key)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" class="plot" '
             f'id="{ident}" aria-labelledby="{ident}-title" aria-describedby="{ident}-values">',
             f'<title id="{ident}-title">{escape(title)}</title>',
             f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" class="frame"/>']
    for value, text in x_axis.ticks():
        x = x_axis(value)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" class="grid"/>')
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + FONT + 10}" class="tick" text-anchor="middle">'
                     f'{escape(text)}</text>')
    for value, text in y_axis.ticks():
        y = y_axis(value)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 5}" y="{y + FONT / 3:.1f}" class="tick" text-anchor="end">{escape(text)}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" class="label" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text transform="translate({FONT + 2} {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" class="label" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    return parts


def _swatch(colour: str, marker: bool, dash: str = "") -> str:
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    mark = f'<circle cx="11" cy="7" r="4.5" fill="{colour}"/>' if marker else ""
    return (f'<svg class="swatch" viewBox="0 0 22 14" aria-hidden="true"><line x1="0" y1="7" x2="22" y2="7" '
            f'stroke="{colour}" stroke-width="2.5"{dashed}/>{mark}</svg>')


def _legend(items: list[tuple[str, str, bool, str]]) -> str:
    """One entry per plotted method: (label, colour, has a point marker, dash)."""
    entries = "".join(f'<li data-entry="{escape(label)}">{_swatch(colour, marker, dash)}{escape(label)}</li>'
                      for label, colour, marker, dash in items)
    return f'<ul class="legend">{entries}</ul>'


def _values(key: str, lines: list[str]) -> str:
    """The plotted values as text, which the SVG names as its description (aria-describedby)."""
    items = "".join(f"<li>{escape(line)}</li>" for line in lines)
    return (f'<details class="plot-values"><summary>Plotted values</summary>'
            f'<ul id="{plot_id(key)}-values">{items}</ul></details>')


def privacy_utility(points: list[Point], title: str, floor: float, key: str) -> Markup:
    """TPR@0.1%FPR (%, log) against test accuracy (%), 95% error bars both ways, the Pareto frontier drawn."""
    # The axes span the checked points only: a self-reported one cannot stretch them (its numbers, taken on
    # trust, could otherwise squeeze every other point together); it is drawn clamped to their range.
    checked = [p for p in points if not p.self_reported] or points
    xs = [v for p in checked for v in (p.x_low, p.x_high, p.x) if math.isfinite(v)] or [0.0, 100.0]
    span = max(xs) - min(xs)
    pad = 0.08 * span + 0.05
    x_range = (min(xs) - pad, max(xs) + pad)
    x_axis = LinearAxis(*x_range, LEFT, WIDTH - RIGHT)
    top = max([p.y_high for p in checked if math.isfinite(p.y_high)] + [floor * 10])
    y_range = (floor, min(1.0, 10 ** math.ceil(math.log10(top))))
    y_axis = LogAxis(*y_range, HEIGHT - BOTTOM, TOP)

    def x_at(value: float) -> float:
        return x_axis(min(max(value, x_range[0]), x_range[1]))

    def y_at(value: float) -> float:
        return y_axis(min(max(value, y_range[0]), y_range[1]))

    parts = _frame(x_axis, y_axis, "test accuracy (%)", "TPR at 0.1% FPR (log; lower leaks less)", title, key)
    frontier = sorted((p for p in points if p.pareto), key=lambda p: p.x)
    if len(frontier) > 1:
        path = " ".join(f"{x_axis(p.x):.1f},{y_axis(p.y):.1f}" for p in frontier)
        parts.append(f'<polyline points="{path}" class="frontier"/>')
    for p in points:
        cx, cy = x_at(p.x), y_at(p.y)
        parts.append(f'<line x1="{x_at(p.x_low):.1f}" y1="{cy:.1f}" x2="{x_at(p.x_high):.1f}" y2="{cy:.1f}" '
                     f'stroke="{p.colour}" class="errorbar"/>')
        parts.append(f'<line x1="{cx:.1f}" y1="{y_at(p.y_low):.1f}" x2="{cx:.1f}" y2="{y_at(p.y_high):.1f}" '
                     f'stroke="{p.colour}" class="errorbar"/>')
        shape = "point self-reported" if p.self_reported else "point pareto" if p.pareto else "point"
        # The stylesheet strokes points white: a hollow point carries its colour in an inline style, which wins.
        fill = f'fill="#fff" style="stroke:{p.colour}"' if p.self_reported else f'fill="{p.colour}"'
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" {fill} class="{shape}" '
                     f'data-entry="{escape(p.label)}"><title>{escape(_point_text(p))}</title></circle>')
    parts.append("</svg>")
    legend = _legend([(p.label + (" (self-reported)" if p.self_reported else ""), p.colour, True, "") for p in points])
    return Markup("".join(parts) + legend + _values(key, [_point_text(p) for p in points]))


def _point_text(p: Point) -> str:
    return (f"{p.label}: test accuracy {p.x:.2f}% [{p.x_low:.2f}, {p.x_high:.2f}], TPR@0.1%FPR "
            f"{100 * p.y:.3f}% [{100 * p.y_low:.3f}, {100 * p.y_high:.3f}]" + (", on the frontier" if p.pareto else "")
            + (", self-reported (not recomputed; drawn hollow, within the axes of the checked points)"
               if p.self_reported else ""))


def roc_floor(negatives_per_target: float) -> float:
    """The decade at or below 1/negatives: smaller false-positive rates are not resolved by the data."""
    if not negatives_per_target or not math.isfinite(negatives_per_target) or negatives_per_target <= 1:
        return 1e-3
    return 10.0 ** math.floor(math.log10(1.0 / negatives_per_target) + 1e-9)


def roc_curves(curves: list[Curve], title: str, floor: float, key: str) -> Markup:
    """Mean ROC per curve on log-log axes from ``floor`` (what the negatives resolve) to 1, the chance diagonal."""
    x_axis = LogAxis(floor, 1.0, LEFT, WIDTH - RIGHT)
    y_axis = LogAxis(floor, 1.0, HEIGHT - BOTTOM, TOP)
    parts = _frame(x_axis, y_axis, "false-positive rate (log)", "true-positive rate (log)", title, key)
    parts.append(f'<line x1="{x_axis(floor):.1f}" y1="{y_axis(floor):.1f}" x2="{x_axis(1):.1f}" y2="{y_axis(1):.1f}" '
                 f'class="chance"/>')
    lines = []
    for c in curves:
        shown = [(f, t) for f, t in zip(c.fpr, c.tpr) if f >= floor * (1 - 1e-9)]
        path = " ".join(f"{x_axis(f):.1f},{y_axis(t):.1f}" for f, t in shown)
        dashed = f' stroke-dasharray="{c.dash}"' if c.dash else ""
        parts.append(f'<polyline points="{path}" stroke="{c.colour}"{dashed} class="roc" data-entry="{escape(c.label)}">'
                     f"<title>{escape(c.label)}</title></polyline>")
        lines.append(f"{c.label}: " + ", ".join(f"TPR {percent(_tpr_at(c, f))} at FPR {percent(f)}"
                                                 for f in _read_at(floor)))
    parts.append("</svg>")
    legend = _legend([(c.label, c.colour, False, c.dash) for c in curves])
    return Markup("".join(parts) + legend + _values(key, lines))


def _read_at(floor: float) -> list[float]:
    """FPRs at which the text description reads each curve: every decade from the floor to 10%."""
    return [10.0**e for e in range(round(math.log10(floor)), 0)]


def _tpr_at(curve: Curve, fpr: float) -> float:
    """The curve's TPR at the last grid point not above ``fpr`` (the grid is sorted)."""
    below = [t for f, t in zip(curve.fpr, curve.tpr) if f <= fpr * (1 + 1e-9)]
    return below[-1] if below else 0.0
