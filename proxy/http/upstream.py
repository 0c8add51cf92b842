"""A small pooled HTTP/1.1 client for the upstream: one `asyncio.BufferedProtocol` per connection, parsed by httptools.

Owns: per-origin pools of idle keep-alive connections (LIFO reuse, a cap, an idle timeout);
writing one request (the head in one write, the body streamed with `Content-Length` or
chunked, awaiting the transport's drain; or written from its source's own read callback, a
`BodySource`, the task waiting only while the transport's buffer is full; into a plain-TCP
socket, the rest of a Content-Length body may be spliced by the source's side, counted by
`_Upload` as its writes are, the connection's loss ending the splice); parsing the answer with llhttp (through
`httptools.HttpResponseParser`): 1xx interim answers skipped, bodiless answers (HEAD, 204,
304) recognised, chunked and close-delimited bodies, any other transfer coding refused,
a chunked answer's trailer fields dropped (never merged into its head, RFC 9110 §6.5.1);
an answer whose head is byte for byte the last common one llhttp parsed from its origin,
whole with its Content-Length body in one read, taken again without llhttp (`_Head`: one
`startswith` where llhttp's callbacks cost ~23,000 instructions, and a parser of our own in
Python measured no cheaper than llhttp: bench/FIGURES.md, "The answer's head again");
keeping one client's answer from another: a connection whose answer's framing is in doubt
is never reused, a byte no request asked for closes it and makes its origin distrusted
(no reuse for `_DISTRUST`), an idle socket is checked for unread bytes before reuse, and a
new origin is on probation (`_PROBATION`); flow control both ways (reads of 16 KiB into one
buffer per pool, reading paused at 16 KiB buffered or when the consumer asks, a 4 KiB write
buffer for request bodies; the waits are flow.py's, their timeouts on one timer per pool);
relaying a body from the read callback to a consumer's sink (`Response.relay`; the rest of a
Content-Length body from a plain-TCP socket, `splice.ANSWER_MIN` or more, spliced into the
consumer's `target` socket once it holds nothing, `_Connection._try_splice`, the connection
back to the pool only once exactly the body has moved); a request
with no body sent on an idle connection and its answer awaited by no task (`Pool.send`: the
consumer is called from the read callback, the read timeout is the same pool timer); the one retry
RFC 9112 §9.3.1 allows (an idempotent, body-less request whose reused connection the server
closed before answering); and the client's failure vocabulary: `UpstreamConnectError`
(nothing was sent: refused, unreachable, connect timeout), `UpstreamProtocolError`, builtin
`TimeoutError` (the request was sent and the answer did not come in time).
Does not own: which headers are sent (the caller strips hop-by-hop ones and injects identity;
only framing is ours: Host when absent, Content-Length or Transfer-Encoding), redirects,
cookies, decompression, proxies, upgrades and WebSockets (a `101` is a protocol error
here), HTTP statuses of our own (forward.py maps the errors), or any knowledge of JWTs.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import select
import ssl
import termios
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from functools import partial
from typing import Any

import httptools

from . import splice as _splice
from .causes import Worded, cause
from .flow import HELD, Deadlines, Wakeup, WriteFlow, send
from .log import event

__all__ = [
    "BodySource",
    "Fields",
    "InFlight",
    "Pool",
    "Response",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "checked_head",
    "connect_host",
    "encode_head",
]


class UpstreamError(Worded):
    """The upstream exchange failed; forward.py answers 502 (or aborts once the answer started)."""


class UpstreamConnectError(UpstreamError):
    """No answer at all: refused, unreachable, no connection within the connect timeout, DNS
    or TLS failure, or reset before the first byte of the answer."""


class UpstreamProtocolError(UpstreamError):
    """The answer was malformed, cut short, or asked to switch protocols."""


# RFC 9110 §9.2.2: only these may be replayed without the client's consent (RFC 9112 §9.3.1).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Flow control of the answer: stop reading the socket once this much body waits for the
# consumer, so a slow client never makes us buffer a large upstream answer (the kernel's
# socket buffers and TCP's window then push back on the upstream). forward.py also stops
# reading while the client's own buffer is full (`Response.pause_reading`). `read` lifts the
# mark to its limit (64 KiB): an answer it waits for is known to fit.
_HIGH_WATER = 16 * 1024
# The most bytes one read takes from an upstream socket: reads go into one buffer per pool
# (`asyncio.BufferedProtocol`), so a paused answer holds at most the mark plus one read,
# where the event loop's own reads are up to 256 KiB each.
_READ_SIZE = 16 * 1024
# While an answer is relayed to a consumer (`Response.relay`) and the write buffers of paused
# transports hold less than flow.py's `HELD.limit`, reads take up to this much: a recv and a
# send per 256 KiB rather than per 16 KiB (bench/FIGURES.md, "Bodies: fewer, larger reads").
_BIG_READ = 256 * 1024
_READ_LIMIT = 64 * 1024  # the most `read` waits for
# The upstream transport's write buffer (a request body) beyond which the sender waits.
WRITE_HIGH_WATER = 4 * 1024
# The most bytes taken while the answer's head (with any 1xx before it) is incomplete; one
# read that also holds the start of the body may exceed it, so it is checked before parsing.
_MAX_HEAD = 256 * 1024
_DEFAULT_PORT = {"http": 80, "https": 443}
# len("Host"), len("Content-Length"), len("Transfer-Encoding"): only names of these lengths
# are lower-cased and compared, in the request's hot loop.
_SPECIAL_LENGTHS = frozenset({4, 14, 17})
_ENCODING = "utf-8"
# http1.py decodes header bytes as UTF-8 with surrogateescape (as aiohttp does): encoding the
# same way hands the upstream exactly the bytes the client sent, and decoding the answer the
# same way gives the client back exactly the upstream's bytes.
_ERRORS = "surrogateescape"
# After an origin sends a byte no request asked for (bytes after a complete answer, a body
# after a bodiless one), none of its connections is reused for this long: such bytes can
# arrive after the connection has carried the next request, where nothing tells them from
# its answer (one user's answer to another). Every request then has a connection of its own.
_DISTRUST = 60.0
# Until one of its connections has sat idle this long after an answer with no stray byte, an
# origin is on probation: a connection is reused only once it has been idle this long, so an
# upstream that sends such bytes (up to this late) after every answer is caught before any
# reuse (and distrusted), not after the first connections in flight have crossed. It costs a
# well-behaved origin new connections for its first ~0.1 s of traffic, then nothing.
_PROBATION = 0.1
log = logging.getLogger("jwt_sidecar.upstream")


class BodySource:
    """A request body that passes itself on from its own read callback, rather than being
    iterated by the sending task (http1's `Request.relay_body`, through forward.py).

    `relay(sink, drain)` calls `sink(data)` for each piece as it comes (bytes, or a view of a
    read buffer valid during the call only: `sink` copies what it keeps); `sink` returns True
    when the upstream cannot take more for now (or wants nothing more), and then the source
    stops reading until `await drain()` has returned True (False: stop, the rest unsent).
    It returns True once the whole body has gone to `sink`, False when it stopped early;
    what it raises propagates unchanged."""

    __slots__ = ()

    def relay(
        self,
        sink: Callable[[bytes | memoryview], bool],
        drain: Callable[[], Awaitable[bool]],
        target: Any = None,
    ) -> Awaitable[bool]:
        """`target`: a plain-TCP upstream's `_Upload`, into whose socket the body may be spliced
        (http1's `Request.relay_body`); None: never."""
        raise NotImplementedError


class Fields:
    """A request's header lines, encoded: each `Name: value\r\n`, and none of them
    Content-Length or Transfer-Encoding (the body's framing is the pool's to write)."""

    __slots__ = ("count", "has_host", "lines")

    def __init__(self, lines: bytes, count: int, *, has_host: bool) -> None:
        self.lines = lines
        self.count = count
        """How many lines `lines` holds: the head's CR/LF check counts on it."""
        self.has_host = has_host

    @classmethod
    def of(cls, headers: Iterable[tuple[str, str]]) -> Fields:
        """`headers` in order, less any Content-Length or Transfer-Encoding."""
        # One str join and one encode: faster than a b"".join of per-piece encodes (bench/FIGURES.md).
        parts = []
        has_host = False
        for name, value in headers:
            if len(name) in _SPECIAL_LENGTHS:
                lower = name.lower()
                if lower == "host":
                    has_host = True
                elif lower == "content-length" or lower == "transfer-encoding":
                    continue
            parts.append(f"{name}: {value}\r\n")
        return cls("".join(parts).encode(_ENCODING, _ERRORS), len(parts), has_host=has_host)

    @classmethod
    def of_bytes(cls, headers: Iterable[tuple[bytes, bytes]], ours: Iterable[tuple[bytes, bytes]] = ()) -> Fields:
        """`of` for pairs already in bytes: `headers` (a client's fields passed on as it sent
        them) less any Content-Length or Transfer-Encoding, then `ours`, pairs whose names the
        caller writes itself and vouches are none of Host, Content-Length, Transfer-Encoding.
        One `b": ".join` per pair and one `b"\\r\\n".join`: the cheapest bytes encoding
        measured (bench/FIGURES.md)."""
        lines: list[bytes] = []
        has_host = False
        for pair in headers:
            if len(pair[0]) in _SPECIAL_LENGTHS:
                lower = pair[0].lower()
                if lower == b"host":
                    has_host = True
                elif lower == b"content-length" or lower == b"transfer-encoding":
                    continue
            lines.append(b": ".join(pair))
        lines += map(b": ".join, ours)
        lines.append(b"")  # the last line's CRLF
        return cls(b"\r\n".join(lines), len(lines) - 1, has_host=has_host)


def connect_host(host: str) -> str | bytes:
    """`host` as a resolver and the event loop are given it: ASCII bytes when it is ASCII. Given
    a str, they encode it with the "idna" codec, whose import (encodings.idna, stringprep,
    unicodedata) was 0.1-0.2 MiB of every process that makes no TLS connection (`ssl` encodes a
    server_hostname with it, and uvloop takes only a str there: bench/FIGURES.md, "yarl and
    multidict"). For an ASCII name that codec changes nothing, only refusing an empty label or
    one of more than 63 characters with a UnicodeError, where the resolver's refusal is an
    OSError (a DNS failure). A name outside ASCII stays a str, for the codec to encode."""
    return host.encode("ascii") if host.isascii() else host


def encode_head(method: str, target: str, fields: Fields, host_line: bytes, framing: bytes) -> bytes:
    """A request head: the request line, `fields`, `host_line` when they hold no Host, then
    `framing` (whole lines)."""
    host = b"" if fields.has_host else host_line
    head = b"".join(
        (f"{method} {target} HTTP/1.1\r\n".encode(_ENCODING, _ERRORS), fields.lines, host, framing, b"\r\n")
    )
    return checked_head(head, 2 + fields.count + (0 if fields.has_host else 1) + framing.count(b"\n"))


def checked_head(head: bytes, lines: int) -> bytes:
    """`head`, which its writer made of `lines` lines (the blank one that ends it included),
    or `ValueError`: every line must end in exactly one CRLF. A CR or LF inside a method,
    target, name or value (a claim rendered into a header, say) would split the message,
    RFC 9112 §2.2 and §11.2 (request smuggling). Two C-speed counts check them all at once."""
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("CR or LF inside the request line or a header")
    return head


class _Wakeup(Wakeup):
    """A connection's `Wakeup`, whose timeout also ends a wait no task makes: an answer awaited
    from the connection's callbacks (`Pool.send`), when `conn` is set (only then: it and the
    connection refer to each other)."""

    __slots__ = ("conn",)

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines | None) -> None:
        super().__init__(loop, deadlines)
        self.conn: _Connection | None = None

    def _expire(self) -> None:
        conn = self.conn
        if conn is not None:
            conn._expired()
        else:
            super()._expire()


class _Origin:
    """What one (scheme, host, port) shares: its idle connections and its default Host line."""

    __slots__ = ("address", "distrusted_until", "head", "host", "host_line", "idle", "misses", "port", "proven", "tls")

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.host = host.strip("[]")  # connect with the bare address; the Host line keeps brackets
        self.address = connect_host(self.host)
        self.port = port
        self.tls = scheme == "https"
        authority = f"[{self.host}]" if ":" in self.host else self.host
        if _DEFAULT_PORT.get(scheme) != port:
            authority = f"{authority}:{port}"
        self.host_line = f"Host: {authority}\r\n".encode(_ENCODING, _ERRORS)
        self.idle: deque[_Connection] = deque()
        self.distrusted_until = 0.0
        """Loop time until which no connection to this origin is pooled (`_DISTRUST`)."""
        self.proven = False
        """Past its probation (`_PROBATION`), and no stray byte since."""
        self.head: _Head | None = None
        """The head of the last common answer llhttp parsed from this origin (`_Head`)."""
        self.misses = 0  # answers that were not `head` since it was last replaced


class _Head:
    """The head of an answer llhttp parsed, whole with its body in one read, from the start of
    a message: a status of 200-599 but 204 and 304, to a request that was not a HEAD, framed
    by one Content-Length, kept alive, nothing after its body. A later read on a connection
    of the same origin that starts with exactly these bytes (`raw`, up to and with the blank
    line) and holds exactly `length` bytes more is that same answer again, taken with one
    `startswith` instead of llhttp and its ~11 callbacks (`_Connection._again`).

    Why not a parser of our own for every head: written in Python (one `find`, a split, a
    strict check of each line), it measured 19,000-40,000 instructions for nginx's five-field
    head against llhttp's ~23,000 with our callbacks; the comparison is ~1,000
    (bench/FIGURES.md, "The answer's head again"). So llhttp stays the only parser: what is
    taken here is only ever bytes it accepted before, and it parses every other head."""

    __slots__ = ("hits", "kept", "length", "names", "raw", "reason", "size", "status", "values")

    def __init__(self, conn: _Connection, raw: bytes) -> None:
        self.raw = raw
        self.size = len(raw)
        self.status = conn._status
        self.reason = conn._reason
        self.names = tuple(conn._names)
        self.values = tuple(conn._values)
        self.length: int = conn._length  # type: ignore[assignment]  # (one Content-Length: an int)
        self.hits = 0
        self.kept: Any = None
        """What the consumer derived from this head alone, kept with it for the next time
        (forward.py: the answer's fields for the client); None until it has."""


class _Connection(asyncio.BufferedProtocol):
    """One upstream connection and the state of the exchange it is carrying.

    The parser's callbacks write straight into this object, so answering a request costs
    no objects beyond the headers list, the body chunks and one Response. Reads land in the
    pool's read buffer and are parsed at once: `data_received` is given a view of it that
    must not be kept (the parser's callbacks get bytes of their own).
    """

    __slots__ = (
        "_buffered",
        "_chunked",
        "_chunks",
        "_codings",
        "_counting",
        "_done",
        "_error",
        "_fd",
        "_flow",
        "_got_bytes",
        "_head_bytes",
        "_head_done",
        "_head_seen",
        "_idle",
        "_idle_since",
        "_interim",
        "_is_head",
        "_keep_alive",
        "_late",
        "_length",
        "_lost",
        "_mark",
        "_names",
        "_notify",
        "_origin",
        "_parser",
        "_poll",
        "_pool",
        "_reading_paused",
        "_reason",
        "_relay_timeout",
        "_resend",
        "_seen",
        "_sink",
        "_sink_full",
        "_splice",
        "_splice_end",
        "_status",
        "_target",
        "_transport",
        "_values",
        "_wakeup",
    )

    _names: list[bytes]
    _values: list[bytes]
    _length: int | None
    _error: UpstreamError | None

    def __init__(self, pool: Pool, origin: _Origin) -> None:
        self._pool = pool
        self._origin = origin
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._fd = -1  # its socket, when writing to it ourselves is allowed (`connection_made`)
        self._poll: select.poll | None = None  # the socket, to look for bytes before reuse (`_clean`)
        # Made in `connection_made`: it holds our bound callbacks, a cycle that `connection_lost`
        # breaks; a connect that fails calls neither, and uvloop makes the protocol before it
        # connects (asyncio after), so each refused or timed-out connect would leave the pair
        # for a full garbage collection.
        self._parser: httptools.HttpResponseParser = None  # type: ignore[assignment]
        self._idle = False
        self._idle_since = 0.0
        self._lost = False
        self._flow = WriteFlow(pool._loop, pool._deadlines)  # a request body waits here for the upstream to take it
        # The consumer waits here for the answer; its timeouts are the pool's one timer.
        self._wakeup = _Wakeup(pool._loop, pool._deadlines)
        # `Pool.send`: the consumer told from these callbacks once the answer's head is here, it
        # failed or it timed out (no task waits); the read timeout; what a retry resends.
        self._notify: Callable[[], None] | None = None
        self._late = False  # that answer timed out
        self._resend: tuple[_Origin, bytes, float] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._sink: Callable[[bytes | memoryview], bool] | None = None  # `Response.relay`'s consumer, while it relays
        self._sink_full = False  # the sink said it is full: reading is paused until it drains
        # A request body spliced into this socket ends with the connection (splice.py: its dup
        # of the socket must not outlive the transport's).
        self._splice_end: Callable[[], None] | None = None
        # An answer's body spliced from this socket into the client's (`_try_splice`): its
        # target (http1's `Request`, while `Response.relay` may splice) and the splice.
        self._target: Any = None
        self._splice: _splice.Splice | None = None
        self._relay_timeout = 0.0
        self._seen = 0  # bytes of the answer's body so far
        # The answer's head (on_message_begin resets these for each message, 1xx included).
        self._reason = b""
        self._names = []
        self._values = []
        self._length = None
        self._chunked = False
        self._codings: bytes | None = None
        self._begin(False)

    def _begin(self, is_head: bool) -> None:
        """Reset the exchange state for a new request on this connection (`Pool.send` has it
        written out: what is added here is added there)."""
        self._is_head = is_head
        self._counting = False  # the body's bytes are counted here, not parsed (`_count`)
        self._mark = _HIGH_WATER
        self._status = 0
        self._interim = False
        self._head_done = False
        self._done = False
        self._keep_alive = False
        self._got_bytes = False
        self._head_bytes = 0
        self._error = None
        self._head_seen: _Head | None = None  # this answer's head, when it is its origin's `_Head`

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._parser = httptools.HttpResponseParser(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)
            if transport.get_extra_info("sslcontext") is None:
                self._fd = sock.fileno()  # a relayed request body is written to it (`flow.send`); never through TLS
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None and HELD.bytes < HELD.limit:
            return self._pool._big_buffer()
        return self._pool._read_small

    def data_received(self, data: bytes | memoryview) -> None:
        """What the event loop would hand `buffer_updated`, a read at a time (for a caller
        with bytes of its own: the loop reads into `get_buffer`)."""
        buffer = self._pool._read_buffer
        for start in range(0, len(data), _READ_SIZE):
            piece = data[start : start + _READ_SIZE]
            buffer[: len(piece)] = piece
            self.buffer_updated(len(piece))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        end = self._splice_end
        if end is not None:
            self._splice_end = None
            end()
        if self._splice is not None:
            self._stop_splice()  # (the error below is the body cut short)
        # The parser holds our bound callbacks: drop it, or the pair is a cycle that waits for
        # a full garbage collection. Nothing is parsed after the connection is lost, and the
        # poll goes too: its fd number may soon name another socket.
        self._parser = None  # type: ignore[assignment]
        self._poll = None
        if self._idle:
            self._idle = False
            try:
                self._origin.idle.remove(self)
            except ValueError:
                pass
        elif not self._done and self._error is None:
            if self._head_done and exc is None and self._length is None and not self._chunked:
                # RFC 9112 §6.3 item 8: no Content-Length and no chunked coding, so the body
                # ends where the connection does. A reset (exc set) is still a truncation.
                self._done = True
            elif not self._got_bytes:
                self._error = UpstreamConnectError("connection closed before any byte of the answer")
            elif not self._head_done:
                self._error = UpstreamProtocolError("connection closed inside the response head")
            else:
                self._error = UpstreamProtocolError("response body cut short")
        if self._notify is not None:
            self._progress()
        else:
            self._wakeup.wake()
        self._flow.end()

    def buffer_updated(self, nbytes: int) -> None:
        # The read is parsed here, not handed to a `data_received`: a call less per read (bench/FIGURES.md, "Bodies").
        # (Not `_head_done`: neither `_done` nor `_idle` either, nor anything of this answer parsed yet.)
        fresh = not self._head_done and not self._head_bytes and not self._is_head
        if fresh:
            head = self._origin.head
            if head is not None and nbytes - head.size == head.length and self._pool._read_array.startswith(head.raw):
                self._again(head, nbytes)
                notify = self._notify
                if notify is not None:
                    # `_progress` for a head that is here, written out (bench/FIGURES.md, "The
                    # public route, session 9"); last: what it calls may reuse this connection at once.
                    self._notify = None
                    wakeup = self._wakeup
                    wakeup.conn = None
                    self._pool._deadlines.waits.pop(wakeup, None)  # type: ignore[union-attr]
                    notify()
                else:
                    self._wakeup.wake()
                return
        data = self._pool._read_buffer[:nbytes]
        if self._done or self._idle:
            # Bytes after the end of the answer (or on an idle connection) mean we no longer
            # know where the next message starts (RFC 9112 §9.3.2), and whoever sent them may
            # send more once the connection carries someone else's request. An unsolicited
            # 408 on an idle connection is only a server closing it (some do), not a stray.
            self._stray(
                "bytes after a complete answer",
                trust=self._idle and bytes(data[:13]) in (b"HTTP/1.1 408 ", b"HTTP/1.0 408 "),
            )
            if self._idle:
                self._transport.abort()
            return
        self._got_bytes = True
        if not self._head_done or self._chunked:
            # httptools holds a header field until it ends: an upstream that never ends one
            # would grow this process without bound (the read timeout bounds time, not bytes).
            # The same goes for a chunked answer's trailer fields: there, what counts is what
            # came since the last byte of content (`on_body` starts the count again).
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD:
                self._fail(
                    UpstreamProtocolError(
                        "response head too large" if not self._head_done else "response trailer section too large"
                    )
                )
                if self._notify is not None:
                    self._progress()
                else:
                    self._wakeup.wake()
                return
        if self._counting or (
            self._sink is not None
            and self._head_done
            and self._length is not None
            and not self._chunked
            and not self._is_head
            and self._status != 204
            and self._status != 304
            and self._error is None
        ):
            self._count(data)
        else:
            self._parse(data)
            if fresh and self._done and self._keep_alive and self._length is not None and self._error is None:
                self._remember(nbytes)
        if self._notify is not None:
            self._progress()  # last: what it calls may reuse this connection at once
        elif self._sink is None or self._done or self._error is not None or self._sink_full:
            self._wakeup.wake()
        else:
            # Relaying (`Response.relay`): these bytes went on already; the waiting task has
            # nothing to do but its read timeout starts again.
            self._wakeup.extend(self._relay_timeout)

    def _again(self, head: _Head, nbytes: int) -> None:
        """The read is `head` again with its body: what llhttp's callbacks did for it, done here."""
        head.hits += 1
        self._head_seen = head
        self._got_bytes = True
        # on_message_begin, on_status, on_header
        self._reason = head.reason
        # (tuples, shared by every answer with this head: on_message_begin gives the next
        # message lists of its own before on_header appends to them)
        self._names = head.names  # type: ignore[assignment]
        self._values = head.values  # type: ignore[assignment]
        self._length = length = head.length
        self._chunked = False
        self._codings = None
        # on_headers_complete (a status of 200-599 but 204 and 304, kept alive: `_remember`)
        self._status = head.status
        self._head_done = True
        self._keep_alive = True
        if length:  # on_body (llhttp makes no call for an empty body)
            self._head_bytes = 0
            self._chunks.append(self._pool._read_buffer[head.size : nbytes].tobytes())
            self._buffered += length
            if self._buffered > self._mark and not self._reading_paused:
                self._reading_paused = True
                self._transport.pause_reading()
        else:
            self._head_bytes = nbytes
        self._done = True  # on_message_complete

    def _remember(self, nbytes: int) -> None:
        """After llhttp parsed a whole answer kept alive from a fresh start in this one read:
        its origin's `_Head` from now on if it is a common one (`_Head`). An origin whose heads
        never come twice (a Content-Length that varies, say) is not given a new one for
        every answer: only when the last one was taken again, else every 16th answer."""
        status = self._status
        if self._chunked or self._interim or status < 200 or status > 599 or status == 204 or status == 304:
            return
        origin = self._origin
        if origin.head is not None and not origin.head.hits:
            origin.misses += 1
            if origin.misses & 15:
                return
        size = self._pool._read_array.find(b"\r\n\r\n", 0, nbytes) + 4
        if nbytes - size != self._length:
            return  # (not one answer alone: nothing else in this read, a 1xx before it say)
        origin.misses = 0
        self._head_seen = origin.head = _Head(self, self._pool._read_buffer[:size].tobytes())

    def _parse(self, data: bytes | memoryview) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upstream switched protocols (101); upgrades are not proxied here"))
        except httptools.HttpParserError as error:
            self._fail(UpstreamProtocolError(f"malformed response: {error}"))

    def _count(self, data: memoryview) -> None:
        """A read of a relayed answer's Content-Length body, counted rather than parsed: llhttp
        would only count it too, and hand `on_body` a copy of each read. The sink gets a view
        of the read buffer (`Response.relay`: valid during the call only; `flow.send` writes it
        without a copy). Once this begins, every byte of the body is counted here (llhttp is
        not told of them), and a fresh parser takes what follows it, as llhttp would have
        (bench/FIGURES.md, "Bodies: fewer, larger reads")."""
        self._counting = True
        left = self._length - self._seen  # type: ignore[operator]  # (a Content-Length body: `buffer_updated`)
        piece = data if len(data) <= left else data[:left]
        self._seen += len(piece)
        sink = self._sink
        if sink is not None:
            if sink(piece):
                self._sink_full = True
                if not self._reading_paused:
                    self._reading_paused = True
                    self._transport.pause_reading()
        else:  # the relay has ended with the body not all here (`on_body`'s buffering, with a copy)
            self._chunks.append(bytes(piece))
            self._buffered += len(piece)
            if self._buffered > self._mark and not self._reading_paused:
                self._reading_paused = True
                self._transport.pause_reading()
        if len(data) < left:
            if self._target is not None and not self._sink_full:
                self._try_splice()  # this read went on: the rest may be spliced
            return
        # The end of the body: as llhttp's `on_message_complete`.
        self._done = True
        self._counting = False
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        self._parser = httptools.HttpResponseParser(self)  # (the old one still waits for the body)
        rest = data[left:]
        if rest:
            # What llhttp makes of bytes after a complete answer in the same read: CR and LF
            # skipped; anything else starts a message (`on_message_begin`: a stray) or, after
            # an answer that closes the connection, is an error.
            if keep_alive:
                self._parse(rest)
            elif bytes(rest).strip(b"\r\n"):
                self._fail(UpstreamProtocolError("malformed response: data after `Connection: close`"))

    def pause_writing(self) -> None:
        self._flow.pause(self._transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._flow.resume()

    # an answer's body spliced (splice.py; bench/FIGURES.md, "The response spliced")

    def _try_splice(self) -> None:
        """Splice the rest of the relayed answer's Content-Length body into the client's socket
        when everything allows it: a plain-TCP upstream, every byte read so far passed on
        (nothing buffered, the sink not full), at least `splice.ANSWER_MIN` bytes left, the
        client's transport holding nothing (`Request.splice_fd`), a pipe free. Else nothing: the
        body goes on being copied, and this is asked again after the next read."""
        length = self._length
        if (
            length is None
            or not _splice.ENABLED  # (turned off by a splice this kernel refused: copied from now on)
            or self._splice is not None
            or self._sink is None
            or self._sink_full
            or not self._head_done
            or self._chunked
            or self._is_head
            or self._status == 204
            or self._status == 304
            or self._done
            or self._error is not None
            or self._lost
            or self._chunks
            or self._fd < 0
            or length - self._seen < _splice.ANSWER_MIN
            or self._transport.is_closing()
        ):
            return
        target = self._target
        splice = _splice.begin(
            self._pool._loop,
            self._fd,
            target,
            length - self._seen,
            self._spliced,
            self._splice_blocked,
            self._spliced_to,
        )
        if splice is None:
            return
        self._splice = splice
        # Every byte of the body is counted from now on (llhttp is told of none of them): the
        # rest after a splice that stops early too, and a fresh parser takes what follows.
        self._counting = True
        target.splice_began(self._splice_lost)
        if not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()  # the transport reads nothing of the body meanwhile
        splice.step()

    def _spliced(self, size: int) -> None:
        """`size` body bytes left the upstream's socket: counted as a read's are (`_count`)."""
        self._seen += size
        self._wakeup.extend(self._relay_timeout)  # (the relay's wait for the upstream starts again)

    def _splice_blocked(self) -> None:
        """The client takes nothing for now: the relay waits for it as for a full sink."""
        self._target.splice_blocked()
        self._sink_full = True
        self._wakeup.wake()

    def _spliced_to(self, how: str) -> None:
        """The splice ended (its fds closed): the body's end, or what the copy path does next."""
        self._splice = None
        target = self._target
        if target is not None:
            target.splice_over()
        if how == "done":
            # What `_count` does at the body's end; what follows it is read (and judged) as any.
            self._done = True
            self._counting = False
            self._parser = httptools.HttpResponseParser(self)
            if _waiting(self._fd):
                # Bytes past the body, here already: the copy would have read them with its end
                # (`_count`: a stray). Judged now, before the connection can go back to the pool,
                # where `_take_idle` would only drop it and its origin would stay trusted.
                self._stray("bytes after a complete answer")
            self._resume_reading()
            self._wakeup.wake()
        elif how == "source":
            self._resume_reading()  # the transport's own read meets the end (or the failure)
        else:
            # The client went away, or what the pipe held is lost, or nothing more may be
            # sent: the client's connection is cut, as a failed write cuts it.
            if target is not None:
                target.splice_failed(how == "sink-error")
            self._sink_full = True  # the relay's drain says the client is gone
            self._wakeup.wake()

    def _splice_lost(self) -> None:
        """The client's connection was lost mid-splice: nothing more is sent, as after a failed write."""
        if self._splice is not None:
            self._stop_splice()
            self._sink_full = True
            self._wakeup.wake()

    def _stop_splice(self) -> None:
        splice = self._splice
        self._splice = None
        if splice is not None:
            splice.close()
        target = self._target
        if target is not None:
            target.splice_over()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._done:
            # A second message in the same read: we never pipeline (RFC 9112 §9.3.2), so this
            # is garbage. Raising stops llhttp before it overwrites the answer we hold.
            self._stray("a second answer after the answer")
            raise UpstreamProtocolError("data after the end of the answer")
        self._reason = b""
        self._names = []
        self._values = []
        self._length = None
        self._chunked = False
        self._codings = None
        self._seen = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason  # llhttp may deliver the reason phrase in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            # A trailer field of a chunked answer (llhttp reports them like header fields). It
            # must not join the head (RFC 9110 §6.5.1): a `Content-Length` here would reframe
            # the answer, a `Set-Cookie` would become a cookie. We relay no trailers: dropped.
            return
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self._length = int(value)  # llhttp has already refused non-digits and duplicates
        elif size == 17 and name.lower() == b"transfer-encoding":
            # One list, however many lines carry it (RFC 9110 §5.3); judged once the head is whole.
            self._codings = value if self._codings is None else self._codings + b"," + value
        # bytes: relayed as they came, decoded only if asked. Names and values apart: the
        # names (a tuple of them) are the key to a consumer's plan for the whole head.
        self._names.append(name)
        self._values.append(value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            # RFC 9110 §15.2.2: the bytes that follow are another protocol; upgrades take
            # forward.py's tunnel on a connection of their own, so here it is an error.
            # Raising stops llhttp.
            self._error = UpstreamProtocolError("upstream switched protocols (101); upgrades are not proxied here")
            raise self._failure()
        if status < 200:
            # RFC 9110 §15.2: any number of 1xx may precede the final answer; we drop them
            # (103's hints are an optimisation the client can live without).
            self._interim = True
            return
        bodiless = self._is_head or status == 204 or status == 304
        codings = self._codings
        if codings is not None:
            # Chunked alone, as we read the list and as llhttp does: it reads `chunked\t` and
            # `chunked,` (chunked, to RFC 9110's list rules) as another coding, so they are refused.
            listed = [c for c in (part.strip(b" \t").lower() for part in codings.split(b",")) if c]
            self._chunked = listed == [b"chunked"] and codings.rstrip(b" ").lower().endswith(b"chunked")
            if not self._chunked and not bodiless:
                # RFC 9112 §6.3 item 4 would read such a body until close, but we decode chunked
                # and nothing else: relayed without its Transfer-Encoding (hop-by-hop, ours to
                # write), gzip'd bytes would reach the client as the content. Refused instead.
                self._error = UpstreamProtocolError("upstream used a transfer coding other than chunked")
                raise self._error
        self._status = status
        self._head_done = True
        if self._is_head:
            # llhttp cannot be told this answer is to a HEAD (httptools gives no way to return
            # "skip body" from this callback), so the message ends here for us (RFC 9112 §6.3
            # item 1). The connection is never reused: the one kind of upstream bug that is
            # common here, sending the GET's body anyway, would put that body (which may arrive
            # later than the head) in front of the next request's answer.
            self._done = True
            self._keep_alive = False
        elif bodiless and (self._length or codings is not None):
            # A 204 or 304 that announces content (204: RFC 9110 §8.6 forbids it; 304: legal but
            # rare) is the same bet on a body that must not come: not worth a connection.
            self._keep_alive = False
        else:
            # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; an HTTP/1.0 answer is not reused
            # (we never asked for the 1.0 keep-alive extension). llhttp also says no for a
            # close-delimited body.
            self._keep_alive = self._parser.should_keep_alive() and self._parser.get_http_version() == "1.1"
        if not self._keep_alive:
            self._flow.end()  # the server answered and is closing: an upload blocked on it stops now (RFC 9112 §9.5)

    def on_body(self, body: bytes) -> None:
        if self._is_head:
            # A body after a HEAD answer: the framing is broken, so never reuse the connection.
            self._stray("a body after the answer to a HEAD")
            return
        if self._interim:
            return  # content on a 1xx (which has none, RFC 9110 §15.2) is not the answer's
        self._head_bytes = 0
        self._seen += len(body)
        sink = self._sink
        if sink is not None:
            # Straight on to the consumer from this callback (`Response.relay`); when it is
            # full, reading stops until it has drained.
            if sink(body):
                self._sink_full = True
                if not self._reading_paused:
                    self._reading_paused = True
                    self._transport.pause_reading()
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > self._mark and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._done = True

    # an answer awaited from these callbacks (`Pool.send`)

    def _progress(self) -> None:
        """A read (or the end of the connection) while the consumer waits from callbacks: tell
        it once the answer's head is here or the exchange failed, else the read timeout starts
        again (as `_exchange`'s wait is armed again after each callback)."""
        if self._head_done or self._error is not None:
            notify = self._notify
            assert notify is not None
            self._notify = None
            wakeup = self._wakeup
            wakeup.conn = None
            self._pool._deadlines.waits.pop(wakeup, None)  # type: ignore[union-attr]
            notify()
        else:
            self._pool._deadlines.waits[self._wakeup] = self._pool._loop.time() + self._relay_timeout  # type: ignore[union-attr]

    def _expired(self) -> None:
        """The read timeout passed with no answer's head (the pool's timer took the wait off)."""
        notify = self._notify
        self._wakeup.conn = None
        if notify is None:
            return
        self._notify = None
        self._late = True
        self._keep_alive = False  # its state is unknown: never reused (as in `_exchange`)
        self._transport.abort()
        notify()

    def answer(self) -> Response | Coroutine[Any, Any, Response]:
        """Once `Pool.send`'s consumer is told: the answer's head (`Pool.request`'s answer), or
        the coroutine of the one retry RFC 9112 §9.3.1 allows, on a new connection (the pooled
        one closed before any byte of the answer; `_exchange`'s rule); raises `TimeoutError` or
        the `UpstreamError` `Pool.request` would have raised."""
        resend = self._resend
        self._resend = None  # (the head it holds is not kept beyond the answer)
        if self._late:
            raise TimeoutError
        if self._head_done:
            return Response(self, self._relay_timeout)
        # A broken answer, or none: the connection's state is unknown, so it is never reused.
        self._keep_alive = False
        self._transport.abort()
        if resend is not None and isinstance(self._error, UpstreamConnectError):
            origin, head, connect_timeout = resend
            return self._pool._exchange(
                origin, None, head, self._is_head, None, False, None, connect_timeout, self._relay_timeout, retry=False
            )
        raise self._failure()

    def again_whole(self, limit: int) -> tuple[_Head, bytes] | None:
        """`answer` and its `Response.whole(limit)` in one call, for the common answer: its
        origin's `_Head` again (or the one it just became), whose `kept` its consumer filled
        before, whole with a body of at most `limit` bytes. Its head (status, reason and `kept`
        are that answer's) and its body (taken, as `whole` takes it), the connection
        back in the pool, or dropped, as `whole` does; None, with nothing done, for any other
        answer (then `answer`). No `Response` is made (bench/FIGURES.md, "The public route,
        session 9")."""
        head = self._head_seen
        if head is None or head.kept is None or self._late or not self._done or self._is_head or self._buffered > limit:
            return None
        self._resend = None  # (as `answer`)
        return head, self._whole()

    def _whole(self) -> bytes:
        """The body of an answer that has ended, taken, and the connection handed back: to the
        pool, or dropped (`Response.whole`, `again_whole`)."""
        chunks = self._chunks
        if chunks:  # (`_take`, written out)
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
        else:
            body = b""
        if self._reading_paused:
            self._resume_reading()
        if self._keep_alive and self._error is None and not self._lost:
            self._pool._put(self)
        else:
            self._transport.abort()
        return body

    def cancel(self) -> None:
        """`Pool.send`'s consumer is gone (the client went away): the connection is dropped."""
        self._resend = None
        if self._notify is not None:
            self._notify = None
            wakeup = self._wakeup
            wakeup.conn = None
            self._pool._deadlines.waits.pop(wakeup, None)  # type: ignore[union-attr]
        self._keep_alive = False
        self._transport.abort()

    # helpers

    def _stray(self, what: str, *, trust: bool = False) -> None:
        """Bytes no request asked for: this connection is done, and unless `trust`, no
        connection to its origin is reused for a while (`_DISTRUST`)."""
        self._keep_alive = False
        if trust:
            return
        origin = self._origin
        origin.proven = False
        now = self._pool._loop.time()
        if origin.distrusted_until <= now:
            event(
                log,
                logging.WARNING,
                "upstream_distrusted",
                "upstream %(peer)s sent %(what)s; its connections are not reused for %(seconds)gs",
                peer=f"{origin.host}:{origin.port}",
                what=what,
                seconds=_DISTRUST,
            )
        origin.distrusted_until = now + _DISTRUST
        # Its other idle connections may have stray bytes of their own on the way: closed too.
        idle = origin.idle
        while idle:
            conn = idle.pop()
            conn._idle = False
            conn._transport.abort()

    def _clean(self) -> bool:
        """No byte (nor EOF) waits on the idle socket. Bytes the loop has not yet delivered to
        `data_received` (they landed in this loop turn) would otherwise be read as the next
        request's answer."""
        poll = self._poll
        return poll is None or not poll.poll(0)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._done:
            self._error = error
        self._keep_alive = False
        self._transport.abort()

    def _failure(self) -> UpstreamError:
        """The exchange's error, to raise: a copy, for the one we hold would hold, once raised,
        the frames that hold us (a cycle that waits for a full garbage collection)."""
        error = self._error
        assert error is not None
        return type(error)(*error.args)

    def _take(self) -> bytes:
        """Everything buffered, as one bytes, and resume reading if we had paused it."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused:
            self._resume_reading()
        return data

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if not self._lost:
            self._transport.resume_reading()

    def _release(self) -> None:
        if self._done and self._keep_alive and self._error is None and not self._lost:
            if self._chunks:
                self._take()  # an unread but complete body: drop it, the connection is still sound
            self._pool._put(self)
        else:
            self._transport.abort()


def _end_body(conn: _Connection, pending: bytes | None, sent: int, chunked: bool, content_length: int | None) -> None:
    """The end of a request body `sent` bytes long (`pending`: the head, if no byte of the
    body went with it): the last chunk, or the check that Content-Length held."""
    if conn._lost or (conn._head_done and not conn._keep_alive):
        return  # the answer (or the lack of one) tells what happened
    transport = conn._transport
    if chunked:
        # The last chunk, no trailers (RFC 9112 §7.1).
        transport.write(b"0\r\n\r\n" if pending is None else pending + b"0\r\n\r\n")
    elif content_length is not None and sent != content_length:
        raise UpstreamError(f"request body ended after {sent} of {content_length} bytes")
    elif pending is not None:
        transport.write(pending)  # a body of zero bytes


class _Upload:
    """A `BodySource`'s way to the upstream: `write_length` or `write_chunked` is its sink,
    called from the client's read callback, so it never raises (a failure is kept for `drain`
    to raise in the task), and `drain` is what the source awaits when the sink said full."""

    __slots__ = (
        "_conn",
        "_fd",
        "_length",
        "_read_timeout",
        "_transport",
        "answered_early",
        "error",
        "left",
        "pending",
        "stopped",
    )

    def __init__(self, conn: _Connection, head: bytes, content_length: int | None, read_timeout: float) -> None:
        self._conn = conn
        self._transport = conn._transport
        self._fd = conn._fd
        self._read_timeout = read_timeout
        self._length = content_length
        self.left = content_length or 0  # bytes of a Content-Length body still to send
        # The head waits for the first piece so the two leave in one write: a small body then
        # costs one send, as a body-less request does.
        self.pending: bytes | None = head
        self.stopped = False  # nothing more is sent: the upstream is gone, answered and closing, or failed
        self.error: str | None = None  # why the body failed (raised, new, by `drain`: no cycle through a traceback)
        self.answered_early = True  # the answer began before a Content-Length body's last byte was written

    def _stop(self) -> bool:
        """Whether nothing more may be sent: the upstream is gone (the answer, or the lack of
        one, tells what happened), or answered and is closing (RFC 9112 §9.5)."""
        conn = self._conn
        # (Called when the head is done, or when it is lost or stopped already.)
        if self.stopped or conn._lost or not conn._keep_alive:
            self.stopped = True
        return self.stopped

    def write_length(self, chunk: bytes | memoryview) -> bool:
        """Send a piece of a Content-Length body; whether the source must stop and await `drain`."""
        conn = self._conn
        if (conn._head_done or conn._lost or self.stopped) and self._stop():
            return True
        left = self.left - len(chunk)
        if left < 0:
            # Bytes past the declared length would be read as the next request.
            self.error = f"request body longer than its Content-Length {self._length}"
            self.stopped = True
            return True
        self.left = left
        pending = self.pending
        if pending is None:
            # The transport is left holding only what the upstream has not taken (`flow.send`):
            # what `Held` counts, while large reads are allowed, is then what is held.
            send(self._transport, self._fd, chunk)
        else:
            # (a view of the client's read buffer is copied: the transport may keep what it is given)
            self._transport.writelines((pending, chunk if type(chunk) is bytes else bytes(chunk)))
            self.pending = None
        if not left:
            self.answered_early = conn._got_bytes
        flow = conn._flow
        if flow.paused:  # (a read's further pieces may still come: `Held` counts them too)
            flow.pause(self._transport.get_write_buffer_size())
            return True
        return False

    def write_chunked(self, chunk: bytes | memoryview) -> bool:
        """Send a piece of a chunked body; whether the source must stop and await `drain`."""
        conn = self._conn
        if (conn._head_done or conn._lost or self.stopped) and self._stop():
            return True
        if not chunk:
            return False  # an empty chunk would end a chunked body early (RFC 9112 §7.1)
        pending = self.pending
        if pending is None:
            # One piece, so the transport keeps only what the upstream has not taken (`flow.send`).
            send(self._transport, self._fd, b"%x\r\n%b\r\n" % (len(chunk), chunk))  # type: ignore[str-format]  # (%b takes any buffer)
        else:
            self._transport.writelines((pending, b"%x\r\n%b\r\n" % (len(chunk), chunk)))  # type: ignore[str-format]
            self.pending = None
        flow = conn._flow
        if flow.paused:  # (a read's further pieces still come: `Held` counts them too)
            flow.pause(self._transport.get_write_buffer_size())
            return True
        return False

    # A splice's target (http1's `_Connection._try_splice`, splice.py): the rest of a
    # Content-Length body written to the socket by the kernel, counted here as a write is.

    def splice_fd(self) -> int:
        """The upstream's socket, when the rest of the body may be spliced into it now: plain
        TCP, a Content-Length body, the head written, nothing held by the transport (what it
        holds must leave first), nothing stopped or answered; else -1 (copy)."""
        conn = self._conn
        if (
            self._length is None
            or self.pending is not None
            or self.stopped
            or conn._lost
            or conn._head_done
            or conn._flow.paused
            or self._transport.get_write_buffer_size()
            or self._transport.is_closing()
        ):
            return -1
        return conn._fd

    def splice_began(self, end: Callable[[], None]) -> None:
        """`end` is called if the connection is lost while the splice lasts (`splice_over` stops that)."""
        self._conn._splice_end = end

    def splice_over(self) -> None:
        self._conn._splice_end = None

    def spliced(self, size: int) -> bool:
        """`size` bytes of the body went to the socket; whether nothing more may be sent."""
        conn = self._conn
        left = self.left = self.left - size
        if not left:
            self.answered_early = conn._got_bytes
        flow = conn._flow
        if flow.paused:
            flow.resume()  # (what `splice_blocked` paused: the upstream takes bytes again)
        return (conn._head_done or conn._lost or self.stopped) and self._stop()

    def splice_blocked(self) -> None:
        """The upstream takes nothing for now: the body waits as for a full write buffer (`drain`,
        with the read timeout), holding nothing in user space."""
        self._conn._flow.pause(0)

    def splice_failed(self, abort: bool) -> None:
        """Splicing into the socket failed: nothing more is sent, as after a failed write. The
        peer gone, the transport learns how from its own read; any other failure (`abort`) cut
        the body short in a way the upstream cannot tell: the connection is aborted."""
        self.stopped = True
        if abort:
            self._transport.abort()

    async def drain(self) -> bool:
        """Wait while the upstream's buffer is full: a stalled upstream that never reads gets
        the read timeout (TimeoutError), as it would for an answer. False: send nothing more."""
        if self.error is not None:
            raise UpstreamError(self.error)
        if self.stopped:
            return False
        conn = self._conn
        flow = conn._flow
        if flow.paused:
            await flow.drain(self._read_timeout)
            # Ended by an answer that closes (`on_headers_complete`): stop now, as the next write
            # would (a spliced body's next write may never come: the upstream reads nothing).
            if (conn._head_done or conn._lost) and self._stop():
                return False
        return True


class Response:
    """The head of an upstream answer, and its body to stream, read or drop."""

    __slots__ = ("_bodiless", "_conn", "_read_timeout", "head", "length", "names", "raw_reason", "status", "values")

    def __init__(self, conn: _Connection, read_timeout: float) -> None:
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        status = self.status = conn._status
        self.raw_reason: bytes = conn._reason
        """The reason phrase as it came (llhttp allows no CR or LF in it)."""
        self.names: Sequence[bytes] = conn._names
        """The answer's field names as they came off the wire, in order (llhttp allows no CR or
        LF in them); `values` holds their values, in the same order. Not to be changed."""
        self.values: Sequence[bytes] = conn._values
        self.length: int | None = conn._length
        """The answer's Content-Length, if it sent one."""
        self.head = conn._head_seen
        """Its head as its origin's `_Head` (the same bytes as an answer before, whose `kept`
        a consumer may use, or fill for the next), else None."""
        self._bodiless = conn._is_head or status == 204 or status == 304

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The answer's header fields as they came off the wire: (name, value) bytes, in order."""
        return list(zip(self.names, self.values, strict=True))

    @property
    def reason(self) -> str:
        """The reason phrase, decoded (UTF-8 with surrogateescape: encoding gives the same bytes)."""
        return self.raw_reason.decode(_ENCODING, _ERRORS)

    def complete(self, limit: int) -> bytes | None:
        """`read`'s answer when it needs no wait: the whole body if the answer has ended and
        holds at most `limit` bytes, else None with nothing consumed (then `read` or
        `iter_chunks`). A small answer usually comes whole in the read that brought its
        head: this spares a coroutine per answer (bench/FIGURES.md)."""
        conn = self._conn
        if conn is None or self._bodiless or not conn._done or conn._buffered > limit:
            return None
        return conn._take() if conn._chunks else b""

    def whole(self, limit: int) -> bytes | None:
        """`complete` and, when it gives the body, `release`: one call for an answer that came
        whole with its head (the common one), where the two (and `_take`, `_release`) were four
        (bench/FIGURES.md, "The forwarded request, session 8"). None: nothing consumed or
        released, as `complete`'s None."""
        conn = self._conn
        if conn is None or self._bodiless or not conn._done or conn._buffered > limit:
            return None
        self._conn = None  # (`release`, and `_release` for an answer that is done: `_whole`)
        return conn._whole()

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The header fields decoded (UTF-8 with surrogateescape: encoding gives the same bytes)."""
        return [(name.decode(_ENCODING, _ERRORS), value.decode(_ENCODING, _ERRORS)) for name, value in self.raw_headers]

    def has_body(self) -> bool:
        """False for answers that never carry content: to HEAD, 204 and 304 (RFC 9112 §6.3 item 1)."""
        return not self._bodiless

    async def relay(
        self,
        sink: Callable[[bytes | memoryview], bool],
        drain: Callable[[], Awaitable[object]],
        target: Any = None,
    ) -> None:
        """Pass the body on as it comes: `sink(data)` is called from the connection's read
        callback for each piece, with no task woken per read (bench/FIGURES.md, "Bodies"): bytes,
        or a memoryview of the pool's read buffer, valid during the call only (copy what is
        kept: a Content-Length body is counted, not parsed, `_Connection._count`); it
        returns whether the consumer is full; then the upstream is not read until `drain()`
        (awaited here: it raises what the consumer's timeout or absence mean) has returned.
        Returns once the whole body has gone to `sink`; raises as `iter_chunks` does (the read
        timeout bounds the time without a byte from the upstream while the consumer is not full).
        `target`: the client's side (http1's `Request`) the rest of a Content-Length body may be
        spliced into from a plain-TCP upstream: whenever it may (`_Connection._try_splice`), the
        kernel moves the body, with the same timeouts and outcomes (bench/FIGURES.md, "The
        response spliced"); a client that takes nothing makes `drain` wait as for a full sink."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("response already released")
        # What came before the relay began (`_take` reads on): when that fills the consumer,
        # reading stops again before the drain, as `on_body` stops it.
        full = sink(conn._take()) if conn._chunks else False
        if full and not conn._reading_paused and not conn._lost:
            conn._reading_paused = True
            conn._transport.pause_reading()
        conn._sink = sink
        conn._sink_full = full
        conn._relay_timeout = self._read_timeout
        if target is not None and _splice.ENABLED and conn._fd >= 0:
            conn._target = target
            if not full:
                conn._try_splice()
        wakeup = conn._wakeup
        try:
            while not conn._done:
                if conn._error is not None:
                    raise conn._failure()
                if conn._sink_full:
                    await drain()
                    conn._sink_full = False
                    if conn._splice is None:
                        if conn._target is not None:
                            conn._try_splice()
                        if conn._reading_paused and conn._splice is None:
                            conn._resume_reading()
                    continue
                if conn._reading_paused and conn._splice is None:
                    conn._resume_reading()  # paused before the relay began
                waiter = wakeup.arm(self._read_timeout)  # `Wakeup.wait`, inlined (see `_exchange`)
                try:
                    timed_out = await waiter
                finally:
                    wakeup.disarm()
                if timed_out:
                    raise TimeoutError
        finally:
            if conn._splice is not None:
                # Ended before its body (a timeout, a cancel, a failure): its fds closed now;
                # the connection is then not reused (the body is not all read).
                conn._stop_splice()
            conn._target = None
            conn._sink = None
            conn._sink_full = False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, de-chunked; each wait for data is bounded by the read timeout."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("response already released")
        while True:
            if conn._chunks:
                yield conn._take()
            elif conn._done:
                return
            elif conn._error is not None:
                raise conn._failure()
            else:
                if conn._reading_paused:
                    conn._resume_reading()  # paused by `pause_reading`, with nothing left to take
                if await conn._wakeup.wait(self._read_timeout):  # the next callback, at most the read timeout
                    raise TimeoutError

    def pause_reading(self) -> None:
        """Stop reading the upstream until the next chunk is asked for (the consumer cannot
        pass more on yet): what waits here is then at most one read."""
        conn = self._conn
        if conn is not None and not conn._reading_paused and not conn._lost and not conn._done:
            conn._reading_paused = True
            conn._transport.pause_reading()

    async def read(self, limit: int) -> bytes | None:
        """The whole body if it is known to fit in `limit` bytes, else None with nothing consumed.

        Known means a Content-Length, or an answer that has already ended. `limit` is capped at
        64 KiB: while this waits, the flow-control mark is lifted to it.
        """
        conn = self._conn
        if conn is None:
            raise RuntimeError("response already released")
        if self._bodiless:
            return b""
        limit = min(limit, _READ_LIMIT)
        if conn._done:
            if conn._buffered > limit:
                return None
            return conn._take() if conn._chunks else b""
        if conn._chunked or conn._length is None or conn._length > limit:
            return None
        conn._mark = limit
        if conn._reading_paused:
            conn._resume_reading()
        while not conn._done:
            if conn._error is not None:
                raise conn._failure()
            if await conn._wakeup.wait(self._read_timeout):  # the next callback, at most the read timeout
                raise TimeoutError
        return conn._take() if conn._chunks else b""

    def release(self) -> None:
        """Pool the connection if the answer ended and keep-alive holds, else close it. Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._release()

    def close(self) -> None:
        """Drop the connection now, whatever state the answer is in (the client went away)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._keep_alive = False
            conn._transport.abort()


def _waiting(fd: int) -> bool:
    """Whether bytes wait in the socket, unread (FIONREAD)."""
    try:
        return bool(int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little"))
    except OSError:
        return False


InFlight = _Connection
"""A request `Pool.send` sent, awaited from callbacks: `answer()` once told, or `cancel()`."""


class Pool:
    """Keep-alive connections to any number of upstream origins, shared by every request of a process."""

    def __init__(
        self,
        *,
        max_idle_per_origin: int = 64,
        idle_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        probation: float = _PROBATION,
    ) -> None:
        """`probation`: see `_PROBATION` (0: none, a connection is reused as soon as it is back)."""
        self._max_idle = max_idle_per_origin
        self._probation = probation
        self._idle_timeout = idle_timeout
        self._ssl = ssl_context  # None: ssl.create_default_context() on the first https origin
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound on first use
        self._sweeper: asyncio.TimerHandle | None = None
        self._deadlines: Deadlines | None = None  # the timeouts of every wait on an answer: one timer
        self._closed = False
        # Every connection's reads land here and are parsed at once (one event loop thread):
        # `_read_small` for a read, all of it (`_BIG_READ`, made on first use) for a relayed
        # answer's; `_read_array` is the bytearray under them (`_Head`'s `startswith`, `find`).
        self._read_array = bytearray(_READ_SIZE)
        self._read_buffer = self._read_small = memoryview(self._read_array)

    def _big_buffer(self) -> memoryview:
        """The read buffer, `_BIG_READ` long (made on first use), its first `_READ_SIZE` bytes being `_read_small`."""
        buffer = self._read_buffer
        if len(buffer) < _BIG_READ:
            self._read_array = bytearray(_BIG_READ)
            buffer = self._read_buffer = memoryview(self._read_array)
            self._read_small = buffer[:_READ_SIZE]
        return buffer

    def _origin(self, scheme: str, host: str, port: int) -> _Origin:
        key = (scheme, host, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(scheme, host, port)
        return origin

    def upgrade_head(
        self, scheme: str, host: str, port: int, target: str, headers: Fields | Iterable[tuple[str, str]], upgrade: str
    ) -> bytes:
        """The head of a GET asking to switch to `upgrade`, framed and checked as `request`
        frames its heads, for a caller that sends it on a connection of its own (a tunnel)."""
        fields = headers if isinstance(headers, Fields) else Fields.of(headers)
        return encode_head(
            "GET",
            target,
            fields,
            self._origin(scheme, host, port).host_line,
            f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n".encode(_ENCODING, _ERRORS),
        )

    def tls_context(self) -> ssl.SSLContext:
        """The context upstream TLS connections are made with (the system's defaults unless given)."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def idle_count(self) -> int:
        return sum(len(origin.idle) for origin in self._origins.values())

    async def close(self) -> None:
        """Close the idle connections; those in use close when their Response is released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._deadlines is not None and not self._deadlines.waits:
            self._deadlines.close()  # (those in use keep it, for their timeouts)
        for origin in self._origins.values():
            while origin.idle:
                conn = origin.idle.pop()
                conn._idle = False
                conn._transport.abort()
        await asyncio.sleep(0)  # let the transports run connection_lost

    def request(
        self,
        method: str,
        scheme: str,
        host: str,
        port: int,
        target: str,
        headers: Fields | Iterable[tuple[str, str]],
        body: AsyncIterator[bytes] | BodySource | None,
        *,
        content_length: int | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> Coroutine[Any, Any, Response]:
        """Send one request and return the answer's head once it has arrived (1xx skipped).

        `target` goes on the request line byte for byte (origin-form, RFC 9112 §3.2.1).
        `headers` (pairs, or `Fields` already encoded) are written in order with duplicates;
        Host is added only when absent (RFC 9112 §3.2), and the body's framing is ours:
        `Content-Length` when `content_length` is given, else `Transfer-Encoding: chunked`
        when there is a body (RFC 9112 §6.1-6.2), so any Content-Length or Transfer-Encoding
        among `headers` is dropped rather than sent twice. An exception raised by `body` propagates unchanged.
        """
        if self._closed:
            raise RuntimeError("pool is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._deadlines = Deadlines(self._loop)
        origin = self._origin(scheme, host, port)
        chunked = False
        if content_length is not None:
            if body is None and content_length:
                raise ValueError("content_length given without a body")
            framing = b"Content-Length: %d\r\n" % content_length
        elif body is not None:
            framing = b"Transfer-Encoding: chunked\r\n"
            chunked = True
        else:
            framing = b""
        fields = headers if isinstance(headers, Fields) else Fields.of(headers)
        head = encode_head(method, target, fields, origin.host_line, framing)
        conn = self._take_idle(origin)
        # RFC 9112 §9.3.1: a reused connection the server closed before answering may be
        # replayed once, on a fresh connection, if nothing (no body) makes that unsafe.
        retry = conn is not None and body is None and method in _IDEMPOTENT
        # Not a coroutine itself: the caller awaits `_exchange` straight, one coroutine (and
        # one frame to resume) less per request (bench/FIGURES.md).
        return self._exchange(
            origin,
            conn,
            head,
            method == "HEAD",
            body,
            chunked,
            content_length,
            connect_timeout,
            read_timeout,
            retry=retry,
        )

    def send(
        self,
        method: str,
        scheme: str,
        host: str,
        port: int,
        head: Callable[[bytes], bytes] | bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
        notify: Callable[[], None],
    ) -> InFlight | None:
        """`request` for a request with no body, awaited by no task: on an idle pooled
        connection, its head written now and `notify()` called from the connection's
        callbacks once its answer's head has come, the exchange failed or `read_timeout`
        passed without a byte (then `InFlight.answer` says which; `InFlight.cancel` if the
        answer is no longer wanted). None when there is no such connection (nothing sent,
        nothing taken: call `request`): bench/FIGURES.md, "The proxied request without a task".
        `head(host_line)` makes the head, asked only once a connection is in hand (so nothing
        is encoded for a request that goes on by `request`): the bytes to write, whole (its
        framing, if any, `Content-Length: 0`), `host_line` (the origin's `Host: ...` line) in
        it when it has no Host of its own; a `ValueError` (`encode_head`'s CR/LF check) hands
        the connection back, untouched, and the answer is None (`request` raises it). Or `head`
        is the head's bytes, whole and checked already, with a Host of its own (made before a
        connection is in hand, by a caller for whom none idle is rare)."""
        if self._loop is None or self._closed:
            return None
        # (`_origin`'s lookup, written out: bench/FIGURES.md, "The forwarded request, session 8")
        origin = self._origins.get((scheme, host, port)) or self._origin(scheme, host, port)
        idle = origin.idle
        if not idle:
            return None
        conn = idle[-1]
        poll = conn._poll
        now = self._loop.time()  # (read once: the idle check and the answer's deadline)
        if (
            (origin.proven or not self._probation)
            and conn._idle_since > now - self._idle_timeout
            and not conn._transport.is_closing()
            and (poll is None or not poll.poll(0))
        ):
            # `_take_idle`'s common case, written out: the most recently used, fit for use
            # (bench/FIGURES.md, "The forwarded request, session 8").
            idle.pop()
            conn._idle = False
        else:
            conn = self._take_idle(origin)  # type: ignore[assignment]
            if conn is None:
                return None
        if head.__class__ is bytes:
            data: bytes = head
        else:
            try:
                data = head(origin.host_line)  # type: ignore[operator]
            except ValueError:
                conn._idle = True  # back where it was, as it was (`_take_idle` changed nothing else of it)
                origin.idle.append(conn)
                return None
        # (`_begin`, written out: a call fewer per request, bench/FIGURES.md, "The public route, session 10")
        conn._is_head = method == "HEAD"
        conn._counting = False
        conn._mark = _HIGH_WATER
        conn._status = 0
        conn._interim = False
        conn._head_done = False
        conn._done = False
        conn._keep_alive = False
        conn._got_bytes = False
        conn._head_bytes = 0
        conn._error = None
        conn._head_seen = None
        conn._transport.write(data)
        conn._notify = notify
        conn._relay_timeout = read_timeout
        # RFC 9112 §9.3.1: a reused connection the server closed before answering may be
        # replayed once (`_exchange`'s rule; no body here).
        conn._resend = (origin, data, connect_timeout) if method in _IDEMPOTENT else None
        wakeup = conn._wakeup
        wakeup.conn = conn
        self._deadlines.add(wakeup, now + read_timeout)  # type: ignore[union-attr]
        return conn

    async def _exchange(
        self,
        origin: _Origin,
        conn: _Connection | None,
        head: bytes,
        is_head: bool,
        body: AsyncIterator[bytes] | BodySource | None,
        chunked: bool,
        content_length: int | None,
        connect_timeout: float,
        read_timeout: float,
        *,
        retry: bool,
    ) -> Response:
        """Send `head` (and `body`) on `conn` (None: a new connection) and wait for the answer's
        head; once more on a new connection when `retry` and `conn` turns out stale."""
        if conn is None:
            conn = await self._connect(origin, connect_timeout)
        while True:
            conn._begin(is_head)
            transport = conn._transport
            if conn._lost:  # it went away while changing hands: nothing was sent
                conn._error = UpstreamConnectError("connection closed before any byte of the answer")
            try:
                if body is None:
                    transport.write(head)
                else:
                    if await self._send_body(conn, head, body, chunked, content_length, read_timeout):
                        # The answer began before the request ended: whether the server read the
                        # rest of the body, or will read it as a request, is unknown. Not reused.
                        conn._keep_alive = False
                wakeup = conn._wakeup
                while not conn._head_done:
                    if conn._error is not None:
                        raise conn._failure()
                    # `Wakeup.wait`, inlined: no coroutine per wait (bench/FIGURES.md).
                    waiter = wakeup.arm(read_timeout)  # the next callback, at most the read timeout
                    try:
                        timed_out = await waiter
                    finally:
                        wakeup.disarm()
                    if timed_out:
                        raise TimeoutError
            except UpstreamConnectError:
                conn._keep_alive = False
                transport.abort()
                if not retry:
                    raise
            except BaseException:
                # A timeout, a cancelled task, a failing body or a broken answer: the connection's
                # state is unknown, so it is never reused.
                conn._keep_alive = False
                transport.abort()
                raise
            else:
                return Response(conn, read_timeout)
            # Out of the `except` first: the error and its traceback are gone before this waits.
            retry = False
            conn = await self._connect(origin, connect_timeout)

    async def _send_body(
        self,
        conn: _Connection,
        head: bytes,
        body: AsyncIterator[bytes] | BodySource,
        chunked: bool,
        content_length: int | None,
        read_timeout: float,
    ) -> bool:
        """Send the body after `head`; whether the answer began before the whole request was written."""
        transport = conn._transport
        if isinstance(body, BodySource):
            # Written from the client's read callback, no task woken per read (bench/FIGURES.md, "Uploads").
            upload = _Upload(conn, head, content_length, read_timeout)
            if not await body.relay(
                upload.write_chunked if chunked else upload.write_length,
                upload.drain,
                None if chunked or content_length is None or conn._fd < 0 else upload,
            ):
                return True  # the upstream went away or answered and is closing: the answer tells the rest
            _end_body(conn, upload.pending, (content_length or 0) - upload.left, chunked, content_length)
            # (A Content-Length body ended with its last write, in the client's read callback:
            # an answer that came after it, before this task ran, is no early answer.)
            return upload.answered_early if content_length is not None else conn._got_bytes
        # The head waits for the first chunk so the two leave in one write: a small body then
        # costs one send, as a body-less request does.
        pending: bytes | None = head
        sent = 0
        async for chunk in body:
            if not chunk:
                continue  # an empty chunk would end a chunked body early (RFC 9112 §7.1)
            if conn._lost:
                return True  # the answer (or the lack of one) tells what happened
            if conn._head_done and not conn._keep_alive:
                # RFC 9112 §9.5: the server answered and is closing: stop sending the body.
                return True
            sent += len(chunk)
            if chunked:
                size = b"%x\r\n" % len(chunk)
                transport.writelines((size, chunk, b"\r\n") if pending is None else (pending, size, chunk, b"\r\n"))
            else:
                if content_length is not None and sent > content_length:
                    # Bytes past the declared length would be read as the next request.
                    raise UpstreamError(f"request body longer than its Content-Length {content_length}")
                if pending is None:
                    transport.write(chunk)
                else:
                    transport.writelines((pending, chunk))
            pending = None
            if conn._flow.paused:
                del chunk  # the transport holds a copy while the upstream drains: none here
                # A stalled upstream that never reads gets `read_timeout`, as it would for an answer.
                await conn._flow.drain(read_timeout)
        _end_body(conn, pending, sent, chunked, content_length)
        return conn._got_bytes

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = origin.idle
        if not idle:
            return None
        now = self._loop.time()
        deadline = now - self._idle_timeout
        if not origin.proven and self._probation:
            # On probation: only a connection idle long enough, with nothing read meanwhile
            # (data_received would have closed it), and that one proves the origin.
            conn = idle[0]  # the oldest
            if conn._idle_since > now - self._probation:
                return None
            idle.popleft()
            conn._idle = False
            if conn._idle_since > deadline and not conn._transport.is_closing() and conn._clean():
                origin.proven = True
                return conn
            conn._transport.abort()
            return None
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed by the server
            conn._idle = False
            poll = conn._poll  # `_clean`, inlined: this runs for every request
            if conn._idle_since > deadline and not conn._transport.is_closing() and (poll is None or not poll.poll(0)):
                return conn
            conn._transport.abort()
        return None

    async def _connect(self, origin: _Origin, timeout: float) -> _Connection:
        context = self.tls_context() if origin.tls else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self._loop.create_connection(
                    partial(_Connection, self, origin),
                    origin.address,  # type: ignore[arg-type] # bytes (`connect_host`): both loops take them
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context is not None else None,  # a str: `ssl` encodes it
                )
        except TimeoutError:
            # Nothing was sent: the upstream is unreachable (502), not slow to answer (504).
            # Caught first, as builtin TimeoutError is an OSError too.
            raise UpstreamConnectError(f"no connection to {origin.host}:{origin.port} within {timeout:g}s") from None
        except OSError as error:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise UpstreamConnectError(f"cannot connect to {origin.host}:{origin.port}: {cause(error)}") from error
        return conn

    def _put(self, conn: _Connection) -> None:
        origin = conn._origin
        idle = origin.idle
        distrusted = origin.distrusted_until
        if self._closed or len(idle) >= self._max_idle or (distrusted and distrusted > self._loop.time()):
            conn._transport.abort()
            return
        conn._idle = True
        conn._idle_since = self._loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than idle_timeout; oldest sit at the left of each deque."""
        self._sweeper = None
        now = self._loop.time()
        deadline = now - self._idle_timeout
        soonest: float | None = None
        for origin in self._origins.values():
            idle = origin.idle
            while idle and idle[0]._idle_since <= deadline:
                conn = idle.popleft()
                conn._idle = False
                conn._transport.abort()
            if idle and (soonest is None or idle[0]._idle_since < soonest):
                soonest = idle[0]._idle_since
        if soonest is not None:
            self._sweeper = self._loop.call_at(soonest + self._idle_timeout, self._sweep)
