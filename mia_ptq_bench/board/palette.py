"""One colour per method, the same on every board, plot and figure.

Okabe and Ito's colour-blind-safe palette (2008): the references are black and grey, the
built-in methods have fixed colours, any other entry gets one from its name (a stable hash),
so a method keeps its colour from page to page and from build to build.
"""

from __future__ import annotations

import hashlib

FIXED = {
    "fp32": "#000000",  # black: the full-precision reference
    "rtn": "#7a7a7a",  # grey: the round-to-nearest reference
    "adaround": "#e69f00",  # orange
    "brecq": "#0072b2",  # blue
    "obc": "#009e73",  # bluish green
    "gptq": "#d55e00",  # vermillion
}
OTHERS = ["#cc79a7", "#56b4e9", "#a6761d", "#6a3d9a", "#b15928", "#1b7837"]  # purple, sky blue, browns, greens


def colour_for(name: str) -> str:
    if name in FIXED:
        return FIXED[name]
    return OTHERS[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(OTHERS)]
