"""One colour per method, the same on every board, plot and figure.

Okabe and Ito's colour-blind-safe palette (2008): the references are black and grey, the
built-in methods have fixed colours. Any other entry prefers the colour its name hashes to and,
when an entry earlier in name order holds it, takes the next free one: no two entries of a site
share a colour, and an entry keeps its colour from page to page (and from build to build unless a
newcomer takes its slot first).
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Iterable

FIXED = {
    "fp32": "#000000",  # black: the full-precision reference
    "rtn": "#7a7a7a",  # grey: the round-to-nearest reference
    "adaround": "#e69f00",  # orange
    "brecq": "#0072b2",  # blue
    "obc": "#009e73",  # bluish green
    "gptq": "#d55e00",  # vermillion
}
OTHERS = ["#cc79a7", "#56b4e9", "#a6761d", "#6a3d9a", "#b15928", "#1b7837"]  # purple, sky blue, browns, greens


def _extra(k: int) -> str:
    """The k-th colour beyond the palette: golden-angle hues, dark enough to read on white."""
    red, green, blue = colorsys.hls_to_rgb((0.61803398875 * k) % 1.0, 0.38, 0.7)
    return f"#{round(255 * red):02x}{round(255 * green):02x}{round(255 * blue):02x}"


def assign_colours(names: Iterable[str]) -> dict[str, str]:
    """A distinct colour for every name: the fixed ones, then each other name (in name order) its
    hashed slot of OTHERS or the next free slot; past OTHERS, generated colours."""
    names = sorted(set(names))
    colours = {name: FIXED[name] for name in names if name in FIXED}
    free = list(range(len(OTHERS)))
    extra = 0
    for name in (n for n in names if n not in FIXED):
        if free:
            want = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(OTHERS)
            slot = min(free, key=lambda s: (s - want) % len(OTHERS))  # the wanted slot, else the next free one
            free.remove(slot)
            colours[name] = OTHERS[slot]
        else:
            colours[name] = _extra(extra)
            extra += 1
    return colours


def colour_for(name: str) -> str:
    """A name's colour on its own (a built-in's fixed colour; another name's hashed slot)."""
    return assign_colours([name])[name]
