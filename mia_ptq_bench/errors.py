"""One exception family, so the CLI can turn any expected failure into one clear line."""

from __future__ import annotations

import unicodedata


class BenchError(Exception):
    """An expected failure: bad input, missing data, a refused result. Carries a one-line message."""


class SpecError(BenchError):
    """A task spec (or another document) that does not validate."""


class DataError(BenchError):
    """A dataset that is missing or malformed on disk."""


class CacheError(BenchError):
    """A cache file that is unreadable or does not match its recorded checksum."""


class PlanError(BenchError):
    """A precision plan that cannot be parsed or served."""


class AuditError(BenchError):
    """A quantized model whose layers hold more grid values than its plan allows."""


class UnknownNameError(BenchError):
    """A name looked up in a registry that holds no such entry."""


class NameTakenError(BenchError, ValueError):
    """A name registered twice for two different things (an extension's dataset, model or attack named
    like a built-in one). Also a ValueError, as the registry raised before."""


class WriteError(BenchError, OSError):
    """A file or folder that cannot be written: read-only, full disk, no permission.

    Also an OSError, so code that already tolerates a failed write (an optional cache file) still does.
    """


# Unicode categories written out as escapes besides the C0/C1 controls: format characters (bidi
# overrides such as U+202E reorder what a reader sees, zero-width ones hide), lone surrogates (a file
# name's bytes that are not UTF-8) and the line and paragraph separators some viewers break lines at.
_HIDDEN = {"Cf", "Cs", "Zl", "Zp"}


def _hidden(c: str) -> bool:
    return ord(c) < 32 or 127 <= ord(c) < 160 or (ord(c) > 159 and unicodedata.category(c) in _HIDDEN)


def hidden_characters(text: str, allowed: str = "") -> list[str]:
    """The control and invisible characters of ``text`` (those ``printable`` escapes) not in ``allowed``, escaped."""
    return [printable(c) for c in dict.fromkeys(text) if c not in allowed and _hidden(c)]


def printable(text: str, newlines: bool = False) -> str:
    """``text`` with its control and invisible characters written out as escapes (line breaks kept if
    ``newlines``): a file name from a submission cannot start a line of CI output of its own, send a
    terminal escape, or reorder what is shown around it."""
    return "".join(c if (c == "\n" and newlines) or not _hidden(c) else f"\\x{ord(c):02x}" if ord(c) < 160
                   else f"\\u{ord(c):04x}" for c in text)
