"""Progress reporting that the library emits and the CLI renders (with rich)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, key: str, description: str, total: int) -> None: ...

    def advance(self, key: str, amount: int = 1) -> None: ...

    def log(self, message: str) -> None: ...


class SilentProgress:
    def start(self, key: str, description: str, total: int) -> None:
        pass

    def advance(self, key: str, amount: int = 1) -> None:
        pass

    def log(self, message: str) -> None:
        pass
