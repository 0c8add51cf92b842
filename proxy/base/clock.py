"""Time, as the rest of the package receives it: injected, never read from a global.

Owns: the `Clock` protocol (wall-clock seconds for token dates, monotonic seconds for
intervals) and `SystemClock`. Tests pass their own clock instead of patching time.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch, for exp/nbf/iat (RFC 7519 NumericDate)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for TTLs and rate limits."""


class SystemClock:
    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
