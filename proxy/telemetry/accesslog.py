"""The access log: one JSON line per request, written without the `logging` machinery.

Owns: the line's fields and their encoding, and batching writes: lines are written with one
`write` and one `flush` at most `interval` (0.1 s) after the first of them, or once 256 are
waiting, so a busy sidecar makes one syscall per batch, not per request. (Flushing at the
end of every loop turn cost a 401 a fifth of its CPU: an extra loop iteration, an extra
zero-timeout poll, and fewer ready sockets served per poll.) Never the token, never the
query string (it may hold one). What a client, a token or the config chose is escaped in its
JSON string, C1 controls, DEL, bidi and zero-width characters too (safetext.json_line).
On stdout a batch goes to base/outlet.py's `Outlet`, which never waits for the reader: a
stalled reader (a pipe nobody reads) costs held lines up to a bound, then dropped ones,
counted (`jwt_sidecar_log_lines_dropped_total{log="access"}`) and said in one operator-log
line per second (`log_lines_dropped`), never a stalled event loop. Does not own: deciding what
happened to a request (pipeline.py, app.py) or how the bytes reach the descriptor (outlet.py).
"""

from __future__ import annotations

import asyncio
import json
import json.encoder
import logging
import time
from typing import BinaryIO

from ..base import oplog
from ..base.memo import Memo
from ..base.outlet import Outlet
from ..base.safetext import json_line

__all__ = ["AccessLog"]

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# The C string encoder behind `json.dumps(ensure_ascii=False)`: a quoted, escaped JSON string.
# It escapes C0 controls only: a path or a `sub` may hold C1 controls (U+009B is CSI), DEL,
# bidi overrides or U+2028, which safetext.json_line escapes, once per line (one regex scan
# of the whole line costs less than one per field).
_quote = json.encoder.encode_basestring


_BATCH = 256
_FRACTIONS = [f".{fraction:03d}Z" for fraction in range(1000)]  # a stamp's end, by millisecond
# A latency's decimals by microsecond: `{micros // 1000}{_DECIMALS[micros % 1000]}` is
# `f"{latency_ms:.3f}"` from an int, without formatting a float (~1,400 instructions a line:
# bench/FIGURES.md, "The 401 from the head"). Rounded half up from the float's product: a latency
# on a rounding boundary may differ from `.3f` in its third decimal (a microsecond's noise).
_DECIMALS = [f".{micros:03d}" for micros in range(1000)]
# A latency's whole milliseconds, below 1 s: a list index where an int's formatting costs ~500
# instructions a line (bench/FIGURES.md, "The public route, session 9"); 1,000 strs are ~60 KB
# (10,000 were 0.6 MiB of every process's RSS).
_WHOLE_KEPT = 1_000
_WHOLE = [str(whole) for whole in range(_WHOLE_KEPT)]


_log = logging.getLogger("jwt_sidecar.accesslog")


def _dropped(lines: int) -> None:
    """One operator-log line per second at most (logthrottle.py counts the rest) when a reader
    that does not read has made the outlet drop a batch."""
    oplog.event(
        _log,
        logging.WARNING,
        "log_lines_dropped",
        "stdout is not being read: %(lines)d access-log lines dropped "
        "(jwt_sidecar_log_lines_dropped_total counts them all)",
        lines=lines,
    )


class AccessLog:
    """`stream`: an `Outlet` (stdout in the running process) or a binary stream (tests, tools)."""

    def __init__(self, stream: BinaryIO | Outlet, *, interval: float = 0.1) -> None:
        self._outlet = stream if isinstance(stream, Outlet) else None
        if self._outlet is not None and self._outlet.on_drop is None:
            self._outlet.on_drop = _dropped
        self._stream = stream
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._pending: list[str] = []
        self._second = -1000  # the first millisecond of `_stamp`'s second (none yet)
        self._stamp = ""
        self._until = -1.0  # the `time.perf_counter()` at which `_time`'s millisecond is over
        self._time = ""
        self._middles: Memo[tuple[str, str | None, int, str, str], str] = Memo(4096)
        """`line`'s middle part by (route, provider, status, decision, reason): routes and providers are the
        config's, decisions and reasons closed sets, statuses at most 900; the bound is for a
        config with a great many routes."""

    def write(self, **fields: object) -> None:
        """One line of any fields (JSON-encodable values), after the time."""
        self._add(json_line(_encode({"time": self._now(), **fields})))

    def request(
        self,
        *,
        request_id: str,
        client: str | None,
        method: str,
        path: str,
        route: str,
        status: int,
        decision: str,
        reason: str,
        subject: str | None,
        latency_ms: float,
        provider: str | None = None,
    ) -> None:
        """The line for one request: the same JSON as `write(...)` with these fields, built
        directly (a dict through the JSON encoder was the largest cost of a refused request).

        `request_id`, `client`, `decision` and `reason` go in unescaped: they come from closed
        sets or were checked on the way in (`identity.request_id` allows [A-Za-z0-9._:-], the
        client is the socket's peer address, decision and reason are enum values). What a
        client or the config chooses (method, path, route, provider, subject) is escaped;
        `provider` is the route's (null on a public route or before routing).
        """
        self.line(request_id, client, method, path, route, provider, status, decision, reason, subject, latency_ms)

    def line(
        self,
        request_id: str,
        client: str | None,
        method: str,
        path: str,
        route: str,
        provider: str | None,
        status: int,
        decision: str,
        reason: str,
        subject: str | None,
        latency_ms: float,
    ) -> None:
        """`request`, positional (a keyword call costs more, and this runs for every request).

        The part from `route` to `subject`'s name is the same for every request of one (route,
        provider, status, decision, reason): it is built and escaped once (a line is escaped a
        character at a time, so a part escaped alone is the same text as in the whole line).
        `_now` and `_add` are written out here (bench/FIGURES.md, "The request side")."""
        key = (route, provider, status, decision, reason)
        middle = self._middles.get(key)
        if middle is None:
            middle = self._middles.remember(
                key,
                json_line(
                    f',"route":{_quote(route)},"provider":{"null" if provider is None else _quote(provider)},'
                    f'"status":{status:d},"decision":"{decision}","reason":"{reason}","subject":'
                ),
            )
        # `_now` and `_add` written out here: two Python calls fewer on every request (this is
        # the per-request line; bench/FIGURES.md, "The request side").
        now = time.perf_counter()
        stamp = self._time if now < self._until else self._stamp_at(now)
        peer = "null" if client is None else '"' + client + '"'
        micros = int(latency_ms * 1000 + 0.5)
        line = (
            f'{{"time":"{stamp}","request_id":"{request_id}",'
            f'"client":{peer},"method":{_quote(method)},'
            f'"path":{_quote(path)}{middle}{"null" if subject is None else _quote(subject)},'
            f'"latency_ms":{micros // 1000}{_DECIMALS[micros % 1000]}}}'
        )
        if not line.isascii() or "\x7f" in line:
            line = json_line(line)
        pending = self._pending
        pending.append(line)
        if self._timer is None or len(pending) >= _BATCH:  # (`_add`, written out: the common case is no call)
            self._schedule()

    def constant(
        self,
        method: str,
        path: str,
        route: str,
        provider: str | None,
        status: int,
        decision: str,
        reason: str,
        subject: str | None,
    ) -> str:
        """The part of `line` from `method` to `subject`, built and escaped once, for requests
        that share all of it (app.py's prepared 401: one per method and target): `line_from`."""
        return json_line(
            f'"method":{_quote(method)},"path":{_quote(path)},"route":{_quote(route)},'
            f'"provider":{"null" if provider is None else _quote(provider)},'
            f'"status":{status:d},"decision":"{decision}","reason":"{reason}",'
            f'"subject":{"null" if subject is None else _quote(subject)}'
        )

    def line_from(self, request_id: str, client: str | None, constant: str, latency_ms: float, now: float) -> None:
        """`line` for a request whose method .. subject are `constant` (`constant`'s), its
        latency ended at `now` (`time.perf_counter()`: the stamp's clock too, one reading): the
        same bytes, with only the time, id, client and latency put in (bench/FIGURES.md, "The
        401 from the head")."""
        stamp = self._time if now < self._until else self._stamp_at(now)
        micros = int(latency_ms * 1000 + 0.5)
        whole = micros // 1000
        line = (
            f'{{"time":"{stamp}","request_id":"{request_id}","client":"{client}",{constant},'
            f'"latency_ms":{_WHOLE[whole] if whole < _WHOLE_KEPT else whole}{_DECIMALS[micros % 1000]}}}'
            if client is not None  # (quoted here: two str concatenations fewer than a `peer` part)
            else f'{{"time":"{stamp}","request_id":"{request_id}","client":null,{constant},'
            f'"latency_ms":{_WHOLE[whole] if whole < _WHOLE_KEPT else whole}{_DECIMALS[micros % 1000]}}}'
        )
        if not line.isascii() or "\x7f" in line:  # (`constant` is escaped already: the client, if anything)
            line = json_line(line)
        pending = self._pending
        pending.append(line)
        if self._timer is None or len(pending) >= _BATCH:  # (`_add`, written out: the common case is no call)
            self._schedule()

    def around(
        self, method: str, route: str, provider: str | None, status: int, decision: str, reason: str
    ) -> tuple[str, str]:
        """The parts of `line` around its path (`"method":...,"path":`) and before its subject's
        value (`,"route":...,"subject":`), built and escaped once, for requests that share
        them (app.py's forwarded answers, per route, method, status and decision): `line_around`."""
        return json_line(f'"method":{_quote(method)},"path":'), json_line(
            f',"route":{_quote(route)},"provider":{"null" if provider is None else _quote(provider)},'
            f'"status":{status:d},"decision":"{decision}","reason":"{reason}","subject":'
        )

    def middle(self, before: str, path: str, after: str) -> str:
        """The part of a forwarded answer's line from `"method"` to `"subject":`, for `path`:
        `around`'s parts with the path escaped between them, made once per path by the caller
        that keeps it (app.py's `_Answered.middles`) and given to `line_middle`."""
        return before + _quote(path) + after

    def line_middle(
        self, request_id: str, client: str | None, middle: str, subject: str | None, latency_ms: float, now: float
    ) -> None:
        """`line` for a request whose method .. reason and path are `middle` (`middle`'s), its
        latency ended at `now` (`time.perf_counter()`: the stamp's clock too, one reading): the
        same bytes, with the time, id, client, subject and latency put in. Seven parts and two
        table lookups: the latency's whole milliseconds are not formatted from an int below 1 s
        (bench/FIGURES.md, "The public route, session 9")."""
        stamp = self._time if now < self._until else self._stamp_at(now)
        micros = int(latency_ms * 1000 + 0.5)
        whole = micros // 1000
        line = (
            f'{{"time":"{stamp}","request_id":"{request_id}","client":"{client}",{middle}'
            f'{"null" if subject is None else _quote(subject)},"latency_ms":'
            f"{_WHOLE[whole] if whole < _WHOLE_KEPT else whole}{_DECIMALS[micros % 1000]}}}"
            if client is not None  # (quoted here, as in `line_from`)
            else f'{{"time":"{stamp}","request_id":"{request_id}","client":null,{middle}'
            f'{"null" if subject is None else _quote(subject)},"latency_ms":'
            f"{_WHOLE[whole] if whole < _WHOLE_KEPT else whole}{_DECIMALS[micros % 1000]}}}"
        )
        if not line.isascii() or "\x7f" in line:
            line = json_line(line)
        pending = self._pending
        pending.append(line)
        if self._timer is None or len(pending) >= _BATCH:  # (`_add`, written out: the common case is no call)
            self._schedule()

    def _now(self) -> str:
        now = time.perf_counter()
        return self._time if now < self._until else self._stamp_at(now)

    def _stamp_at(self, now: float) -> str:
        """The stamp of the wall clock's millisecond at `now` (`time.perf_counter()`), kept for
        the lines until it is over (`_until`, on the same clock as `now`)."""
        # A busy sidecar logs several lines per millisecond: they share one stamp, and telling
        # whether the millisecond is over is one float comparison with the `perf_counter` the
        # line reads anyway (`int(time.time() * 1000)` and its comparison cost ~130 ns a line:
        # bench/FIGURES.md, "The 401 path, session 8").
        wall = time.time() * 1000
        millisecond = int(wall)
        # The millisecond within the second kept (`_second` is its first millisecond): a
        # subtraction and a comparison, where `divmod` was a call of ~320 instructions.
        fraction = millisecond - self._second
        if not 0 <= fraction < 1000:
            # An ISO-8601 UTC timestamp costs a strftime; one per second is enough.
            second = millisecond // 1000
            self._second, self._stamp = second * 1000, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            fraction = millisecond - self._second
        self._until = now + (millisecond + 1 - wall) / 1000
        self._time = self._stamp + _FRACTIONS[fraction]
        return self._time

    def _add(self, line: str) -> None:
        pending = self._pending
        pending.append(line)
        if self._timer is None or len(pending) >= _BATCH:
            self._schedule()

    def _schedule(self) -> None:
        """After a line is added: write the batch once it is full, else make sure one flush is
        due within `interval` (the first line of a batch arms the timer)."""
        if len(self._pending) >= _BATCH:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)
            except RuntimeError:  # no loop (a direct call): write at once
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        # backslashreplace: a lone surrogate (a token's `sub` of "\ud800", a path byte
        # kept by surrogateescape) has no UTF-8 form; strict encoding raised and lost the
        # whole batch. Inside a JSON string, `\ud800` is that same character's escape.
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        if self._outlet is not None:
            self._outlet.send(data, len(lines))  # returns at once (outlet.py)
            return
        try:
            self._stream.write(data)  # type: ignore[union-attr]
            self._stream.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):
            pass  # a closed or broken stdout must never take the proxy down
