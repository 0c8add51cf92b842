"""Bounded memos: a value computed once per key, for the few answers the hot path gives again and again.

Owns: `Memo`, the one memo the package uses (a header name's role, a config name lower-cased,
a token's syntax check, a prepared refusal, a token's identity headers). The lookup is
`memo.get(key)`: a plain dict's own `get` (None for a key it does not hold), so a hit costs
what a module-level dict did; on a miss, `memo.make_for(key)` computes `make(key)`, keeps it and
returns it (if `make` raises, nothing is kept); a value that needs more than its key to compute
goes in with `remember(key, value)`.

The one overflow policy: a memo holds at most `bound` entries, and the new key that would
exceed the bound empties it first. Why this policy: a hit costs a dict lookup and nothing
else (an LRU would reorder on every hit); a flood of distinct keys (header names and tokens
are the client's choice) can only make the memo start over, never lock the usual keys out
as a memo that stops adding when full would; and after a clear, each usual key is computed
once more. What each memo saves is measured, and written down once, in bench/FIGURES.md.

Why not a dict subclass with `__missing__`: CPython looks `memo[key]` up through a Python-level
slot on any dict subclass (dict's own `__getitem__` is a method, not the slot), which costs
more than the memo saves; `get` bound to a plain dict does not.
Does not own: what is memoised (each user's `make`), or caches with expiry (the verified-token
cache, auth/verify.py, is an LRU with deadlines).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Memo"]

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """Values by key, computed once per key, at most `bound` of them (`bound` 0: none kept).

    value = memo.get(key)
    if value is None:
        value = memo.make_for(key)
    """

    __slots__ = ("_values", "bound", "get", "make")

    def __init__(self, bound: int, make: Callable[[K], V] | None = None) -> None:
        self._values: dict[K, V] = {}
        self.get: Callable[[K], V | None] = self._values.get
        """The lookup: the value kept for a key, else None (the dict's own `get`)."""
        self.make = make
        self.bound = bound

    def make_for(self, key: K) -> V:
        """`make(key)`, kept for next time (after a miss of `get`)."""
        assert self.make is not None, "a Memo without `make` is filled with `remember`"
        return self.remember(key, self.make(key))

    def remember(self, key: K, value: V) -> V:
        """Keep `value` for `key`, and return it. The one overflow policy: a new key that would
        make the memo hold more than `bound` entries empties it first."""
        values = self._values
        if len(values) >= self.bound and key not in values:
            if not self.bound:
                return value
            values.clear()  # the same dict: `get` stays bound to it
        values[key] = value
        return value

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __repr__(self) -> str:
        return f"Memo({len(self._values)}/{self.bound} entries)"
