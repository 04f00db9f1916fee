"""One exception family, so the CLI can turn any expected failure into one clear line."""

from __future__ import annotations


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


class WriteError(BenchError, OSError):
    """A file or folder that cannot be written: read-only, full disk, no permission.

    Also an OSError, so code that already tolerates a failed write (an optional cache file) still does.
    """


def printable(text: str, newlines: bool = False) -> str:
    """``text`` with its control characters written out as escapes (line breaks kept if ``newlines``): a
    file name from a submission cannot start a line of CI output of its own or send a terminal escape."""
    return "".join(c if c == "\n" and newlines else f"\\x{ord(c):02x}" if ord(c) < 32 or 127 <= ord(c) < 160
                   else c for c in text)
