"""A request's Content-Length body counted, not parsed (`http1._Counted`), against llhttp itself:
whatever the client sends, the connection must do exactly what it does when llhttp parses the
body to its end (`_Connection._counts_bodies = False`: the reference).

Each byte stream is fed to a connection twice, once each way, in the same reads: whole, split
in two at every position (short streams), a byte at a time, and for large bodies at the places
that matter (the head's end, the read sizes, the body's end). The reads go into the server's
read buffer as the event loop reads them (`get_buffer`, `buffer_updated`: a relayed body's
reads are views of that buffer), and no read is made while the connection has paused reading.
Both ways must give the same events in the same order: every write to the client (answers,
`100 Continue`, refusals), every piece a handler's sink or reader got, what each handler's
body read ended in, the refusals counted, the connection closed or cut, and what was left
unread. The handlers (below) relay a body, read it, refuse it unread, hit a body limit, fill
their sink, or stop; the streams hold pipelined requests, uploads back to back, chunked
uploads beside counted ones, `Connection: close` and HTTP/1.0 bodies with bytes after them,
bare LF, an upgrade after a body, a body that holds a request, and the smuggling shapes
llhttp refuses (Content-Length with Transfer-Encoding, duplicate or conflicting or signed
Content-Length, obs-fold). No sockets: the transport is the test's, recording.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from proxy.http.http1 import BodyError, BodyTooLarge, Request, Server, _Connection, _Counted

KiB = 1024
TURNS = 30  # loop turns given to the handlers' tasks between reads, and at the end


class Wire(asyncio.Transport):
    """The client's side, recording: writes, closes, pauses (the driver honours them)."""

    def __init__(self, events: list[Any]) -> None:
        super().__init__()
        self.events = events
        self.paused = False
        self.closing = False
        self.conn: _Connection | None = None

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.events.append(("write", re.sub(rb"Date: [^\r]*\r\n", b"Date: -\r\n", bytes(data))))

    def writelines(self, pieces: Any) -> None:
        self.write(b"".join(pieces))

    def is_closing(self) -> bool:
        return self.closing

    def _end(self, how: str) -> None:
        self.events.append((how,))
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)  # type: ignore[union-attr]

    def close(self) -> None:
        self._end("close")

    def abort(self) -> None:
        self._end("abort")

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0


def _options(target: str) -> dict[str, int]:
    _, _, query = target.partition("?")
    return {name: int(value) for name, _, value in (part.partition("=") for part in query.split("&") if part)}


def handler(events: list[Any], kinds: list[type]) -> Any:
    """What each request's target asks for: `/relay` (`relay_body`; `?limit=N` a body limit,
    `?full=N` the sink full after N bytes, `?stop=1` its drain then wanting no more), `/iter`
    (`iter_body`), `/refuse` (answered at once, the body unread); an upgrade is tunnelled (what
    came after its head goes to the tunnel's sink); anything else 200 unread."""

    def handle(request: Request) -> Awaitable[None] | None:
        target = request.raw_path
        events.append(("request", request.method, target, request.content_length, request.version))
        options = _options(target)
        if target.startswith("/refuse"):
            request.respond(401, None, [], b"no")
            return None
        if target.startswith("/iter"):
            return read(request, target)
        if target.startswith("/relay"):
            return relay(request, target, options)
        if request.upgrade:
            return tunnel(request)
        request.respond(200, None, [], b"ok")
        return None

    async def tunnel(request: Request) -> None:
        async def nothing() -> AsyncIterator[bytes]:
            await asyncio.sleep(0)
            return
            yield b""  # (an async generator that ends)

        await request.tunnel(101, None, [("Upgrade", "x")], lambda data: events.append(("tunnel", data)), nothing())

    async def read(request: Request, target: str) -> None:
        got = bytearray()
        try:
            async for piece in request.iter_body():
                events.append(("read", target, piece))
                got += piece
        except BodyError as error:
            events.append(("ended", target, type(error).__name__))
            request.respond(400, None, [], b"unreadable")
            return
        request.respond(200, None, [], b"read %d" % len(got))

    async def relay(request: Request, target: str, options: dict[str, int]) -> None:
        total = 0
        full = options.get("full", 0)

        def sink(data: bytes | memoryview) -> bool:
            nonlocal total, full
            kinds.append(type(data))
            events.append(("piece", target, bytes(data)))
            total += len(data)
            if full and total >= full:
                full = 0  # full once
                return True
            return False

        async def drain() -> bool:
            await asyncio.sleep(0)
            return not options.get("stop")

        try:
            done = await request.relay_body(sink, drain, limit=options.get("limit", 0))
        except BodyTooLarge:
            events.append(("ended", target, "BodyTooLarge"))
            request.respond(413, None, [], b"too large")
            return
        except BodyError as error:
            events.append(("ended", target, type(error).__name__))
            request.respond(400, None, [], b"unreadable")
            return
        events.append(("ended", target, done))
        request.respond(200 if done else 502, None, [], b"relayed %d" % total)

    return handle


async def _turns() -> None:
    for _ in range(TURNS):
        await asyncio.sleep(0)


async def run(reads: list[bytes], *, counted: bool, lose: bool = False) -> tuple[list[Any], bool, list[type]]:
    """The events of one connection fed `reads`; whether a body was counted; the sink's kinds."""
    events: list[Any] = []
    kinds: list[type] = []
    server = Server(handler(events, kinds), on_refusal=lambda status, client: events.append(("refused", status)))
    conn = _Connection(server)
    conn._counts_bodies = counted
    wire = Wire(events)
    wire.conn = conn
    conn.connection_made(wire)
    seen = False
    for index, data in enumerate(reads):
        at = 0
        while at < len(data):
            for _ in range(TURNS):
                if not wire.paused:
                    break
                await asyncio.sleep(0)
            if wire.paused or wire.closing:
                events.append(("unread", sum(map(len, reads[index:])) - at, wire.paused, wire.closing))
                break
            buffer = conn.get_buffer(-1)
            size = min(len(buffer), len(data) - at)
            buffer[:size] = data[at : at + size]
            conn.buffer_updated(size)
            seen = seen or type(conn._parser) is _Counted
            at += size
        else:
            await asyncio.sleep(0)
            continue
        break
    await _turns()
    if lose and not wire.closing:
        wire.closing = True
        events.append(("lost",))
        conn.connection_lost(None)
        await _turns()
    outcome = list(events)
    if not wire.closing:  # (let the handlers' tasks go: nothing of this is compared)
        wire.closing = True
        conn.connection_lost(None)
        await _turns()
    return outcome, seen, kinds


async def same(reads: list[bytes], *, lose: bool = False) -> bool:
    """Both ways give the same events; whether the counted way counted a body."""
    counted, seen, _ = await run(reads, counted=True, lose=lose)
    reference, _, _ = await run(reads, counted=False, lose=lose)
    assert counted == reference, (reads, counted, reference)
    return seen


async def bodies_read(stream: bytes) -> bool:
    """Whether a handler read or relayed a body of the stream, fed whole (then some split of
    it must have been counted)."""
    events, _, _ = await run([stream], counted=False)
    return any(event[0] == "request" and event[3] and event[2].startswith(("/relay", "/iter")) for event in events)


def req(
    method: str,
    target: str,
    body: bytes = b"",
    *fields: str,
    length: int | None = -1,
    version: str = "1.1",
    sep: str = "\r\n",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: t", *fields]
    if length == -1:
        length = len(body) if body or method in ("POST", "PUT") else None
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return (sep.join(lines) + sep + sep).encode() + body


def chunked(target: str, *pieces: bytes) -> bytes:
    return req("POST", target, b"", "Transfer-Encoding: chunked", length=None) + (
        b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    )


NEXT = req("GET", "/next")
BODY = b"0123456789"
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: t\r\n\r\n"

SHORT = {
    "relay, then a request": req("POST", "/relay", BODY) + NEXT,
    "read, then a request": req("POST", "/iter", BODY) + NEXT,
    "refused unread": req("POST", "/refuse", BODY) + NEXT,
    "over the limit": req("POST", "/relay?limit=5", BODY) + NEXT,
    "at the limit": req("POST", "/relay?limit=10", BODY) + NEXT,
    "sink full": req("POST", "/relay?full=4", BODY + b"abcdef") + NEXT,
    "sink full, then no more": req("POST", "/relay?full=4&stop=1", BODY + b"abcdef") + NEXT,
    "unread by a handler": req("POST", "/other", BODY) + NEXT,
    "100-continue": req("POST", "/relay", BODY, "Expect: 100-continue") + NEXT,
    "100-continue refused": req("POST", "/refuse", BODY, "Expect: 100-continue") + NEXT,
    "100-continue read": req("PUT", "/iter", BODY, "Expect: 100-continue") + NEXT,
    "GET with a body": req("GET", "/relay", b"abcde") + NEXT,
    "HEAD with a body": req("HEAD", "/relay", b"abcde") + NEXT,
    "DELETE with a body": req("DELETE", "/iter", b"abcde") + NEXT,
    "HTTP/1.0, then CRLF": req("POST", "/relay", b"abcde", version="1.0") + b"\r\n",
    "HTTP/1.0, then CRLF and a byte": req("POST", "/relay", b"abcde", version="1.0") + b"\r\n\r\nX",
    "HTTP/1.0, then a request": req("POST", "/relay", b"abcde", version="1.0") + NEXT,
    "HTTP/1.0 keep-alive, then a request": req("POST", "/relay", b"abcde", "Connection: keep-alive", version="1.0")
    + NEXT,
    "close, then CRLF": req("POST", "/relay", b"abcde", "Connection: close") + b"\r\n\r\n\n",
    "close, then a request": req("POST", "/relay", b"abcde", "Connection: close") + NEXT,
    "close, then a byte": req("POST", "/iter", b"abcde", "Connection: close") + b"X",
    "CRLF before the next": req("POST", "/relay", b"abcde") + b"\r\n" + NEXT,
    "LF before the next": req("POST", "/relay", b"abcde") + b"\n" + NEXT,
    "a byte too many": req("POST", "/relay", b"abcde") + b"X" + NEXT,
    "a body that holds a request": req("POST", "/relay", SMUGGLED) + NEXT,
    "a body shorter than it says": req("POST", "/relay", b"abc", length=5) + NEXT,
    "bare LF in the next head": req("POST", "/relay", b"abcde") + req("GET", "/next", sep="\n"),
    "bare LF in the head": req("POST", "/relay", b"abcde", sep="\n") + NEXT,
    "CL and TE": req("POST", "/relay", b"", "Transfer-Encoding: chunked", length=5) + b"0\r\n\r\n" + NEXT,
    "TE and CL": req("POST", "/relay", b"0\r\n\r\n", "Transfer-Encoding: chunked") + NEXT,
    "CL twice, the same": req("POST", "/relay", b"abcde", "Content-Length: 5") + NEXT,
    "CL twice, different": req("POST", "/relay", b"abcde", "Content-Length: 6") + b"X" + NEXT,
    "CL as a list": req("POST", "/relay", b"abcde", "Content-Length: 5, 5", length=None) + NEXT,
    "CL signed": req("POST", "/relay", b"abcde", "Content-Length: +5", length=None) + NEXT,
    "CL with zeros": req("POST", "/relay", b"abcde", "Content-Length: 005", length=None) + NEXT,
    "CL with spaces": req("POST", "/relay", b"abcde", "Content-Length:  5 ", length=None) + NEXT,
    "CL folded": req("POST", "/relay", b"abcde", "Content-Length: 5", " 5", length=None) + NEXT,
    "CL zero": req("POST", "/relay", b"", length=0) + NEXT,
    "no Host": b"POST /relay HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde" + NEXT,
    "upgrade with a body": req("POST", "/relay", b"abcde", "Upgrade: x", "Connection: upgrade") + NEXT,
    "an upgrade after a body": req("POST", "/relay", b"abcde")
    + req("GET", "/up", b"", "Upgrade: x", "Connection: upgrade", length=None)
    + b"raw bytes",
    "two uploads": req("POST", "/relay", b"abcde") + req("PUT", "/iter", b"fghij"),
    "three uploads": req("POST", "/relay", b"abcde")
    + req("POST", "/relay?limit=3", b"fghij")
    + req("POST", "/iter", b"k"),
    "chunked, then counted": chunked("/relay", b"abc", b"de") + req("POST", "/relay", b"fghij"),
    "counted, then chunked": req("POST", "/relay", b"abcde") + chunked("/iter", b"fg", b"hij"),
    "counted, then chunked and refused": req("POST", "/iter", b"abcde") + chunked("/refuse", b"fg"),
    "a bad method after": req("POST", "/relay", b"abcde") + b"BREW / HTTP/1.1\r\nHost: t\r\n\r\n",
    "HTTP/2.0 after": req("POST", "/relay", b"abcde") + b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",
    "CONNECT after": req("POST", "/relay", b"abcde") + b"CONNECT t:443 HTTP/1.1\r\nHost: t\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SHORT))
async def test_every_split_of_a_short_stream(name: str) -> None:
    stream = SHORT[name]
    counted = await same([stream])
    for at in range(1, len(stream)):
        counted = await same([stream[:at], stream[at:]]) or counted
    if await bodies_read(stream):
        assert counted, "no split counted a body"


@pytest.mark.parametrize("name", list(SHORT))
async def test_a_short_stream_a_byte_at_a_time(name: str) -> None:
    stream = SHORT[name]
    await same([stream[at : at + 1] for at in range(len(stream))])
    await same([stream[at : at + 3] for at in range(0, len(stream), 3)])


@pytest.mark.parametrize("name", list(SHORT))
async def test_a_client_that_leaves_mid_stream(name: str) -> None:
    stream = SHORT[name]
    for at in range(1, len(stream) + 1):
        await same([stream[:at]], lose=True)


def _big(size: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(size))


LARGE = {
    "300 KiB relayed, then a request": req("POST", "/relay", _big(300 * KiB)) + NEXT,
    "1 MiB relayed": req("PUT", "/relay", _big(1024 * KiB)),
    "100 KiB read": req("POST", "/iter", _big(100 * KiB)) + NEXT,
    "100 KiB over a 64 KiB limit": req("POST", "/relay?limit=65536", _big(100 * KiB)) + NEXT,
    "300 KiB, the sink full": req("POST", "/relay?full=100000", _big(300 * KiB)) + NEXT,
    "300 KiB, then no more": req("POST", "/relay?full=40000&stop=1", _big(300 * KiB)) + NEXT,
    "refused unread": req("POST", "/refuse", _big(100 * KiB)) + NEXT,
    "two uploads": req("POST", "/relay", _big(40 * KiB)) + req("POST", "/relay", _big(50 * KiB, 3)) + NEXT,
    "an upload, then 20 pipelined": req("POST", "/relay", _big(40 * KiB)) + NEXT * 20,
    "close, then CRLF and a byte": req("POST", "/relay", _big(50 * KiB), "Connection: close") + b"\r\n" * 10 + b"X",
    "then CRLF past the stall limit": req("POST", "/relay", _big(40 * KiB)) + b"\r\n" * (48 * KiB),
    "close, then CRLF past the stall limit": req("POST", "/relay", _big(40 * KiB), "Connection: close")
    + b"\r\n" * (48 * KiB),
    "a body of requests": req("POST", "/relay", NEXT * 3000) + NEXT,
    "chunked, then counted": chunked("/relay", _big(40 * KiB), _big(30 * KiB, 1))
    + req("POST", "/relay", _big(70 * KiB)),
}


def _splits(stream: bytes) -> list[int]:
    head = stream.index(b"\r\n\r\n") + 4
    places = {1, head - 1, head, head + 1, 4 * KiB, 32 * KiB, 32 * KiB + head, 256 * KiB, len(stream) - len(NEXT)}
    places |= {len(stream) - 1, len(stream) - 2}
    return sorted(at for at in places if 0 < at < len(stream))


@pytest.mark.parametrize("name", list(LARGE))
async def test_a_large_body(name: str) -> None:
    stream = LARGE[name]
    counted = await same([stream])
    for at in _splits(stream):
        counted = await same([stream[:at], stream[at:]]) or counted
        await same([stream[:at]], lose=True)
    await same([stream[at : at + 1000] for at in range(0, min(len(stream), 60 * KiB), 1000)] + [stream[60 * KiB :]])
    if "chunked" not in name:
        assert counted


async def test_a_relayed_body_is_passed_on_as_views_of_the_read_buffer() -> None:
    """What the counted way is for: a relayed read goes to the sink as it came, not copied
    (llhttp gives `on_body` bytes of its own); the sink gets the same bytes either way."""
    stream = req("POST", "/relay", _big(300 * KiB)) + NEXT
    counted, seen, kinds = await run([stream], counted=True)
    reference, _, reference_kinds = await run([stream], counted=False)
    assert counted == reference and seen
    assert memoryview in kinds and memoryview not in reference_kinds
