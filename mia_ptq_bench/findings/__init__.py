"""The study's questions answered from committed results, as a markdown document (docs/findings*.md)."""

from .render import render
from .write import write_findings

__all__ = ["render", "write_findings"]
