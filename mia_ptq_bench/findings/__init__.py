"""The study's questions answered from committed results, as a markdown document (docs/findings*.md)."""

from .render import render

__all__ = ["render"]
