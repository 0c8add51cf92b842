"""Time, as the rest of the package receives it: injected, never read from a global.

Owns: the `Clock` protocol (wall-clock seconds for token dates, monotonic seconds for
intervals, and sleeping for background timers such as the key refresh) and `SystemClock`.
Tests pass their own clock instead of patching time, and move its sleepers on without
waiting real seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch, for exp/nbf/iat (RFC 7519 NumericDate)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for TTLs and rate limits."""

    async def sleep(self, seconds: float) -> None:
        """Wait until `monotonic()` has moved `seconds` on (background timers wait here)."""


class SystemClock:
    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
