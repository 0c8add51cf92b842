"""Operator log lines under failure: one line per kind per second, and a count of the rest.

Owns: `RepeatFilter`, the logging filter server.configure_logging puts on the operator log
handler (stderr), so every logger that reaches it (the package's, aiohttp's, asyncio's) is
limited. A kind is (logger name, level, message template): `record.msg` before its arguments
are filled in, so "request %s refused" is one kind whatever the request; numbers and hex
addresses in the template are ignored too, so a message formatted before it was logged
(asyncio's "Task exception was never retrieved" names a task at 0x7f…) is still one kind,
whatever address or port it names. An event (oplog.py) also has a subject, the provider,
worker or peer it is about: six providers down are six kinds, so each one's failure is
written, not only the first to fail in that second. The first line of a
kind is written at once; more of the same kind within `interval` are counted, not written,
and the next line of that kind that is written says how many were left out, e.g.
"... (1,234 similar suppressed)". Every level is limited, ERROR and CRITICAL too: a flood of
identical tracebacks is no more useful than one a second. The count is also left on the record
as `record.suppressed`, for the JSON format (oplog.py) to give as a field of its own. Does not own: the access log
(accesslog.py writes it without `logging`, one line per request, never limited) or what
is logged where (each module).

An outage must not turn the log into the bottleneck: a JWKS outage once wrote 65,216
identical WARNING lines in 4 s.
"""

from __future__ import annotations

import logging
import re
import threading

from .clock import Clock, SystemClock

__all__ = ["RepeatFilter", "suppressed_suffix"]

_VARYING = re.compile(r"0x[0-9a-fA-F]+|\d+")


def suppressed_suffix(count: int) -> str:
    """What a written line gains when `count` lines of its kind were held back."""
    return f" ({count:,} similar suppressed)"


class RepeatFilter(logging.Filter):
    """Let one record per kind through per `interval` seconds; count the ones held back."""

    def __init__(self, *, clock: Clock | None = None, interval: float = 1.0, max_kinds: int = 1024) -> None:
        super().__init__()
        self._clock = clock or SystemClock()
        self._interval = interval
        # Bounded, because a template built with an f-string makes a kind per message: the
        # kind written longest ago is forgotten first (losing its pending count, if any).
        self._max_kinds = max_kinds
        self._kinds: dict[tuple[str, int, str, str | None], list[float | int]] = {}
        self._lock = threading.Lock()  # records can come from a resolver or executor thread

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else type(record.msg).__qualname__
        kind = (record.name, record.levelno, _VARYING.sub("#", msg), getattr(record, "subject", None))
        now = self._clock.monotonic()
        with self._lock:
            state = self._kinds.get(kind)
            if state is not None and now - state[0] < self._interval:
                state[1] += 1
                return False
            suppressed = int(state[1]) if state is not None else 0
            # Re-inserted, so the dict stays ordered from least to most recently written.
            self._kinds.pop(kind, None)
            self._kinds[kind] = [now, 0]
            while len(self._kinds) > self._max_kinds:
                del self._kinds[next(iter(self._kinds))]
        if suppressed:
            # The record is this handler's to change: it is the only handler on the root logger.
            record.msg = record.getMessage() + suppressed_suffix(suppressed)
            record.args = None
            record.suppressed = suppressed
        return True
