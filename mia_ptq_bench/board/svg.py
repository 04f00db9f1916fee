"""Inline SVG plots generated at build time: no JavaScript, no CDN, readable from file://.

Every string that reaches the markup goes through ``escape``; the result is marked safe
only once it is whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 48
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
REFERENCE_COLOUR = "#7f7f7f"


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    x_low: float
    x_high: float
    y: float
    y_low: float
    y_high: float
    reference: bool
    pareto: bool


class LogAxis:
    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        self.low, self.high, self.start, self.end = math.log10(low), math.log10(high), start, end
        self.floor = low

    def __call__(self, value: float) -> float:
        v = math.log10(max(value, self.floor))
        return self.start + (v - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self) -> list[tuple[float, str]]:
        return [(10.0**e, f"1e{e}" if e < -2 else f"{10.0**e:g}") for e in range(math.ceil(self.low), math.floor(self.high) + 1)]


class LinearAxis:
    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        self.low, self.high, self.start, self.end = low, high, start, end

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self, count: int = 6) -> list[tuple[float, str]]:
        step = (self.high - self.low) / (count - 1)
        return [(self.low + i * step, f"{self.low + i * step:.1f}") for i in range(count)]


def _frame(x_axis, y_axis, x_label: str, y_label: str, title: str) -> list[str]:
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'class="plot" aria-label="{escape(title)}">', f"<title>{escape(title)}</title>",
             f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" class="frame"/>']
    for value, text in x_axis.ticks():
        x = x_axis(value)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" class="grid"/>')
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" class="tick" text-anchor="middle">{escape(text)}</text>')
    for value, text in y_axis.ticks():
        y = y_axis(value)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{escape(text)}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 10}" class="label" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" class="label" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    return parts


def privacy_utility(points: list[Point], title: str, floor: float) -> Markup:
    """TPR@0.1%FPR (log) against test accuracy (%), 95% error bars both ways, the Pareto frontier drawn."""
    xs = [v for p in points for v in (p.x_low, p.x_high)]
    span = max(xs) - min(xs) if xs else 1.0
    x_axis = LinearAxis(min(xs) - 0.1 * span - 0.05, max(xs) + 0.1 * span + 0.05, LEFT, WIDTH - RIGHT)
    top = max([p.y_high for p in points] + [floor * 10])
    y_axis = LogAxis(floor, 10 ** math.ceil(math.log10(top)), HEIGHT - BOTTOM, TOP)
    parts = _frame(x_axis, y_axis, "test accuracy (%)", "TPR at 0.1% FPR (log; lower leaks less)", title)
    frontier = sorted((p for p in points if p.pareto), key=lambda p: p.x)
    if len(frontier) > 1:
        path = " ".join(f"{x_axis(p.x):.1f},{y_axis(p.y):.1f}" for p in frontier)
        parts.append(f'<polyline points="{path}" class="frontier"/>')
    for i, p in enumerate(points):
        colour = REFERENCE_COLOUR if p.reference else PALETTE[i % len(PALETTE)]
        cx, cy = x_axis(p.x), y_axis(p.y)
        parts.append(f'<line x1="{x_axis(p.x_low):.1f}" y1="{cy:.1f}" x2="{x_axis(p.x_high):.1f}" y2="{cy:.1f}" '
                     f'stroke="{colour}" class="errorbar"/>')
        parts.append(f'<line x1="{cx:.1f}" y1="{y_axis(p.y_low):.1f}" x2="{cx:.1f}" y2="{y_axis(p.y_high):.1f}" '
                     f'stroke="{colour}" class="errorbar"/>')
        shape = "point pareto" if p.pareto else "point"
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}" class="{shape}" '
                     f'data-entry="{escape(p.label)}"><title>{escape(p.label)}: accuracy {p.x:.2f}%, '
                     f'TPR@0.1%FPR {100 * p.y:.3f}%</title></circle>')
        parts.append(f'<text x="{cx + 7:.1f}" y="{cy - 7:.1f}" class="point-label">{escape(p.label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def roc_curves(curves: list[tuple[str, list[float], list[float], bool]], title: str) -> Markup:
    """Mean ROC per entry on log-log axes (FPR 1e-5..1), with the chance diagonal."""
    x_axis = LogAxis(1e-5, 1.0, LEFT, WIDTH - RIGHT)
    y_axis = LogAxis(1e-5, 1.0, HEIGHT - BOTTOM, TOP)
    parts = _frame(x_axis, y_axis, "false-positive rate", "true-positive rate", title)
    parts.append(f'<line x1="{x_axis(1e-5):.1f}" y1="{y_axis(1e-5):.1f}" x2="{x_axis(1):.1f}" y2="{y_axis(1):.1f}" class="chance"/>')
    for i, (label, fpr, tpr, reference) in enumerate(curves):
        colour = REFERENCE_COLOUR if reference else PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x_axis(f):.1f},{y_axis(t):.1f}" for f, t in zip(fpr, tpr))
        parts.append(f'<polyline points="{path}" stroke="{colour}" class="roc" data-entry="{escape(label)}">'
                     f"<title>{escape(label)}</title></polyline>")
        parts.append(f'<text x="{WIDTH - RIGHT - 8}" y="{HEIGHT - BOTTOM - 10 - 14 * i}" fill="{colour}" '
                     f'class="legend" text-anchor="end">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
