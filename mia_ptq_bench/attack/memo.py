"""Values that several attacks derive from the same arrays, computed once per attack input."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def remembered(memo: dict | None, key: tuple | None, compute: Callable[[], T]) -> T:
    """``compute()``, kept in ``memo`` under ``key`` for the next attack on the same arrays.

    Without a memo or a key it is simply computed. Kept arrays are made read-only, so an attack
    that would change them in place fails instead of changing what the next attack reads.
    """
    if memo is None or key is None:
        return compute()
    if key not in memo:
        value = compute()
        for array in value if isinstance(value, tuple) else (value,):
            array.setflags(write=False)
        memo[key] = value
    return memo[key]
