"""Writing the findings page and its figures: nothing written unless all of it renders, nothing special overwritten."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..atomic import ensure_writable, temporary_folder, write_text_atomic
from ..errors import WriteError
from .render import render

FIGURES = "figures"


def write_findings(submissions: Path, task: str, page: Path, command: str) -> Path:
    """Render the page for ``task`` into ``page`` and its PNGs into ``figures/`` beside it; returns that folder.

    The figures are drawn into a temporary folder first, so a failure leaves the old page and figures
    as they were; each figure then replaces its namesake by a rename (which never opens what was there),
    and the page is written last.
    """
    figures = page.parent / FIGURES
    if page.exists() and not page.is_file():
        raise WriteError(f"{page}: the findings page would replace something that is not a regular file; refused")
    if figures.exists() and not figures.is_dir():
        raise WriteError(f"{figures}: the figures' folder is something else; refused")
    ensure_writable(page.parent, "the findings page")
    page.parent.mkdir(parents=True, exist_ok=True)
    drawn = temporary_folder(".findings-", page.parent)
    try:
        text = render(submissions, task, figures=drawn, figures_link=FIGURES, command=command)
        names = sorted(p.name for p in drawn.iterdir())
        for name in names:
            target = figures / name
            if target.exists() and not target.is_file():
                raise WriteError(f"{target}: a figure would replace something that is not a regular file; refused")
        figures.mkdir(exist_ok=True)
        for name in names:
            os.replace(drawn / name, figures / name)
        write_text_atomic(page, text)
    finally:
        shutil.rmtree(drawn, ignore_errors=True)
    return figures
