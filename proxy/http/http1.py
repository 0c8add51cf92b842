"""The client-facing HTTP/1.1 server: one `asyncio.BufferedProtocol` per connection, parsed by httptools.

Owns: reading requests with llhttp (through `httptools.HttpRequestParser`, in its strict
mode: CL+TE, duplicate or signed Content-Length, bad chunk framing, bare LF, obs-fold and
control characters are all refused by the parser), our own limits on the head (request
target, field size, field count, total size: 414 and 431), HTTP/1.0 and 1.1 only (505),
no transfer coding but `chunked` alone (501; 400 when chunked is not the last), none at
all in HTTP/1.0 (400),
one Host (400), keep-alive and pipelining (answers in request order; reading pauses while
a request waits its turn), request bodies streamed with back-pressure (reads of at most
32 KiB into one buffer per server, reading stopped at 16 KiB buffered) or relayed from the
read callback to a sink (`Request.relay_body`: reading stopped while the sink is full, the
body's limit and timeouts kept there); a Content-Length body counted past the read its head
came in, not parsed (`_Counted`: its pieces go on as they came, views of the read buffer
while relayed, and what follows the body is judged as llhttp judges it; chunked bodies are
llhttp's; its rest spliced into a plain-TCP upstream's socket once nothing of it is held,
`_Connection._try_splice` with splice.py, the connection back to the parser at its end),
the client's write buffer capped at 16 KiB (a
streamed answer waits, through flow.py's `WriteFlow`), `Expect: 100-continue` answered when
the body is first read or relayed, writing answers (one write for a
whole answer, or a head and then a Content-Length, chunked or close-delimited body; the rest
of a relayed Content-Length answer may be spliced into the client's socket by upstream.py, this
`Request` its target: `Request.splice_fd`, the connection's loss ending the splice),
upgrades (the bytes after the head are held for `Request.tunnel`, or the connection
closes after the answer), an idle keep-alive timeout, a time limit on each request head
from its first byte (408), a limit on open connections (those over it are closed at accept),
cancelling the handler when the client goes away (a task, or a `Later`: a request the
handler answers from callbacks of its own, with no task), a `Quick` hook asked to answer a
request from its head alone when that answer may be written at once (no `Request` made), or to
take it on with an `Ahead` standing for its `Request` (made only if needed: `Ahead.full`), and a graceful drain (`Server.start_drain`,
`Server.shutdown`): answers carry `Connection: close`, the listen queue is served before the
listener closes, and a connection is closed only between requests, never once a request's
first byte has arrived. How a connection ends (RFC 9112 §9.6): a client that half-closes is
answered the request it sent whole, then closed (`_Connection.eof_received`; a tunnel passes the
half-close on); a close after an answer while the client may still be sending (a refusal, an
upload refused before its body was read) lingers: the write side shut first, what the client
still sends read and dropped for `LINGER_TIME` / `LINGER_BYTES` at most (`_Linger`), then closed.
Does not own: what a request means or what the answer says (app.py and pipeline.py), or
any header beyond framing: `Content-Length`, `Transfer-Encoding`, `Connection` and `Date`.

Why not aiohttp's server: its request object, response preparation and writer were more
than half the proxy's CPU time per request (issue 5's profile); llhttp is the same parser
aiohttp uses, and this module keeps to what a reverse proxy needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from http import HTTPStatus
from time import perf_counter
from typing import Any, cast, overload
from urllib.parse import unquote

import httptools

from . import splice as _splice
from .flow import HELD, Deadlines, Wakeup, WriteFlow, send
from .log import event

__all__ = [
    "Ahead",
    "BodyError",
    "BodyTimeout",
    "BodyTooLarge",
    "ConnectionCounts",
    "Headers",
    "Later",
    "Prepared",
    "Quick",
    "Request",
    "Send",
    "Server",
    "query_pairs",
]

log = logging.getLogger("jwt_sidecar.http")

MAX_TARGET = 8190
"""Longest request target (aiohttp's and nginx's default line limit): 414 beyond it."""
MAX_FIELD = 16384
"""Longest single header field, name and value: 431 beyond it."""
MAX_FIELDS = 128
"""Most header fields in one request: 431 beyond it."""
MAX_HEAD = 64 * 1024
"""Most bytes of header fields in one request: 431 beyond it."""
# Bytes the parser may take without progress (a head, body bytes, a message end): a request
# line and every field with their CRLFs and colons, or a chunked body's trailer fields.
_MAX_STALL = MAX_TARGET + MAX_HEAD + 8 * 1024
_HEAD_SLICE = 4 * 1024  # reads are parsed this much at a time (a body: _BODY_SLICE)...
_BODY_SLICE = 256 * 1024
_BACKLOG = 16  # ...until this many requests wait (pipelining); the rest waits unparsed
_MAX_QUEUED = _BACKLOG + _HEAD_SLICE // 16  # more than one head slice can hold past the backlog: refused
# Request body bytes buffered before we stop reading the socket, while nobody passes them on
# yet (before `Request.relay_body` begins, or a reader of `iter_body`): 16 KiB, so a read the
# handler has not taken yet does not pause the socket at once (at 8 KiB every 16 KiB read
# paused and resumed it: bench/FIGURES.md, "Uploads").
_HIGH_WATER = 16 * 1024
# The most bytes one read takes from a client's socket (the event loops read up to 256 KiB):
# reads land in one buffer per server (`asyncio.BufferedProtocol`). A relayed body goes on to
# the upstream a read at a time, so an upload to an upstream that does not read holds about
# one read in the upstream transport's buffer: 1,000 of them peak at ~95 MiB at 32 KiB
# (tests/integration/test_memory.py; ~79 at 16 KiB, ~107 at 48, ~131, over the manifests'
# 128, at 64), and each read costs a recv and a send (system time per 1 MiB upload roughly
# halved from 16 to 32 KiB: bench/FIGURES.md, "Uploads").
_READ_SIZE = 32 * 1024
# While a body is relayed (`Request.relay_body`) and the write buffers of paused transports
# hold less than flow.py's `HELD.limit`, reads take up to this much: a recv and a send per
# 256 KiB rather than per 32 KiB (bench/FIGURES.md, "Bodies: fewer, larger reads"). The limit
# bounds what slow upstreams can make such reads hold: beyond it, reads are `_READ_SIZE` again.
_BIG_READ = 256 * 1024
_BIG_PIECE = 4 * 1024  # a body piece this large is handed on alone (`Request._take_body`, `_Relay.take`)
_NEVER = float("inf")
_NO_LIMIT = 1 << 62  # `_Relay`'s allowance for a body with no limit
# A timer may run a hair before its time (flow.py's `_EARLY`): a body's `total` this close to
# spent when its wait timed out was spent.
_EARLY = 0.001
# The client transport's write buffer beyond which a streamed answer waits for the client
# (the event loops' default is 64 KiB): with a client that reads slowly or not at all, this
# and the chunk being written are what its connection holds, past the kernel's socket buffer.
WRITE_HIGH_WATER = 16 * 1024
_UPGRADE_BUFFER = 64 * 1024  # bytes held after an upgrade request while its answer is decided
_ENCODING = "utf-8"
# The bytes a client sent, decoded so that encoding back gives the same bytes (aiohttp's
# choice too): the upstream receives exactly what the client wrote.
_ERRORS = "surrogateescape"
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_METHOD_NAMES: dict[bytes, str] = {}
"""A method as llhttp gave it (bytes) and as a request holds it (str): llhttp refuses any method
outside its fixed table, so this holds a few dozen at most."""
_REASON_BYTES = {status: phrase.encode("ascii") for status, phrase in _REASONS.items()}
# `Request._connection_field`'s three answers, as bytes (`Request.relay`).
_CONNECTION_BYTES = {line: line.encode("ascii") for line in ("", "Connection: close\r\n", "Connection: keep-alive\r\n")}
_BODILESS = frozenset({204, 304})
LINGER_TIME = 2.0
"""After an answer that closes a connection while the client may still be sending (a refusal, an
upload refused before its body was read: `_Connection._linger`), how long what it sends is read
and dropped, at most, before the connection is closed (RFC 9112 §9.6; nginx's `lingering_time`)."""
LINGER_BYTES = 16 * 1024 * 1024
"""...and how many bytes, at most: more than the default `max_body` (10 MB), so that a client
sending a body just over it, as fast as loopback takes it, is still read to its end; what one
refused upload can cost is bounded by what one accepted upload costs."""
_DRAIN_IDLE = 1.0
"""While draining, a connection idle this long (no byte of a next request) is closed. A client
sending continuously is never idle that long: it gets `Connection: close` on an answer instead."""

Handler = Callable[["Request"], "Awaitable[None] | Later | None"]
"""Answers a request at once and returns None, or returns the rest of its work to await. The
rest always runs, even for a client that left before it began (`request.transport` is then
None: the rest decides what it still owes). Or returns a `Later`: the handler finishes the
request itself, from callbacks of its own, with no task (`Later`)."""
_NO_QUERY: tuple[tuple[str, str], ...] = ()
_MISSING: Any = object()
Send = Callable[["Prepared", str, bool, float], None]
"""`send(answer, field, head)`: a prepared answer, one more header field (`"Name: value\\r\\n"`)
and Date, in one write (`Request.send`'s); without the body when `head` (a HEAD request)."""
Quick = Callable[
    [str, str, list[tuple[bytes, bytes]], str | None, Send, "Callable[[str, str, list[tuple[bytes, bytes]]], Ahead]"],
    "bool | Later",
]
"""`quick(method, target, fields, remote, send, ahead)`: answers a request from its head alone,
with `send`, and returns True; or takes it on with no `Request` made: `ahead(method, target,
fields)` makes its `Ahead`, through which it is answered later, and returns the `Later` that
ends it (`Ahead.done`); or returns False, having done nothing, and the request goes to the
handler as any other. Asked only of a request whose answer may be written at once and leave
the connection open: HTTP/1.1 kept alive, no body (no Content-Length at all), no upgrade, none before it still to
answer, the client reading, no drain under way (`_Connection.on_headers_complete`). No
`Request` is made for what it answers or takes on (bench/FIGURES.md, "The 401 from the head",
"The forward from the head")."""
_NO_CHUNKS = cast("deque[bytes]", ())
"""The body pieces of a request without a body: none, ever (`Request.__init__`)."""


class Later:
    """What a handler returns for a request it answers later from callbacks of its own, with no
    task (an upstream's answer relayed from the upstream connection's read callback: bench/FIGURES.md,
    "The proxied request without a task"). The connection waits, as for a task, until the
    handler calls `Request.done` (or hands the rest to a task: `Request.carry_on`); if the
    client goes away first, `cancel` is called (from `connection_lost`), and must end in
    `done` too, as a cancelled task ends in `_done`."""

    __slots__ = ()

    def cancel(self) -> None:
        raise NotImplementedError


class BodyError(Exception):
    """The request body could not be read to its end: malformed framing, or the client left."""


class BodyTimeout(BodyError):
    """No body bytes came for the time the reader allowed."""


class BodyTooLarge(BodyError):
    """More body bytes came than the limit the reader set (`Request.relay_body`)."""


def _codings(values: list[bytes]) -> list[bytes]:
    """The transfer codings named by Transfer-Encoding field values, lower-cased, in order:
    one list however many lines carry it (RFC 9110 §5.3), empty elements ignored (§5.6.1)."""
    return [
        coding for value in values for coding in (part.strip(b" \t").lower() for part in value.split(b",")) if coding
    ]


class _Refuse(Exception):
    """Raised from a parser callback: answer this status, then close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


_date: tuple[int, str, bytes] = (0, "", b"")


def _date_line() -> str:
    # One formatted Date per second, shared by every connection.
    global _date
    now = int(time.time())
    if _date[0] != now:
        line = f"Date: {_imf_fixdate(now)}\r\n"
        _date = (now, line, line.encode("ascii"))
    return _date[1]


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _imf_fixdate(second: int) -> str:
    """RFC 9110 §5.6.7's IMF-fixdate of a Unix time (`Sun, 06 Nov 1994 08:49:37 GMT`), with the
    day and month names spelled out here, never the locale's. Written here rather than taking
    `email.utils.formatdate`: importing `email` cost every process ~0.5 MiB of resident memory
    for this one line (bench/FIGURES.md, "Resident memory, session 10")."""
    t = time.gmtime(second)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _date_bytes() -> bytes:
    """`_date_line`, encoded (once a second)."""
    if _date[0] != int(time.time()):
        _date_line()
    return _date[2]


_date_until = -1.0
"""The `time.perf_counter()` at which the second of `_date_at`'s last answer is over."""


def _date_at(now: float) -> bytes:
    """`_date_bytes` at `now` (`time.perf_counter()`), kept until its second is over: one float
    comparison where a caller has read the clock already (`_Connection._send_now`, the prepared
    401: bench/FIGURES.md, "The public route, session 9")."""
    global _date_until
    if now < _date_until:
        return _date[2]
    wall = time.time()
    second = int(wall)
    if _date[0] != second:
        _date_line()
    _date_until = now + (second + 1 - wall)
    return _date[2]


# The query's pairs and the decoded header fields were yarl's and multidict's (aiohttp's, from
# when the proxy ran on it) and are written here instead: importing the two (with idna,
# propcache and unicodedata, 22 modules) cost every process 0.6 MiB of resident memory after
# 10,000 requests (~1 MiB in a fresh interpreter; bench/FIGURES.md, "yarl and multidict").
# tests/unit/http/test_query_headers_differential.py holds both to yarl's and multidict's
# answers on generated input.


def query_pairs(query: str) -> list[tuple[str, str]]:
    """A query string's (name, value) pairs in order, decoded as yarl's `URL.query` decodes
    them, which is `urllib.parse.parse_qsl(query, keep_blank_values=True)`: split on '&' alone
    (';' is data), empty parts dropped, a part without '=' a name with an empty value, '+' a
    space, %-escapes decoded as UTF-8 with U+FFFD for bytes that are not, an invalid escape
    (`%zz`, `%4`) kept as written. auth/extract.py finds a query token in these pairs and
    removes it with the same `unquote_plus`."""
    parts = query.replace("+", " ").split("&")  # `unquote_plus` is `unquote` after this replace
    if "%" not in query:  # nothing to decode (yarl's shortcut too)
        return [(name, value) for name, _, value in (part.partition("=") for part in parts if part)]
    pairs = []
    for part in parts:
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name) if "%" in name else name, unquote(value) if "%" in value else value))
    return pairs


class Headers:
    """A request's decoded header fields, by name in any case: the part of multidict's
    `CIMultiDict` the proxy and its tests read (`getall`, `get`, `[]`, `in`, `items`, `len`).
    Names compare after `str.lower()` on both sides, exactly as `CIMultiDict` compares them
    (full Unicode lower case: KELVIN SIGN is `k`); llhttp (strict) lets only RFC 9110 tchar,
    ASCII, into a field name."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    @overload
    def getall(self, name: str) -> list[str]: ...
    @overload
    def getall(self, name: str, default: Any) -> list[str] | Any: ...
    def getall(self, name: str, default: Any = _MISSING) -> list[str] | Any:
        """Every value of `name` in order; `default`, or KeyError, when there is none."""
        low = name.lower()
        found = [value for key, value in self._pairs if key.lower() == low]
        if found:
            return found
        if default is _MISSING:
            raise KeyError(name)
        return default

    def get(self, name: str, default: Any = None) -> str | Any:
        """The first value of `name`, or `default`."""
        low = name.lower()
        for key, value in self._pairs:
            if key.lower() == low:
                return value
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return cast("str", value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name, _MISSING) is not _MISSING

    def items(self) -> list[tuple[str, str]]:
        """(name, value) as sent, in order."""
        return list(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)


class Request:
    """One request: its head, its body as a stream, and the way to answer it.

    The attribute names follow aiohttp's `BaseRequest` where they mean the same thing.
    Answering is one of: `respond` (a whole answer in one write), or `start`, `write`...,
    `finish` (streamed); after either has begun, a failure can only `abort`.
    """

    scheme = "http"
    """The scheme the client spoke to us (our server speaks no TLS)."""

    __slots__ = (
        "_buffered",
        "_chunked",
        "_chunks",
        "_close",
        "_complete",
        "_conn",
        "_continue",
        "_error",
        "_finished",
        "_headers",
        "_query",
        "_started",
        "_wakeup",
        "body_exists",
        "content_length",
        "fields",
        "keep_alive",
        "method",
        "raw_path",
        "remote",
        "status",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: str,
        version: str,
        fields: list[tuple[bytes, bytes]],
        keep_alive: bool,
        upgrade: bool,
        content_length: int | None,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        # Positional: made once per request, by on_headers_complete (a keyword call costs more).
        self._conn = conn
        self.method = method
        self.raw_path = target
        """The request target exactly as sent (decoded byte for byte)."""
        self.version = version
        self.fields = fields
        """The header fields as they came off the wire, in order: (name, value) bytes. llhttp
        (strict) allowed no CR, LF or NUL in them, and no obs-fold."""
        self._headers: Headers | None = None
        self.remote: str | None = conn._remote
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.content_length = content_length
        body_exists = self.body_exists = chunked or bool(content_length)
        self.status = 0
        """The status of the answer once its head is written (0 before)."""
        self._query: Sequence[tuple[str, str]] | None = None
        # No body, no queue of its pieces: the parser gives it none (`_feed` is never called),
        # and an empty tuple has no `append` to take one by mistake.
        self._chunks: deque[bytes] = deque() if body_exists else _NO_CHUNKS
        self._buffered = 0
        self._complete = not body_exists
        self._error: BaseException | None = None
        self._wakeup: Wakeup | None = None  # made when the handler first waits for body bytes
        self._continue = expect_continue
        self._started = False
        self._finished = False
        self._close = False
        self._chunked = False

    @property
    def headers(self) -> Headers:
        """The header fields decoded (UTF-8 with surrogateescape: encoding gives back the same
        bytes), made on first use: the proxy's own path reads `fields`."""
        if self._headers is None:
            self._headers = Headers(
                [(name.decode(_ENCODING, _ERRORS), value.decode(_ENCODING, _ERRORS)) for name, value in self.fields]
            )
        return self._headers

    def header(self, lower_name: bytes) -> bytes | None:
        """The first value of a field, by its lower-case name, without decoding anything."""
        for name, value in self.fields:
            if len(name) == len(lower_name) and name.lower() == lower_name:
                return value
        return None

    @property
    def query(self) -> Sequence[tuple[str, str]]:
        """The query string's (name, value) pairs in order, decoded (`query_pairs`), made on first use."""
        if self._query is None:
            _, _, query = self.raw_path.partition("?")
            query = query.partition("#")[0]
            self._query = query_pairs(query) if query else _NO_QUERY
        return self._query

    @property
    def transport(self) -> asyncio.Transport | None:
        conn = self._conn
        return None if conn._lost else conn._transport

    # the body

    async def iter_body(self, timeout: float | None = None, *, total: float | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives (de-chunked); raises `BodyError` if it cannot be read to its
        end, `BodyTimeout` when no bytes come for `timeout` seconds (a stalled upload must not
        hold a connection, a handler and an upstream request for as long as it likes), or
        when the waits for its bytes add up to more than `total` seconds (a body trickled a
        byte at a time never trips `timeout`). Only the time spent waiting for the client
        counts: not the time its bytes wait for the reader (an upstream slow to take them)."""
        conn = self._conn
        left = total
        if self._continue:
            # RFC 9110 §10.1.1: the client waits for this before sending the body; sending it
            # only now means a refused request never invites the upload.
            self._continue = False
            if not self._complete and not conn._lost:
                conn._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if self._chunks:
                # No local holds what is yielded: while the consumer waits for the upstream to
                # take it, the transport's copy is the only one.
                yield self._take_body()
            elif self._error is not None:
                raise BodyError(str(self._error)) from self._error
            elif self._complete:
                return
            else:
                wait, by_total = timeout, False
                if left is not None:
                    if left <= 0:
                        raise BodyTimeout(f"the body was not all here after {total:g}s")
                    if not wait or left < wait:
                        wait, by_total = left, True
                    began = conn._loop.time()
                wakeup = self._wakeup
                if wakeup is None:
                    # Its timeouts on the server's one timer: no TimerHandle per wait (bench/FIGURES.md, "Bodies").
                    wakeup = self._wakeup = Wakeup(conn._loop, conn._server._deadlines)
                waiter = wakeup.arm(wait or None)  # `Wakeup.wait`, inlined: no coroutine per wait
                try:
                    timed_out = await waiter
                finally:
                    wakeup.disarm()
                if left is not None:
                    left -= conn._loop.time() - began
                if timed_out:
                    raise BodyTimeout(
                        f"the body was not all here after {total:g}s" if by_total else f"no body bytes for {timeout:g}s"
                    )

    async def relay_body(
        self,
        sink: Callable[[bytes | memoryview], bool],
        drain: Callable[[], Awaitable[bool]],
        timeout: float | None = None,
        *,
        total: float | None = None,
        limit: int = 0,
        target: Any = None,
    ) -> bool:
        """`iter_body` the other way round: the body is passed on as it is parsed, `sink(data)`
        called from the connection's read callback for each read's worth (a chunked body's
        small pieces of one read together), with no task woken per read (bench/FIGURES.md,
        "Uploads"). What `sink` is given may be a view of the server's read buffer (a counted
        Content-Length body's, `_Counted`): valid during the call only, so what it keeps, it
        copies (`flow.send`). `sink` returns whether its side is full: then the client is not read
        until `drain()` (awaited here; it raises what a stalled or failed destination
        means) has returned True; False from it means the destination wants nothing more,
        and this returns False with the rest of the body unread. Returns True once the whole
        body has gone to `sink`. Raises as `iter_body` does (`timeout`, `total`, counted
        only while waiting for the client), and `BodyTooLarge` as soon as more than `limit`
        bytes came (0: no limit): the bytes past it are never passed on. `target`: an upstream
        the rest of a Content-Length body may be spliced into (upstream.py's `_Upload`, plain
        TCP): whenever it may (`_Connection._try_splice`), the kernel moves the body, with the
        same limit, timeouts and outcomes (bench/FIGURES.md, "The upload spliced")."""
        conn = self._conn
        if self._continue:
            # RFC 9110 §10.1.1 (as `iter_body`): only now is the client invited to send the body.
            self._continue = False
            if not self._complete and not conn._lost:
                conn._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        loop = conn._loop
        wakeup = self._wakeup
        if wakeup is None:
            wakeup = self._wakeup = Wakeup(loop, conn._server._deadlines)
        relay = _Relay(self, sink, limit, wakeup)
        chunks = self._chunks
        if chunks:  # what came before the relay began, passed on as if it came now
            self._buffered = 0
            while chunks:
                relay.take(chunks.popleft())
            relay.flush()
            if conn._flush is relay:
                conn._flush = None
        if not self._complete and self._error is None and conn._parsing is self and not relay.over:
            conn._relay = relay  # from now on, `on_body` passes each read on
            if conn._read_paused and not relay.full:
                conn._update_reading()  # paused while the body waited for us
            if target is not None and _splice.ENABLED:
                conn._target = target
                conn._try_splice()
        left = total
        try:
            while True:
                if relay.over:
                    raise BodyTooLarge(f"the body exceeds {limit} bytes")
                if relay.full:
                    # The destination is full (or wants nothing more): the client is not read
                    # meanwhile, and this wait is the destination's, not counted in `total`.
                    if not await drain():
                        return False
                    relay.full = False
                    if conn._target is not None:
                        conn._try_splice()
                    if conn._read_paused:
                        conn._update_reading()
                    continue
                if self._error is not None:
                    raise BodyError(str(self._error)) from self._error
                if self._complete:
                    return True
                wait = timeout
                if left is not None:
                    if left <= 0:
                        raise BodyTimeout(f"the body was not all here after {total:g}s")
                    if not wait or left < wait:
                        wait = left
                    began = loop.time()
                    relay.due = began + left
                waiter = wakeup.arm(wait or None)
                relay.extend = timeout or 0.0  # each read passed on moves this wait's timeout (`_Relay.take`)
                try:
                    timed_out = await waiter
                finally:
                    relay.extend = 0.0
                    wakeup.disarm()
                if left is not None:
                    left -= loop.time() - began
                if timed_out and not relay.full and not relay.over:
                    raise BodyTimeout(
                        f"the body was not all here after {total:g}s"
                        if left is not None and left <= _EARLY
                        else f"no body bytes for {timeout:g}s"
                    )
        finally:
            # (Neither may keep the relay: it refers to the request, and so back to the connection.)
            relay.sink = None
            if conn._relay is relay:
                conn._relay = None
            if conn._flush is relay:
                conn._flush = None
            if conn._splice is not None:
                # Ended before its body (a timeout, a cancel, a failure): reading goes on as
                # after a copied body's relay.
                conn._stop_splice()
                conn._target = None
                conn._update_reading()
            conn._target = None

    def _take_body(self) -> bytes:
        chunks = self._chunks
        if len(chunks) == 1 or len(chunks[0]) >= _BIG_PIECE:
            # A read's worth at a time, as it came: joining them costs a copy, and the consumer
            # takes the next one without waiting (bench/FIGURES.md, "Uploads").
            data = chunks.popleft()
            self._buffered -= len(data)
        else:
            # Small pieces (a chunked body's) leave together: one write upstream, not one each.
            data = b"".join(chunks)
            chunks.clear()
            self._buffered = 0
        self._conn._body_taken()
        return data

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()

    def _end(self, error: BaseException | None = None) -> None:
        if error is None:
            self._complete = True
        elif not self._complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.wake()

    # the answer

    def respond(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        *,
        date: bool = True,
        fields: bytes = b"",
    ) -> None:
        """The whole answer in one write.

        `body` bytes: framed with Content-Length (sent without the body to a HEAD).
        `body` None: the head exactly as given, no framing added (a HEAD, 204 or 304 answer
        relayed from the upstream, whose Content-Length, if any, describes the GET).
        `fields`: header lines already encoded, each ending in CRLF, written after `headers`
        (an upstream's fields relayed as they came, with no CR or LF inside a line).
        """
        if self._started:
            self.abort()  # a second answer would splice into the first: cut the connection instead
            return
        if body is None:
            framing = ""
        elif status in _BODILESS or status < 200:
            framing, body = "", None
        else:
            framing = f"Content-Length: {len(body)}\r\n"
            if self.method == "HEAD":
                body = None
        head = self._head(status, reason, headers, framing, date, fields)
        self._finished = True
        conn = self._conn
        if not conn._lost:
            conn._transport.write(head + body if body else head)

    def relay(self, status: int, reason: bytes, fields: bytes, body: bytes, *, date: bool) -> None:
        """`respond` for an upstream's answer held whole, in bytes end to end: its status, its
        reason phrase as it came (ours when it sent none), `fields` (encoded lines, each
        ending in CRLF, no CR or LF inside one), `body` framed with Content-Length (sent
        without it to a HEAD; none at all on a 204 or 304). No str is built or encoded on the
        way: bench/FIGURES.md, "The upstream client's per-answer work"."""
        if self._started:
            self.abort()  # a second answer would splice into the first: cut the connection instead
            return
        if status in _BODILESS or status < 200:
            framing = b""
            body = b""
        else:
            framing = b"Content-Length: %d\r\n" % len(body)
            if self.method == "HEAD":
                body = b""
        head = b"HTTP/1.1 %d %b\r\n%b%b%b%b\r\n" % (
            status,
            reason or _REASON_BYTES.get(status, b"Unknown"),
            fields,
            framing,
            _date_bytes() if date else b"",
            _CONNECTION_BYTES[self._connection_field(status)],
        )
        self._finished = True
        conn = self._conn
        if not conn._lost:
            conn._transport.write(head + body if body else head)

    async def start(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        *,
        date: bool = True,
        fields: bytes = b"",
    ) -> None:
        """Write the head of a streamed answer: Content-Length when `length` is known, else
        chunked (HTTP/1.1) or close-delimited (HTTP/1.0)."""
        if self._started:
            raise RuntimeError("the answer has started already")
        if length is not None:
            framing = f"Content-Length: {length}\r\n"
        elif self.version == "1.1":
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            framing = ""
            self._close = True  # the body ends where the connection does (RFC 9112 §6.3 item 8)
        self._chunked = length is None and self.version == "1.1"
        conn = self._conn
        if not conn._lost:
            conn._transport.write(self._head(status, reason, headers, framing, date, fields))
        await conn._drain()

    async def write(
        self, data: bytes, *, timeout: float | None = None, on_full: Callable[[], None] | None = None
    ) -> None:
        """Write body bytes; wait while the client's buffer is full, at most `timeout` (TimeoutError).

        `on_full` is called before that wait (a proxy stops reading its source meanwhile).
        """
        conn = self._conn
        if conn._lost:
            raise ConnectionResetError("the client went away")
        if data and self.method != "HEAD":
            conn._transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        # The transport holds what the client has not taken yet (a copy): not holding `data`
        # too while waiting halves what a slow client costs.
        del data
        if conn._flow.paused and on_full is not None:
            on_full()
        await conn._drain(timeout)

    def write_now(self, data: bytes | memoryview) -> bool:
        """`write` without the wait, for a caller in a protocol callback (an upstream's read
        relayed as it comes; a memoryview is not kept past the call): returns whether the
        client's buffer is full, when the caller must stop passing more on and await `drain`.
        Nothing is written to a client gone."""
        conn = self._conn
        if conn._lost:
            return True  # `drain` then says the client went away
        if data and self.method != "HEAD":
            # The transport is left holding only what the client has not taken (`flow.send`):
            # what `Held` counts, while large reads are allowed, is then what is held.
            # (`data` may be a view of the upstream pool's read buffer: `send` copies what it keeps.)
            send(conn._transport, conn._fd, b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)  # type: ignore[str-format]  # (%b takes any buffer)
        flow = conn._flow
        if flow.paused:  # (a read's further pieces still come: `Held` counts them too)
            flow.pause(conn._transport.get_write_buffer_size())
            return True
        return False

    async def drain(self, timeout: float | None = None) -> None:
        """Wait while the client's buffer is full, at most `timeout` without it reading
        (TimeoutError); ConnectionResetError once the client has gone."""
        await self._conn._drain(timeout)

    async def finish(self) -> None:
        conn = self._conn
        if self._chunked and not conn._lost and self.method != "HEAD":
            conn._transport.write(b"0\r\n\r\n")
        self._finished = True
        await conn._drain()

    # A splice's target (upstream.py's `_Connection._try_splice`, splice.py): the rest of a
    # relayed answer's Content-Length body written to the client's socket by the kernel.

    def splice_fd(self) -> int:
        """The client's socket, when the rest of the answer's body may be spliced into it now:
        the head written and nothing of it held by the transport (what it holds must leave
        first), the body as it comes (not chunked, not to a HEAD), no other splice on the
        connection, the client not gone; else -1 (copy)."""
        conn = self._conn
        if (
            not self._started
            or self._chunked
            or self.method == "HEAD"
            or conn._lost
            or conn._fd < 0
            or conn._splice is not None
            or conn._answer_end is not None
            or conn._flow.paused
            or conn._transport.get_write_buffer_size()
            or conn._transport.is_closing()
        ):
            return -1
        return conn._fd

    def splice_began(self, end: Callable[[], None]) -> None:
        """`end` is called if the client's connection is lost while the splice lasts (`splice_over` stops that)."""
        self._conn._answer_end = end

    def splice_over(self) -> None:
        conn = self._conn
        conn._answer_end = None
        if conn._flow.paused and not conn._lost and not conn._transport.get_write_buffer_size():
            conn._flow.resume()  # (what `splice_blocked` paused: the transport holds nothing)

    def spliced(self, size: int) -> bool:
        """`size` bytes of the answer went to the client's socket; whether nothing more may be sent."""
        conn = self._conn
        flow = conn._flow
        if flow.paused:
            flow.resume()  # (what `splice_blocked` paused: the client takes bytes again)
        return conn._lost or conn._transport.is_closing()

    def splice_blocked(self) -> None:
        """The client takes nothing for now: the relay waits as for a full write buffer (`drain`,
        with its timeout), holding nothing in user space."""
        self._conn._flow.pause(0)

    def splice_failed(self, abort: bool) -> None:
        """Splicing into the client's socket failed (the client gone, or bytes lost with the
        pipe): the connection is cut, as a failed write cuts it."""
        self.abort()

    def abort(self) -> None:
        """Cut the connection: the client sees a truncated answer, never a spliced one."""
        self._close = True
        conn = self._conn
        if not conn._lost:
            conn._transport.abort()

    def done(self) -> None:
        """The end of a request whose handler returned a `Later`: the connection goes on to the next."""
        conn = self._conn
        conn._later = None
        conn._done(self)

    def carry_on(self, rest: Awaitable[None]) -> None:
        """The rest of a request whose handler returned a `Later`, as this connection's task from
        here on (as if the handler had returned `rest`): it is cancelled if the client goes
        away once it has begun, and the request is done when it ends."""
        conn = self._conn
        conn._later = None
        conn._task = conn._loop.create_task(conn._answer(self, rest))

    async def tunnel(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        sink: Callable[[bytes], None],
        source: AsyncIterator[bytes],
        *,
        fields: bytes = b"",
    ) -> None:
        """Answer an upgrade with `status` (101) and relay raw bytes both ways until either side ends.

        Client bytes (those already read after the request head first) go to `sink`, and b""
        once the client has half-closed (it sends nothing more: `sink` passes the half-close on);
        chunks from `source` go to the client, with back-pressure on both.
        """
        conn = self._conn
        if not self.upgrade or self._started:
            raise RuntimeError("not an upgrade request, or already answered")
        conn._transport.write(self._head(status, reason, headers, "", True, fields))
        self._finished = True
        self._close = True  # after the tunnel, the connection is done
        conn._tunnel_to(sink)
        try:
            async for data in source:
                if conn._lost:
                    break
                conn._transport.write(data)
                await conn._drain()
        finally:
            if not conn._lost:
                conn._transport.close()

    def pause_reading(self) -> None:
        """Stop reading from the client (a tunnel's other side cannot take more yet)."""
        self._conn._pause_reading()

    def resume_reading(self) -> None:
        self._conn._resume_reading()

    def send(self, answer: Prepared, field: str = "") -> None:
        """A prepared answer in one write, with one more header field (`"Name: value\\r\\n"`) and Date."""
        if self._started:
            self.abort()
            return
        conn = self._conn
        if (
            conn._closing
            or not self.keep_alive
            or self.upgrade
            or not self._complete
            or self._close
            or conn._server._draining
            or self.version != "1.1"
        ):
            end = self._connection_field(answer.status) + "\r\n"
        else:  # what `_connection_field` says for a request that keeps its connection, written out
            self._started = True
            self.status = answer.status
            end = "\r\n"
        self._finished = True
        if not conn._lost:
            date = _date  # (`_date_line`, written out: once per request)
            tail = (field + (date[1] if date[0] == int(time.time()) else _date_line()) + end).encode(_ENCODING, _ERRORS)
            conn._transport.write(answer.head + tail if self.method == "HEAD" else answer.head + tail + answer.body)

    def _connection_field(self, status: int) -> str:
        self._started = True
        self.status = status
        conn = self._conn
        if (
            conn._closing
            or not self.keep_alive
            or (self.upgrade and status != 101)
            or not self._complete
            or (conn._server._draining and conn._nothing_more())
        ):
            # Draining: the last answer we owe says so, so the client sends nothing more here.
            # An upgrade we did not take leaves the bytes after its head unparsed, and an
            # unread body leaves the framing unknown: neither connection can carry another request.
            self._close = True
        if self._close and status != 101:
            return "Connection: close\r\n"
        return "Connection: keep-alive\r\n" if self.version == "1.0" else ""

    def _head(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        framing: str,
        date: bool,
        fields: bytes = b"",
    ) -> bytes:
        parts = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n"]
        parts += [f"{name}: {value}\r\n" for name, value in headers]
        start = "".join(parts).encode(_ENCODING, _ERRORS)
        end = framing + (_date_line() if date else "") + self._connection_field(status) + "\r\n"
        return start + fields + end.encode(_ENCODING, _ERRORS)


_new_ahead = object.__new__
"""An `Ahead` made with no `__init__` call (`_Connection._ahead` sets its attributes)."""


class Ahead:
    """A request a `Quick` hook took on from its head (a forward prepared for its target), with
    no `Request` made: what the handler's side reads of one (`method`, `raw_path`, `fields`,
    `remote`, `scheme`, `content_length`, `status`, `transport`), and the one answer it can
    write as it is, `relay` (an upstream's answer held whole). It is first in the connection's
    queue, where a `Request` being answered is, so pipelined requests wait behind it as behind
    any other (reading paused). Anything else (another kind of answer, a task, a failure) first
    makes it the `Request` it stands for (`full`), in its place, as if the hook had returned
    False and the handler a `Later`. Its request was HTTP/1.1 kept alive, with no body and no
    upgrade, and nothing came before it (`Quick`). `done` ends it as `Request.done` ends a
    `Later`'s request. A `Request` made costs ~4.4k instructions, this ~2k (bench/FIGURES.md,
    "The forward from the head")."""

    scheme = "http"
    content_length = None
    body_exists = False
    upgrade = False
    keep_alive = True
    version = "1.1"
    _complete = True  # (what `_done` reads of a `Request`: no body, so complete)

    __slots__ = (
        "_close",
        "_conn",
        "_finished",
        "_full",
        "fields",
        "method",
        "raw_path",
        "remote",
        "status",
    )

    # Made by `_Connection._ahead` (`Quick`'s `take`), which sets these: `_conn`, `method`,
    # `raw_path`, `fields`, `remote`, `status` (0); `_close`, `_finished` and `_full` once answered
    # or made a `Request`.
    _conn: _Connection
    method: str
    raw_path: str
    fields: list[tuple[bytes, bytes]]
    remote: str | None
    status: int

    @property
    def transport(self) -> asyncio.Transport | None:
        conn = self._conn
        return None if conn._lost else conn._transport

    def relay(self, status: int, reason: bytes, fields: bytes, body: bytes, *, date: bool) -> None:
        """`Request.relay`, for a request kept alive with no body and no upgrade (its Connection
        field: `Request._connection_field`'s for one, with no request before it in the queue)."""
        conn = self._conn
        if self.status:  # (a second answer: cut, as `Request.relay` does)
            self.full().relay(status, reason, fields, body, date=date)
            return
        self.status = status
        close = self._close = conn._closing or (conn._server._draining and conn._nothing_more())
        if status in _BODILESS or status < 200:
            framing = b""
            body = b""
        else:
            framing = b"Content-Length: %d\r\n" % len(body)
            if self.method == "HEAD":
                body = b""
        head = b"HTTP/1.1 %d %b\r\n%b%b%b%b\r\n" % (
            status,
            reason or _REASON_BYTES.get(status, b"Unknown"),
            fields,
            framing,
            _date_bytes() if date else b"",
            b"Connection: close\r\n" if close and status != 101 else b"",
        )
        self._finished = True
        if not conn._lost:
            conn._transport.write(head + body if body else head)

    def full(self) -> Request:
        """The `Request` this stands for, made now (once), first in the connection's queue, with
        what was answered through this so far: from here on it is that request's connection
        state exactly (a `Later`'s request), and every answer `Request` writes is open to it."""
        if self.status < 0:
            return self._full
        conn = self._conn
        request = Request(conn, self.method, self.raw_path, "1.1", self.fields, True, False, None, False, False)
        if self.status:
            request.status = self.status
            request._started = request._finished = True
            request._close = self._close
        conn._queue[0] = request  # (in its place)
        self.status = -1  # (made: `done` and `relay` go to it)
        self._full: Request = request
        return request

    def _end(self, error: BaseException | None = None) -> None:
        """(`Request._end`: nothing to tell a request with no body)"""

    def hand_over(self, rest: Awaitable[None] | Later | None) -> None:
        """The handler's answer for this request after all (`rest`, as a `Handler` returns it),
        from within the `Quick` hook, which then returns True: made the `Request` it stands for
        (`full`), which goes on as `_dispatch` would have it go on (answered: done; a `Later`;
        or the rest, as the connection's task)."""
        request = self.full()
        conn = self._conn
        if rest is None:
            conn._done(request)
        elif isinstance(rest, Later):
            conn._later = rest
        else:
            conn._task = conn._loop.create_task(conn._answer(request, rest))

    def done(self) -> None:
        """`Request.done`: the connection goes on to the next request."""
        if self.status <= 0 or self._close:  # unanswered (cancelled, nothing written), made a `Request`, or closing
            self.full().done()
            return
        conn = self._conn
        conn._later = None
        conn._done(self)  # type: ignore[arg-type]  # (what `_done` reads of a `Request`: its end)


class _Relay:
    """A request body passed on from the connection's read callback (`Request.relay_body`):
    `on_body` hands each piece to `take`, a read's worth goes to the sink in one call, and the
    task that relays it is woken only when the sink is full, the body is over its limit, or
    the body ends (the connection's `_end`), never per read."""

    __slots__ = ("_deadlines", "_left", "_request", "_time", "_wakeup", "due", "extend", "full", "held", "over", "sink")

    def __init__(
        self, request: Request, sink: Callable[[bytes | memoryview], bool], limit: int, wakeup: Wakeup
    ) -> None:
        self._request = request
        self.sink: Callable[[bytes | memoryview], bool] | None = sink  # None once the relay has ended
        self._left = limit or _NO_LIMIT  # bytes the body may still bring
        self._wakeup = wakeup
        self._deadlines = request._conn._server._deadlines.waits
        self._time = request._conn._loop.time
        # Small pieces of this read, passed on together at its end (`flush`): views of the read
        # buffer among them are valid until then, and no longer (the read's end flushes them).
        self.held: list[bytes | memoryview] = []
        self.full = False  # the sink said it is full: the client is not read until the task has drained it
        self.over = False  # more than the limit came: nothing more is passed on
        self.extend = 0.0  # while the task waits for the client: its per-read timeout (moved by each read)
        self.due = _NEVER  # when the body's `total` runs out, during such a wait (loop time)

    def take(self, data: bytes | memoryview) -> None:
        """A piece of the body, as parsed or counted: once per read for a Content-Length body, so
        it is `pass_on` written out for a large piece (`sink` is never None while `on_body` or
        `_Connection._counted` calls this)."""
        size = len(data)
        left = self._left = self._left - size
        if left < 0:
            # Not passed on, nor anything after it: the task raises `BodyTooLarge`. The rest
            # is read (and held, up to the mark) as any body nobody takes.
            self.over = True
            self.held.clear()
            conn = self._request._conn
            if conn._relay is self:
                conn._relay = None
            self._request._wake()
        elif self.held or size < _BIG_PIECE:
            # A chunked body's small pieces: the end of the read passes them on in one call
            # (one write upstream, not one each).
            self.held.append(data)
            self._request._conn._flush = self
        elif self.sink(data):  # type: ignore[misc]
            self._full()
        elif self.extend:
            due = self._time() + self.extend
            self._deadlines[self._wakeup] = due if due < self.due else self.due

    def flush(self) -> None:
        """The end of a read: what `take` held, passed on as one piece."""
        held = self.held
        if held:
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            self.pass_on(data)

    def pass_on(self, data: bytes | memoryview) -> None:
        sink = self.sink
        if sink is None:
            return  # the relay has ended (it failed): nothing more goes on
        if sink(data):
            self._full()
        elif self.extend:
            # Bytes came: the wait for the next ones times out `timeout` from now (or when
            # the body's `total` runs out, if sooner), as `Wakeup.extend` does.
            due = self._time() + self.extend
            self._deadlines[self._wakeup] = due if due < self.due else self.due

    def moved(self, size: int) -> None:
        """`size` bytes of the body the kernel moved past the sink (a splice): counted against
        the limit, and the wait for the next ones moved as `pass_on` moves it."""
        self._left -= size
        if self.extend:
            due = self._time() + self.extend
            self._deadlines[self._wakeup] = due if due < self.due else self.due

    def _full(self) -> None:
        """The sink can take no more for now: the client is not read until the task has drained it."""
        self.full = True
        request = self._request
        request._conn._pause_reading()
        request._wake()


class Prepared:
    """An answer built once and sent many times (`Request.send`): status line, fixed header
    fields, Content-Length and body, already encoded."""

    __slots__ = ("body", "end", "head", "status")

    def __init__(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.body = body
        self.end = b"\r\n" + body
        """The end of the head and the body (what follows the varying fields: `_send_now`)."""
        self.head = "".join(
            [
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n",
                *(f"{name}: {value}\r\n" for name, value in headers),
                f"Content-Length: {len(body)}\r\n",
            ]
        ).encode(_ENCODING, _ERRORS)


class _Counted:
    """The rest of a Content-Length request body, counted rather than parsed: in the parser's
    place (`_Connection._parser`) from the end of the head (`on_headers_complete`) to the end of
    the body. llhttp would only count these bytes too, and hand `on_body` a copy of each read;
    here each piece goes on as it came (`_Connection._counted`: a view of the read buffer while
    a relay reads into it), with no copy (bench/FIGURES.md, "Uploads counted"). At the body's
    end, what llhttp does: `on_message_complete`, then what follows is parsed by a fresh parser
    (the old one waits for body bytes it will never be given) when the request keeps its
    connection, and judged as llhttp's `closed` state judges it when it does not (`_closed`).
    Chunked bodies are llhttp's, piece by piece (their framing is what must be parsed)."""

    __slots__ = ("_conn", "parser")

    def __init__(self, conn: _Connection, parser: httptools.HttpRequestParser) -> None:
        self._conn = conn
        self.parser = parser
        """llhttp's parser, which read the head and waits for the body."""

    def feed_data(self, data: bytes | memoryview) -> None:
        """`HttpRequestParser.feed_data` for the body's bytes and what follows them; raises what
        llhttp would for those (an upgrade's offset counted from the start of `data`)."""
        conn = self._conn
        conn._stalled = 0  # progress (as `on_body`)
        left = conn._left
        size = len(data)
        if size < left:
            conn._left = left - size
            conn._counted(data)
            return
        conn._left = 0
        conn._counted(data if size == left else data[:left])
        parser = conn._parser = self.after()
        conn.on_message_complete()
        if size > left:
            try:
                parser.feed_data(data[left:])
            except httptools.HttpParserUpgrade as error:
                raise httptools.HttpParserUpgrade(left + error.args[0]) from None

    def after(self) -> httptools.HttpRequestParser:
        """The parser for what follows the body, counted or spliced to its end: a fresh one
        when the request keeps its connection, else one in llhttp's `closed` state (`_closed`)."""
        return httptools.HttpRequestParser(self._conn) if self.parser.should_keep_alive() else _closed()


_NO_CALLBACKS = object()
"""The protocol of a parser that calls nothing back (`_closed`)."""


def _closed() -> httptools.HttpRequestParser:
    """A parser in llhttp's state after a request that does not keep its connection alive:
    CR and LF skipped, any other byte refused ("Data after `Connection: close`"), as the
    parser that read such a request would be after its body (`_Counted`)."""
    parser = httptools.HttpRequestParser(_NO_CALLBACKS)
    parser.feed_data(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return parser


class _Connection(asyncio.BufferedProtocol):
    """One client connection: its parser, its queue of requests, and the task answering one."""

    _counts_bodies = True
    """Whether a Content-Length body is counted (`_Counted`) or parsed by llhttp to its end
    (False: tests/unit/http/test_http1_counted.py's reference)."""

    def __init__(self, server: Server) -> None:
        self._server = server
        server._opening += 1  # until connection_made: the drain must wait for us too
        self._loop = server._loop
        self._parser = httptools.HttpRequestParser(self)
        self._send: Send = self._send_now  # (made once, not per request; let go in connection_lost)
        # (the same: `Quick`'s `take`)
        self._take: Callable[[str, str, list[tuple[bytes, bytes]]], Ahead] = self._ahead
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._remote: str | None = None
        self._fd = -1  # the socket (`connection_made`)
        self._lost = False
        self._closing = False
        self._eof = False  # the client shut its write side (`eof_received`): nothing more is read
        # the head being parsed
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._stalled = 0  # bytes fed since the parser last made progress (a head, body bytes, an end)
        self._unparsed = b""  # bytes held back while pipelined requests wait (at most one read)
        self._refusal = 0  # a status to answer once the requests before it are answered
        self._parsing: Request | None = None  # the request whose body the parser is reading
        self._left = 0  # bytes of its Content-Length body still to come (`_Counted`)
        self._relay: _Relay | None = None  # its body passed on as it is parsed (`Request.relay_body`)
        self._flush: _Relay | None = None  # a relay holding small pieces of the read being parsed
        self._target: Any = None  # where the relayed body may be spliced to (`_try_splice`)
        self._splice: _splice.Splice | None = None  # the body being spliced (reading is paused meanwhile)
        # An answer spliced into this socket (upstream.py) ends with the connection (its dup of
        # the socket must not outlive the transport's).
        self._answer_end: Callable[[], None] | None = None
        # requests in order: the first is being answered, the rest wait (pipelining)
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._later: Later | None = None  # the handler answers the first request from callbacks (`Later`)
        self._running = False  # the task has started (a task cancelled before that runs nothing)
        self._dispatching = False
        self._again = False
        self._upgraded = False
        self._held = bytearray()  # bytes after an upgrade request's head
        self._sink: Callable[[bytes], None] | None = None
        self._read_paused = False
        self._flow = WriteFlow(self._loop)
        # Both on `time.perf_counter()`'s clock, not the loop's: an answer's write reads it anyway
        # (the Date, the access log), and uvloop's `loop.time()` is a method call of ~230
        # instructions where `perf_counter()` is ~120 (bench/FIGURES.md, "The 401, session 10").
        self._idle_since: float | None = None  # waiting for a head since (perf_counter); None: busy
        self._head_begun: float | None = None  # the first byte of the head being parsed came (perf_counter)

    # asyncio.Protocol

    def _ahead(self, method: str, target: str, fields: list[tuple[bytes, bytes]]) -> Ahead:
        """`Quick`'s `take`: the `Ahead` of the request being asked about, being answered from
        now: first in the queue, as a `Request` being answered is. Made with no `__init__` call
        (a class called through a `partial` cost ~800 instructions more a request:
        bench/FIGURES.md, "The public route, session 10")."""
        ahead = _new_ahead(Ahead)
        ahead._conn = self
        ahead.method = method
        ahead.raw_path = target
        ahead.fields = fields
        ahead.remote = self._remote
        ahead.status = 0
        self._queue.append(ahead)  # type: ignore[arg-type]  # (what the queue reads of a `Request`: `_end`)
        return ahead

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        try:
            transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        except NotImplementedError:
            pass  # a transport with no write buffer of its own (bench/pipeline_micro.py's)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        self._server._opening -= 1
        self._server._connections.add(self)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1  # a relayed answer is written to it (`flow.send`)
        if self._server._filtered and sock is not None:
            _accept_handshakes(sock)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        # The parser holds our bound callbacks: without this the pair is a reference cycle,
        # and every closed connection (with the unfinished head the parser buffers) would
        # wait for a full garbage collection. Nothing is parsed after the connection is lost.
        self._parser = None  # type: ignore[assignment]
        self._send = None  # type: ignore[assignment]  # (the same: a bound method of ours)
        self._take = None  # type: ignore[assignment]
        self._server._connections.discard(self)
        self._server.counts.open -= 1
        self._cancel_timer()
        for request in self._queue:
            request._end(ConnectionResetError("the client went away"))
        # Requests refer to their connection: the queue and the body being read must let go
        # of them for the same reason (the one a task answers leaves the queue in `_done`).
        self._parsing = None
        if self._task is None and self._later is None:
            self._queue.clear()
        self._sink = None  # a tunnel's upstream side, which refers to its request
        if self._splice is not None:
            self._stop_splice()  # its dup must not keep the socket open
        end = self._answer_end
        if end is not None:
            self._answer_end = None
            end()  # (the same for an answer spliced into it)
        task = self._task
        if task is not None and not task.done() and self._running:
            task.cancel()  # the client went away: stop working for it (and its upstream request)
        later = self._later
        if later is not None:
            later.cancel()  # as a task is cancelled; it ends in `Request.done`
        self._flow.end()

    def eof_received(self) -> bool:
        """The client shut its write side (`shutdown(SHUT_WR)`: `nc -N`, HTTP/1.0 clients): it
        sends nothing more but may still read (RFC 9112 §9.6, §9.3). The requests it sent whole
        are answered, then the connection closes; True keeps the transport open for that. No
        more is read (the event loops stop reading at an end: `_resume_reading`)."""
        if self._eof:
            return True
        sink = self._sink
        if sink is not None:
            self._eof = True
            sink(b"")  # a tunnel: the half-close goes on to the upstream (`Request.tunnel`)
            return True
        # Requests wait behind another only while reading is paused (`on_headers_complete`), so
        # at an end the queue holds one request at most: the one being answered. Nothing queued
        # (idle, or a head cut short) or its body cut short (`_parsing`): closed now, as a client
        # that closed outright is (nothing answered, the handler cancelled).
        if not self._queue or self._parsing is not None or self._lost:
            return False
        # Owed an answer: it says `Connection: close` (if not begun yet), and the connection
        # closes after it (`_done`), as after any answer while `_closing`. A head begun after it
        # and cut short is dropped with the connection.
        self._eof = self._closing = True
        return True

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._relay is not None and HELD.bytes < HELD.limit:
            return self._server._big_buffer()
        return self._server._read_small

    def buffer_updated(self, nbytes: int) -> None:
        if self._relay is not None:
            # A relayed body's read is handled from the read buffer itself: counted (`_Counted`),
            # it goes to the relay's sink as a view, with no copy (bench/FIGURES.md, "Uploads
            # counted"); parsed, llhttp hands `on_body` bytes of its own; what `_feed` or
            # `_parse_failed` keep of it is copied (bench/FIGURES.md, "Bodies: fewer, larger reads").
            self.data_received(self._server._read_buffer[:nbytes])
        else:
            # bytes of their own: the read buffer is the next read's, and `data` may be kept.
            self.data_received(bytes(self._server._read_buffer[:nbytes]))

    def data_received(self, data: bytes | memoryview) -> None:
        if self._sink is not None:
            self._sink(data if type(data) is bytes else bytes(data))  # (a tunnel's side may keep it)
            return
        if self._upgraded:
            self._held += data
            if len(self._held) >= _UPGRADE_BUFFER:
                self._pause_reading()  # the answer to the upgrade is still being decided
            return
        if self._refusal or self._unparsed:
            self._unparsed += data  # only until reading pauses: at most one more read
            self._pause_reading()
            return
        size = len(data)
        if size <= _HEAD_SLICE and len(self._queue) < _BACKLOG:
            # One slice (a head, or a few pipelined ones): `_feed`'s loop for one turn, written
            # out (bench/FIGURES.md, "The 401 from the head").
            self._stalled += size
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserUpgrade, httptools.HttpParserError) as error:
                self._parse_failed(error, data, b"")
            else:
                if self._stalled > _MAX_STALL:
                    self._refuse(431)
        else:
            self._feed(data)
        relay = self._flush
        if relay is not None:  # the read's small body pieces, passed on together
            self._flush = None
            relay.flush()
        if self._target is not None and self._relay is not None:
            self._try_splice()  # this read's body bytes are passed on: the rest may be spliced
        # (`_dispatch` does nothing while a task or a `Later` answers (a body's reads, a request
        # forwarded from its head: bench/FIGURES.md, "The forwarded request, session 8"), nor
        # with nothing waiting: a `Quick` answered)
        if self._task is None and self._later is None and (self._queue or self._refusal):
            self._dispatch()

    def _feed(self, data: bytes | memoryview) -> None:
        """Parse `data` in slices, holding back the rest once enough requests wait their turn.

        llhttp parses all it is given: one 256 KiB read of tiny pipelined requests would
        become thousands of queued requests, each far larger than its bytes.
        """
        size = len(data)
        offset = 0
        while offset < size:
            if len(self._queue) >= _BACKLOG:
                self._unparsed = bytes(data[offset:])  # (a copy: `data` may be the read buffer)
                self._pause_reading()
                return
            # Heads in small slices (a slice of tiny requests is a few dozen of them), bodies in large.
            if self._parsing is None:
                step = _HEAD_SLICE
            else:
                step = _BODY_SLICE
                left = self._left
                if 0 < left < step and left < size - offset:
                    # A Content-Length body's slice ends where the body does: what follows is
                    # heads, parsed in `_HEAD_SLICE`s with the backlog checked and the bytes
                    # counted towards `_MAX_STALL` as any heads are (fed with the body, they were
                    # all queued at once: 6,209 from one 256 KiB read).
                    step = left
            piece = data if size <= step and not offset else data[offset : offset + step]
            offset += len(piece)
            # httptools holds a header or trailer field until it ends, and only then calls
            # on_header: an endless field is refused by what arrived, not by what was parsed.
            self._stalled += len(piece)
            try:
                self._parser.feed_data(piece)
            except (httptools.HttpParserUpgrade, httptools.HttpParserError) as error:
                self._parse_failed(error, piece, data[offset:])
                return
            if self._stalled > _MAX_STALL:
                self._refuse(431)
                return

    def _parse_failed(self, error: Exception, piece: bytes | memoryview, rest: bytes | memoryview) -> None:
        """The parser stopped in `piece` (`rest`: the bytes after it, not parsed): an upgrade
        (the bytes after its head are held), or a refusal."""
        if isinstance(error, httptools.HttpParserUpgrade):
            self._upgraded = True
            self._held += piece[error.args[0] :]  # (copied: `piece` may be the read buffer)
            self._held += rest
        elif isinstance(error, httptools.HttpParserCallbackError):
            # No local may hold the _Refuse after this: its traceback holds the callback's
            # frame, and the cycle (with `self` in it) would wait for a full garbage collection.
            self._refuse(error.__context__.status if isinstance(error.__context__, _Refuse) else 400)
        else:
            self._refuse(400)

    def pause_writing(self) -> None:
        self._flow.pause(self._transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._flow.resume()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._head_begun = perf_counter()  # `header_timeout` counts from here (`_sweep`'s clock)
        self._url = b""
        if self._fields:  # trailer fields of the request before (its own went with it)
            self._fields = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        # Usually one piece (b"" + url is url itself, no copy).
        url = self._url = self._url + url
        if len(url) > MAX_TARGET:
            raise _Refuse(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        total = self._head_size = self._head_size + size
        fields = self._fields
        if size > MAX_FIELD or total > MAX_HEAD or len(fields) >= MAX_FIELDS:
            raise _Refuse(431)
        fields.append((name, value))

    def on_headers_complete(self) -> None:
        # The head is complete: `header_timeout` and the keep-alive timer stop here; a body is
        # the handler's to wait for (`Request.iter_body`'s timeout and deadline).
        self._idle_since = self._head_begun = None  # (`_cancel_timer`, written out: once per request)
        self._stalled = 0
        parser = self._parser
        length: int | None = None
        chunked = expect = connection = False
        codings: list[bytes] | None = None
        hosts = 0
        for raw_name, raw_value in self._fields:
            size = len(raw_name)
            if size == 4 and (raw_name == b"Host" or raw_name.lower() == b"host"):  # (as most spell it: no lower())
                hosts += 1
            elif size == 14 and raw_name.lower() == b"content-length":
                length = int(raw_value)  # llhttp refused non-digits, signs, lists and duplicates
            elif size == 17 and raw_name.lower() == b"transfer-encoding":
                # llhttp refused a coding list that does not end in chunked (RFC 9112 §6.3: 400)
                # and chunked twice, but lets `gzip, chunked` through, on one line or two.
                codings = [raw_value] if codings is None else [*codings, raw_value]
            elif size == 6 and raw_name.lower() == b"expect":
                expect = raw_value.strip().lower() == b"100-continue"
            elif (size == 10 and raw_name.lower() == b"connection") or (
                size == 16 and raw_name.lower() == b"proxy-connection"  # (llhttp reads it as Connection)
            ):
                connection = True
        keep_alive = parser.should_keep_alive()
        # llhttp takes HTTP/0.9, 1.0, 1.1 and 2.0 (and refuses any other version). Without a
        # Connection or Proxy-Connection field it keeps a request's connection alive for 1.1 alone
        # (0.9, 1.0 and 2.0 only with `keep-alive` in one): then the version is 1.1 without asking for it
        # (`get_http_version` formats a str, ~2,300 instructions: bench/FIGURES.md, "The 401 from the head").
        version = "1.1" if keep_alive and not connection else parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Refuse(505)  # 0.9 has no headers to carry a token; 2.0 is not spoken here
        method = parser.get_method()
        if method == b"CONNECT":
            # A reverse proxy has no tunnels to offer, and a 2xx to a forwarded CONNECT would
            # turn a pooled upstream connection into one (RFC 9110 §9.3.6).
            raise _Refuse(400)
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise _Refuse(400)  # RFC 9112 §3.2: exactly one Host, or a 400
        if codings is not None:
            if version == "1.0":
                # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means its framing is faulty.
                raise _Refuse(400)
            listed = _codings(codings)
            if not listed or listed[-1] != b"chunked":
                # RFC 9112 §6.3: no length can be known (llhttp takes `xchunked` for chunked).
                raise _Refuse(400)
            if len(listed) > 1:
                # RFC 9112 §6.1: a coding we do not implement is a 501. We decode chunked and
                # nothing else: the upstream, told only `chunked`, would take gzip'd bytes
                # for the content.
                raise _Refuse(501)
            chunked = True
        upgrade = parser.should_upgrade()
        if upgrade and (chunked or length):
            # llhttp would hand the body to the upgraded protocol unread; a handshake has none.
            raise _Refuse(400)
        name = _METHOD_NAMES.get(method)
        if name is None:  # llhttp knows a few dozen methods: each is decoded once
            name = _METHOD_NAMES[method] = method.decode("ascii")
        target = self._url.decode(_ENCODING, _ERRORS)
        quick = self._server._quick
        if (
            quick is not None
            and keep_alive
            and version == "1.1"
            and length is None  # (a `Content-Length: 0` too goes the `Request` way: the `Ahead` has none)
            and not (chunked or upgrade)
            and not self._queue
            and not self._closing
            and not self._flow.paused
        ):  # (and no drain under way: `Server.start_drain` sets `_quick` to None)
            # Answered now or never by `quick`: nothing is queued or owed before it, and its
            # answer leaves the connection open (what `_dispatch`, `send` and `_done` would do);
            # or taken on (a `Later`, with its `Ahead`), answered later as a `Later`'s request is.
            try:
                answered = quick(name, target, self._fields, self._remote, self._send, self._take)
            except Exception:
                event(log, logging.ERROR, "handler_crashed", "request handler failed", exc_info=True)
                if self._queue:
                    # Taken on (`take`), then failed: what was written or sent for it stands, and
                    # the `Request` way would answer it a second time (the client would pair that
                    # with its next request). Fail closed: the parser stops here, and the refusal
                    # (a 500, then close) answers it if it was not, else what follows it.
                    if self._task is None and self._later is None:
                        self._queue.clear()  # (nothing goes on for it: never dispatched again)
                    raise _Refuse(500) from None
                answered = self._idle_since is not None  # (`_send_now` wrote the answer)
            if answered:
                if answered is not True:  # taken on: its `Later` ends it (`Ahead.done`)
                    self._later = answered
                self._fields = []
                return
        if len(self._queue) >= _MAX_QUEUED:
            # Past a chunked body's end, llhttp parses the rest of its `_BODY_SLICE` at once: heads
            # found there are queued with no `_BACKLOG` check between them (thousands from one
            # read). A client that pipelines this many behind a body is answered, then closed.
            raise _Refuse(429)
        request = Request(
            self,
            name,
            target,
            version,
            self._fields,
            keep_alive,
            upgrade,
            length,
            chunked,
            expect and version == "1.1",
        )
        # Trailer fields come through on_header too: they must never join the request's.
        self._fields = []
        queue = self._queue
        queue.append(request)
        if chunked or length:
            # A request without a body is complete already (llhttp ends its message at once):
            # on_message_complete has nothing to tell it.
            self._parsing = request
            if length:
                # (`_feed` ends the body's slice where the body does, either way.)
                self._left = length
                if self._counts_bodies:
                    # The rest of a Content-Length body is counted, not parsed (`_Counted`);
                    # llhttp goes on with this read (its `on_body` counts down `_left`).
                    self._parser = _Counted(self, parser)  # type: ignore[assignment]
        if len(queue) > 1:
            self._pause_reading()  # pipelined: read on when the requests before it are answered

    def _send_now(self, answer: Prepared, field: str, head: bool, now: float) -> None:
        """`Quick`'s `send`: `Request.send` on a request kept alive, then `_done`'s part for a
        connection that waits for its next head (`_idle`). `now`: `time.perf_counter()` as
        the caller read it last (the Date's second is told from it: `_date_at`)."""
        self._transport.write(
            b"".join(
                (
                    answer.head,
                    field.encode(_ENCODING, _ERRORS),
                    _date[2] if now < _date_until else _date_at(now),
                    b"\r\n" if head else answer.end,
                )
            )
        )
        self._idle_since = now  # (the clock `_sweep` reads)

    def on_body(self, body: bytes) -> None:
        self._stalled = 0
        self._left -= len(body)  # (what `_Counted` will not count: a chunked body's makes it negative, unread)
        relay = self._relay
        if relay is not None:
            relay.take(body)  # passed on from here (`Request.relay_body`)
            return
        request = self._parsing
        if request is not None:
            request._feed(body)
            if request._buffered > _HIGH_WATER:
                self._pause_reading()

    def on_message_complete(self) -> None:
        self._stalled = 0
        relay = self._relay
        if relay is not None:
            # The body ends here: what this read held goes on before the relay learns it
            # ended, and the next request's body (pipelined) is not this relay's.
            self._relay = self._flush = None
            relay.flush()
        request = self._parsing
        self._parsing = None
        if request is not None:
            parser: httptools.HttpRequestParser | _Counted = self._parser
            if type(parser) is _Counted:
                # llhttp reached the end of the body in the read its head came in: it parses on.
                self._parser = parser.parser
            request._end()

    def _counted(self, piece: bytes | memoryview) -> None:
        """`on_body` for a piece `_Counted` counted: a view of the read buffer is passed on as it
        is (a relay's sink keeps none: `Request.relay_body`), and copied only to be kept."""
        relay = self._relay
        if relay is not None:
            relay.take(piece)
            return
        request = self._parsing
        if request is not None:
            request._feed(piece if type(piece) is bytes else bytes(piece))
            if request._buffered > _HIGH_WATER:
                self._pause_reading()

    # a body spliced (splice.py; bench/FIGURES.md, "The upload spliced")

    def _try_splice(self) -> None:
        """Splice the rest of the relayed Content-Length body when everything allows it: the
        body's bytes read so far passed on (nothing held), the upstream's transport holding
        nothing (`_Upload.splice_fd`), the body within the relay's limit, a pipe free. Else
        nothing: the body goes on being copied, and this is asked again after the next read."""
        relay = self._relay
        left = self._left
        parser: httptools.HttpRequestParser | _Counted = self._parser
        if (
            relay is None
            or not _splice.ENABLED  # (turned off by a splice this kernel refused: copied from now on)
            or relay.full
            or relay.over
            or relay.held
            or self._splice is not None
            or left <= 0
            or type(parser) is not _Counted
            or relay._left < left
            or self._lost
            or self._fd < 0
            or self._transport.is_closing()
            or self._unparsed
            or self._refusal
            or self._upgraded
            or self._flush is not None
        ):
            return
        target = self._target
        splice = _splice.begin(
            self._loop, self._fd, target, left, self._spliced, self._splice_blocked, self._spliced_to
        )
        if splice is None:
            return
        self._splice = splice
        target.splice_began(self._splice_lost)
        self._pause_reading()  # the client's transport reads nothing of the body meanwhile
        splice.step()

    def _spliced(self, size: int) -> None:
        """`size` body bytes left the client's socket: counted as a read's are (`_Counted`, `_Relay.pass_on`)."""
        self._left -= size
        self._stalled = 0
        relay = self._relay
        if relay is not None:
            relay.moved(size)

    def _splice_blocked(self) -> None:
        """The upstream takes nothing for now: the task waits for it as for a full sink."""
        self._target.splice_blocked()
        relay = self._relay
        if relay is not None:
            relay._full()

    def _spliced_to(self, how: str) -> None:
        """The splice ended (its fds closed): the body's end, or what the copy path does next."""
        self._splice = None
        target = self._target
        if target is not None:
            target.splice_over()
        if how == "done":
            # What `_Counted.feed_data` does at the body's end; then what follows is read as any.
            self._parser = cast(_Counted, self._parser).after()
            self.on_message_complete()
            self._update_reading()
        elif how == "source":
            self._resume_reading()  # the transport's own read meets the end (or the failure)
        else:
            if target is not None and how != "stopped":
                target.splice_failed(how == "sink-error")
            relay = self._relay
            if relay is not None:
                relay._full()  # the task's drain says stop

    def _splice_lost(self) -> None:
        """The upstream's connection was lost mid-splice: nothing more is sent, as after a failed write."""
        if self._splice is not None:
            self._stop_splice()
            target = self._target
            if target is not None:
                target.splice_failed(False)
            relay = self._relay
            if relay is not None:
                relay._full()

    def _stop_splice(self) -> None:
        splice = self._splice
        self._splice = None
        if splice is not None:
            splice.close()
        target = self._target
        if target is not None:
            target.splice_over()

    # requests and answers

    def _refuse(self, status: int) -> None:
        """The parser stopped: answer `status` after the requests before it, then close."""
        self._refusal = status
        request = self._parsing
        self._parsing = None
        if request is not None:
            # (It may be gone from the queue already: answered at once while its body came.)
            if (
                self._queue
                and request is self._queue[-1]
                and (len(self._queue) > 1 or (self._task is None and self._later is None))
            ):
                # Its handler has not started: it never reaches the upstream; the refusal is its answer.
                self._queue.pop()
            else:
                request._end(BodyError(f"malformed request body ({status})"))
        self._pause_reading()

    def _dispatch(self) -> None:
        """Answer the first waiting request. The handler may answer at once (it returns None)
        or return what is left to do, which runs as this connection's task."""
        if self._dispatching:
            self._again = True  # called from _done below: the loop goes on instead of recursing
            return
        self._dispatching = True
        try:
            again = True
            while again:
                again = self._again = False
                if self._task is not None or self._later is not None or self._lost:
                    return
                if self._queue:
                    request = self._queue[0]
                    if self._flow.paused:
                        # The client is not reading our answers: wait for it before the next.
                        self._task = self._loop.create_task(self._answer(request, None))
                        return
                    try:
                        rest = self._server._handler(request)
                    except Exception:
                        event(log, logging.ERROR, "handler_crashed", "request handler failed", exc_info=True)
                        rest = None
                    if rest is not None:
                        if isinstance(rest, Later):
                            self._later = rest  # it calls `Request.done` (or `carry_on`) later
                            return
                        self._task = self._loop.create_task(self._answer(request, rest))
                        return
                    self._done(request)
                    again = self._again
                elif self._refusal:
                    self._write_refusal(self._refusal)
        finally:
            self._dispatching = False

    async def _answer(self, request: Request, rest: Awaitable[None] | None) -> None:
        """The rest of a request's handling (`rest`), or all of it after a drain (None)."""
        self._running = True
        later = False
        try:
            if self._lost and rest is None:
                return  # the client left before the handler was called: nothing is owed
            # A `rest` runs even when the client left before this task began: only the handler
            # knows what its `finally` owes and what must not be done for a client that is gone
            # (app.py sends nothing upstream then); `request.transport` is None to tell it.
            if rest is None:
                await self._drain()
                answer = self._server._handler(request)
                if isinstance(answer, Later):
                    later = True  # the handler ends it (`Request.done`), not this task
                    self._later = answer
                    return
                rest = answer
            if rest is not None:
                await rest
        except asyncio.CancelledError:
            pass
        except Exception:
            event(log, logging.ERROR, "handler_crashed", "request handler failed", exc_info=True)
        finally:
            self._running = False
            self._task = None
            if not later:
                self._done(request)

    def _done(self, request: Request) -> None:
        self._queue.popleft()
        if self._lost:
            self._queue.clear()  # pipelined requests never to be answered (see connection_lost)
            return
        if not request._finished or request._close or self._closing:
            if not request._started:
                # The handler answered nothing (it should always answer): fail closed.
                self._transport.write(_refusal(500, close=True))
            if not request._finished:
                self._transport.abort()  # an answer cut short must not look complete
            elif not request._complete or self._queue or self._parsing is not None or self._unparsed:
                self._linger()  # its body unread, or more sent behind it: the client may still be sending
            else:
                self._transport.close()
            return
        if self._upgraded and not self._queue:
            # The upgrade request was answered without a tunnel: bytes sent after its head
            # (frames sent ahead of the 101) say the client may still be sending.
            if self._held:
                self._linger()
            else:
                self._transport.close()
            return
        if self._unparsed and not self._refusal and len(self._queue) < _BACKLOG:
            held, self._unparsed = self._unparsed, b""
            self._feed(held)
        if self._read_paused:  # (`_update_reading` does nothing otherwise)
            self._update_reading()
        if self._queue or self._refusal:  # (`_dispatch` has nothing to do otherwise)
            self._dispatch()
            if self._queue or self._refusal:
                return
        if self._closing:  # `_idle`, written out: once per request
            self._transport.close()
        else:
            self._idle_since = perf_counter()

    def _write_refusal(self, status: int) -> None:
        self._transport.write(_refusal(status, close=True))
        self._linger()  # the parser stopped where the client was: it may still be sending
        if self._server._on_refusal is not None:
            try:
                self._server._on_refusal(status, self._remote)
            except Exception:  # counting a refusal must never fail the connection's teardown
                event(log, logging.ERROR, "handler_crashed", "recording a refused request failed", exc_info=True)

    def _tunnel_to(self, sink: Callable[[bytes], None]) -> None:
        held = bytes(self._held)
        self._held.clear()
        self._sink = sink
        if held:
            sink(held)
        if self._eof:
            sink(b"")  # the client half-closed before the 101: the upstream is told at once
        self._resume_reading()

    def _linger(self) -> None:
        """Close after an answer while the client may still be sending (a refusal, an upload
        refused before its body was read): RFC 9112 §9.6's lingering close. Closing at once with
        its bytes unread makes the kernel reset the connection, and a client that sends its
        whole body before reading (most do) then fails on the reset and never reads the answer.
        So: the write side is shut first (the answer, then our end), and what the client still
        sends is read and dropped (`_Linger`) until it closes, or for `LINGER_TIME` seconds or
        `LINGER_BYTES` bytes, whichever first. The requests are over by then: no handler, no
        timer of ours but `_Linger`'s; the connection is still open and counted so until closed."""
        transport = self._transport
        if self._eof or self._lost or transport.is_closing():
            transport.close()  # (the client sends nothing more, or it is gone)
            return
        self._idle_since = self._head_begun = None  # (no keep-alive or head deadline: `_Linger`'s bound)
        if self._splice is not None:
            self._stop_splice()
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        transport.set_protocol(_Linger(self))
        transport.resume_reading()  # (paused where the parser stopped)

    # flow control and timers

    def _pause_reading(self) -> None:
        if not self._read_paused and not self._lost:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        # (Never after an end: uvloop's stream must not read again, asyncio's would see it again.)
        if self._read_paused and not self._lost and not self._eof:
            self._read_paused = False
            self._transport.resume_reading()

    def _body_taken(self) -> None:
        if self._read_paused:
            self._update_reading()

    def _update_reading(self) -> None:
        # Read on unless: a request waits behind another (pipelining; the first one's body
        # is complete by then), a body is buffered past the mark, the parser has stopped,
        # or the bytes after an upgrade head are being held.
        parsing = self._parsing
        if (
            len(self._queue) > 1
            or self._refusal
            or self._unparsed
            or (self._upgraded and self._sink is None)
            or (parsing is not None and parsing._buffered > _HIGH_WATER)
            or (self._relay is not None and self._relay.full)
            or self._splice is not None
        ):
            return
        self._resume_reading()

    async def _drain(self, timeout: float | None = None) -> None:
        """Wait while the client's buffer is full, at most `timeout` without it reading (TimeoutError)."""
        if not await self._flow.drain(timeout or None):
            raise ConnectionResetError("the client went away")

    def _idle(self) -> None:
        """Waiting for a request head: the server's sweep closes us if none completes in time."""
        if self._closing:
            self._transport.close()
        else:
            self._idle_since = perf_counter()

    def _cancel_timer(self) -> None:
        self._idle_since = None

    def _head_expired(self) -> None:
        """A head began and did not complete within `header_timeout`: 408, then close
        (RFC 9110 §15.5.9), counted like any request the parser refused."""
        self._idle_since = self._head_begun = None
        if self._lost or self._refusal or self._transport.is_closing():
            return
        self._refusal = 408
        self._pause_reading()
        self._write_refusal(408)

    def _nothing_more(self) -> bool:
        """Draining: whether no byte of a request after the one being answered has come,
        neither parsed nor waiting in the socket (then this connection may close after it)."""
        return (
            len(self._queue) <= 1
            and self._head_begun is None
            and not self._unparsed
            and not self._lost
            and not _readable(self._transport)
        )

    def _shut_if_idle(self, idle_before: float) -> None:
        """Draining: close if waiting for a head since before `idle_before`, with no byte of one."""
        since = self._idle_since
        if (
            since is not None
            and since <= idle_before
            and self._task is None
            and self._later is None
            and not self._queue
            and not self._refusal
            and not self._upgraded
            and self._nothing_more()
        ):
            self._closing = True
            self._transport.close()


class _Linger(asyncio.BufferedProtocol):
    """A connection's protocol once it lingers (`_Connection._linger`): reads are dropped, and the
    connection closes at the client's end, after `LINGER_TIME` or past `LINGER_BYTES`. Its own
    protocol, so that no read callback of `_Connection`'s asks whether it lingers."""

    __slots__ = ("_conn", "_left", "_timer")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._left = LINGER_BYTES
        self._timer = conn._loop.call_later(LINGER_TIME, self._end)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn._server._read_buffer  # (dropped: any connection's next read may overwrite it)

    def buffer_updated(self, nbytes: int) -> None:
        self._left -= nbytes
        if self._left <= 0:
            self._end()

    def eof_received(self) -> bool:
        return False  # the client is done: the transport closes

    def pause_writing(self) -> None:
        pass  # (nothing more is written)

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._conn.connection_lost(exc)

    def _end(self) -> None:
        """A bound reached: closed, with what the client sends still unread (the reset comes now).
        An answer the client has not taken in all that time is dropped (a close would wait for it)."""
        self._timer.cancel()
        transport = self._conn._transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


def _readable(transport: asyncio.Transport) -> bool:
    """Whether the socket holds bytes (or an end) we have not read yet; asked only while draining."""
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


# A classic BPF program of one instruction, `ret #0`: every packet to the socket is dropped.
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)


def _refuse_handshakes(sock: socket.socket) -> None:
    """Let no new connection complete on this listening socket (Linux; elsewhere a no-op).

    A dropped SYN is sent again by the client about a second later, when the socket is
    closed and the kernel refuses it (or, with SO_REUSEPORT, another process takes it): the
    client never holds a connection we would reset.
    """
    if not hasattr(socket, "AF_PACKET"):  # not Linux: SO_ATTACH_FILTER means something else, if anything
        return
    import ctypes

    program = ctypes.create_string_buffer(_DROP_ALL)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, struct.pack("HL", 1, ctypes.addressof(program)))
    except OSError:
        pass


def _accept_handshakes(sock: socket.socket) -> None:
    """Undo `_refuse_handshakes` on a connection accepted from that socket.

    A connection whose handshake completed just as the filter went on inherits it (the
    kernel copies a listener's filter to the connections it makes): its packets would be
    dropped. Once detached, the client's TCP sends them again and the request arrives.
    """
    if hasattr(socket, "AF_PACKET"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError:  # ENOENT: it has no filter, the usual case
            pass


def _refusal_body(status: int) -> bytes:
    return (
        # A head that did not arrive in time says what a body that did not (forward.py's
        # RequestTimeout) says: one 408, one error code (errors.py's phrase for header_timeout).
        '{"error":"request_timeout","error_description":"The request head did not arrive in time"}'
        if status == 408
        else f'{{"error":"invalid_request","error_description":"{_REASONS.get(status, "Bad Request")}"}}'
        if status < 500 or status in (501, 505)
        else '{"error":"server_error","error_description":"Internal error"}'
    ).encode()


# The bodies of the statuses this module refuses with, built once: a fixed table, not a memo
# (its keys are this module's own status codes, so it cannot grow).
_REFUSALS = {status: _refusal_body(status) for status in (400, 408, 414, 431, 500, 501, 505)}


def _refusal(status: int, *, close: bool) -> bytes:
    body = _REFUSALS.get(status) or _refusal_body(status)
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Cache-Control: no-store\r\nServer: jwt-sidecar\r\nContent-Length: {len(body)}\r\n{_date_line()}"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body


class ConnectionCounts:
    """Client connections as plain numbers, kept by a `Server` and read by the metrics."""

    __slots__ = ("open", "rejected")

    def __init__(self) -> None:
        self.open = 0
        """Accepted and not yet closed (those being accepted included)."""
        self.rejected = 0
        """Closed at accept because `max_connections` were open."""


class _Rejected(asyncio.Protocol):
    """A connection over `max_connections`: closed as soon as it is accepted, nothing read.

    A reset (SO_LINGER 0) rather than a FIN: no TIME_WAIT socket is left behind for each
    one, and the client learns at once that it must go elsewhere or retry."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # gone already: closing it is all that is left to do
        # A server connection's transport is always a full Transport (BaseTransport is only
        # what the Protocol interface declares).
        cast(asyncio.Transport, transport).abort()


class Server:
    """The listener(s) and every open connection, with a graceful `shutdown`."""

    def __init__(
        self,
        handler: Handler,
        *,
        keepalive_timeout: float = 75.0,
        header_timeout: float = 10.0,
        max_connections: int | None = None,
        counts: ConnectionCounts | None = None,
        on_refusal: Callable[[int, str | None], None] | None = None,
        quick: Quick | None = None,
    ) -> None:
        """`on_refusal(status, client)` is told of every request the parser refused (it never
        reached `handler`), so that metrics and the access log can count it.

        `keepalive_timeout`: how long a connection may wait, sending nothing, for its next
        request (the first one included). `header_timeout`: how long a request head may take
        from its first byte to its end (then 408 and close). `max_connections`: connections
        over it are closed at accept (None: no limit); `counts` keeps the open and rejected
        numbers for the metrics. `quick`: asked first, for a request it may answer from its
        head alone (see `Quick`)."""
        self._handler = handler
        self._on_refusal = on_refusal
        self._quick = quick
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.counts = counts if counts is not None else ConnectionCounts()
        self._loop = asyncio.get_running_loop()
        self._connections: set[_Connection] = set()
        self._listeners: list[asyncio.Server] = []
        # Every connection's reads land here and are handled at once (one event loop thread):
        # `_read_small` for a read, all of it (`_BIG_READ`, made on first use) for a relayed body's.
        self._read_buffer = self._read_small = memoryview(bytearray(_READ_SIZE))
        # One timer for every connection's keep-alive and head deadlines, rather than one per
        # request (a TimerHandle made and cancelled per request was 3% of a refused request's time).
        # At most every 10 ms whatever the timeouts: a `header_timeout: 1us` would otherwise re-arm
        # the sweep on every loop turn and spin the CPU (its deadlines are kept to within 10 ms).
        self._sweep_every = max(0.01, min(1.0, keepalive_timeout / 4, header_timeout / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        self._deadlines = Deadlines(self._loop)  # the timeouts of every wait for request body bytes
        self._draining = False
        self._opening = 0
        """Connections accepted, their protocol made, but not yet `connection_made` (the loop
        does that a step or two later): a drain that ended without them would drop them."""
        self._filtered = False  # the listening sockets refuse handshakes (see _stop_accepting)

    def _big_buffer(self) -> memoryview:
        """The read buffer, `_BIG_READ` long (made on first use: a process that relays no body
        never holds it), its first `_READ_SIZE` bytes being `_read_small`."""
        buffer = self._read_buffer
        if len(buffer) < _BIG_READ:
            buffer = self._read_buffer = memoryview(bytearray(_BIG_READ))
            self._read_small = buffer[:_READ_SIZE]
        return buffer

    def _accept(self) -> asyncio.BaseProtocol:
        # Counted here, not in connection_made: asyncio accepts up to `backlog` connections in
        # one loop turn and makes each protocol before any of them is told it is connected.
        counts = self.counts
        limit = self.max_connections
        if limit is not None and counts.open >= limit:
            counts.rejected += 1
            return _Rejected()
        counts.open += 1  # connection_lost takes it off again
        return _Connection(self)

    async def listen(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        backlog: int = 1024,
    ) -> None:
        """Serve on `host:port`, or on `sock`, a socket already bound (startup.py binds first)."""
        # Either host and port or sock: asyncio refuses any other mix, which typeshed's two
        # overloads cannot say for arguments that may each be None (hence a dict of Any).
        where: dict[str, Any] = {"host": host, "port": port, "sock": sock}
        listener = await self._loop.create_server(self._accept, **where, backlog=backlog, reuse_port=reuse_port or None)
        self._listeners.append(listener)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        """Close connections that have waited longer than `keepalive_timeout` for a request
        head to begin, and answer 408 to those whose head began longer than `header_timeout`
        ago (counted from when the connection last had nothing to do, if that is later: the
        head of a request sent while the one before it was being answered)."""
        now = perf_counter()  # (the clock of `_idle_since` and `_head_begun`)
        idle_deadline = now - self.keepalive_timeout
        head_deadline = now - self.header_timeout
        idle: list[_Connection] = []
        slow: list[_Connection] = []
        for conn in self._connections:
            since = conn._idle_since
            if since is None:
                continue
            begun = conn._head_begun
            if begun is None:
                if since <= idle_deadline:
                    idle.append(conn)
            elif max(begun, since) <= head_deadline:
                slow.append(conn)
        for conn in idle:
            conn._idle_since = None
            conn._transport.close()
        for conn in slow:
            conn._head_expired()
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    async def _stop_accepting(self) -> None:
        """Close the listeners without resetting the connections their queues hold.

        Closing a listening socket resets every connection the kernel completed but we have
        not accepted yet, and their clients may have sent a request already; asyncio also
        drops a connection it accepted but had not yet made a transport for. So: stop new
        handshakes (`_refuse_handshakes`), stop the loop accepting, let the accepts under way
        finish, keep each socket open through a duplicate while the listener closes, then
        accept what the queue still holds and serve it like any other connection.
        """
        self._filtered = True
        held: list[socket.socket] = []
        for listener in self._listeners:
            for sock in listener.sockets:
                try:
                    dup = socket.socket(fileno=os.dup(sock.fileno()))
                except OSError:
                    continue
                _refuse_handshakes(dup)
                held.append(dup)
                self._loop.remove_reader(dup.fileno())  # same socket: the loop's accept callback goes
        loop = self._loop
        began = loop.time()
        for _ in range(3):  # an accept's task makes the protocol, then the loop calls connection_made
            await asyncio.sleep(0)
        # (An accept whose transport failed never reaches connection_made: a second at most.)
        while self._opening > 0 and loop.time() < began + 1.0:
            await asyncio.sleep(0.001)
        for listener in self._listeners:
            listener.close()
        queued: list[socket.socket] = []
        for dup in held:
            dup.setblocking(False)
            while True:
                try:
                    conn, _ = dup.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                conn.setblocking(False)
                _accept_handshakes(conn)
                queued.append(conn)
            dup.close()
        # Adopted before the drain goes on, so that it waits for them like for any other.
        await asyncio.gather(*(self._adopt(conn) for conn in queued))

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._accept, sock)  # counted, and limited, like any accept
        except OSError:
            sock.close()

    @property
    def sockets(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for listener in self._listeners for s in listener.sockets]

    def start_drain(self) -> None:
        """From now on each connection's last answer carries `Connection: close` (still accepting)."""
        self._draining = True
        self._quick = None  # a `Quick` answer leaves the connection open: none while draining

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting (serving what the listen queue holds), give connections `timeout`, cut the rest.

        No request whose first byte has arrived is dropped: a connection closes after an
        answer that said `Connection: close`, or once it has been idle `_DRAIN_IDLE` seconds
        with nothing to read. Only what is left at the deadline is cut.
        """
        self.start_drain()
        await self._stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        loop = self._loop
        deadline = loop.time() + timeout
        idle = min(_DRAIN_IDLE, timeout)
        while self._connections and loop.time() < deadline:
            idle_before = perf_counter() - idle  # (`_idle_since`'s clock)
            for conn in list(self._connections):
                conn._shut_if_idle(idle_before)
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn._transport.abort()
        await asyncio.sleep(0)  # let the cancelled handlers run their `finally`
        if not self._deadlines.waits:
            self._deadlines.close()
        for listener in self._listeners:
            await listener.wait_closed()
