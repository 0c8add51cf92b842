"""An upstream that sends bytes nobody asked for: each request's answer, then stray bytes.

Every answer carries a marker, the request's own (its target's last segment, or a field the
proxy injected such as `X-User-Id`), in `X-Marker` and the body. The stray bytes after it
are, read as the next request's answer, a whole answer with the same marker: one user's
answer given to another. `STRAYS` names every way of sending them; `misbehaving(mode, delay)`
is a `RawServer` handler (tests/support/raw.py) that answers as one of them, the stray bytes
in the same write or `delay()` seconds later, while it reads and answers the next request.
Used by tests/unit/http/test_upstream.py (the pool alone) and
tests/integration/test_upstream_strays.py (the whole proxy, marked by user).
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

from tests.support.raw import Handler


def head_of(marker: bytes, status: int = 200, fields: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nX-Marker: %b\r\n%b\r\n" % (status, marker, fields)


def whole(marker: bytes) -> bytes:
    """A complete answer marked `marker`, in its X-Marker field and its body."""
    return head_of(marker, 200, b"Content-Length: %d\r\n" % len(marker)) + marker


def chunked(marker: bytes) -> bytes:
    return head_of(marker, 200, b"Transfer-Encoding: chunked\r\n") + b"%x\r\n%b\r\n0\r\n\r\n" % (len(marker), marker)


def length(marker: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(whole(marker))


# For a request marked `m`: its method, then the answer and the bytes nobody asked for that a
# misbehaving upstream sends after it. Read as the next request's answer, those bytes are a
# whole answer marked `m`: one user's answer given to another.
STRAYS: dict[str, tuple[str, Callable[[bytes], tuple[bytes, bytes]]]] = {
    "second-answer": ("GET", lambda m: (whole(m), whole(m))),
    "head-body": ("HEAD", lambda m: (head_of(m, 200, length(m)), whole(m))),
    "204-body": ("GET", lambda m: (head_of(m, 204), whole(m))),
    "204-length-body": ("GET", lambda m: (head_of(m, 204, length(m)), whole(m))),
    "304-body": ("GET", lambda m: (head_of(m, 304), whole(m))),
    "304-length-body": ("GET", lambda m: (head_of(m, 304, length(m)), whole(m))),
    "304-chunked-body": (
        "GET",
        lambda m: (
            head_of(m, 304, b"Transfer-Encoding: chunked\r\n"),
            b"%x\r\n%b\r\n0\r\n\r\n" % (len(whole(m)), whole(m)),
        ),
    ),
    "crlf-then-answer": ("GET", lambda m: (whole(m), b"\r\n" + whole(m))),  # llhttp skips CRLFs between messages
    "after-chunked-end": ("GET", lambda m: (chunked(m), whole(m))),
    "garbage-after-chunked-end": ("GET", lambda m: (chunked(m), b"garbage\r\n\r\n")),
}


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request: its head as sent and its de-chunked body; None at a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
    if b"content-length" in fields:
        return head, await reader.readexactly(int(fields[b"content-length"]))
    if fields.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while await reader.readline() != b"\r\n":
                    pass
                return head, bytes(body)
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
    return head, b""


def by_target(head: bytes) -> bytes:
    """The marker of a request for `/…/<marker>`: its target's last segment."""
    return head.split(b" ", 2)[1].rpartition(b"/")[2]


def by_field(name: bytes) -> Callable[[bytes], bytes]:
    """The marker of a request: the value of its field `name` (lower case)."""

    def marker(head: bytes) -> bytes:
        return next(
            line.partition(b":")[2].strip() for line in head.split(b"\r\n") if line.lower().startswith(name + b":")
        )

    return marker


def _carries_a_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether a request has reached this connection that the handler has not answered: bytes
    in the reader's buffer or still in the socket (the handler answers what it reads at once)."""
    if reader._buffer:  # type: ignore[attr-defined]  # (StreamReader has no public way to ask)
        return True
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    return bool(poll.poll(0))


def misbehaving(
    mode: str,
    delay: Callable[[], float] | None,
    marker: Callable[[bytes], bytes] = by_target,
    *,
    when_idle: bool = False,
) -> Handler:
    """An upstream that answers each request (marked by `marker(head)`) as STRAYS[mode] says:
    the stray bytes in the same write when `delay` is None, else `delay()` seconds after the
    answer, while it reads and answers the next request.

    `when_idle`: the late stray bytes wait (in 5 ms steps) until no later request has reached
    the connection, so they never come between a request and its answer. There, nothing tells
    them from the answer (HTTP/1.1 has no request ids): on a loaded machine a 50 ms timer can
    fire late, just after the proxy sent the next request on the connection and before this
    upstream read it, and they are that request's answer. Only the pool's probation
    (upstream.py's `_PROBATION`) keeps such an upstream's connections from being reused that
    soon; a test that turns it off to test reuse at once asks for this."""
    _, make = STRAYS[mode]

    async def later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float, data: bytes) -> None:
        await asyncio.sleep(seconds)
        # (In the same event loop as the proxy: the check and the write are one step, and a
        # request the proxy wrote on loopback is in the socket by then.)
        while when_idle and not writer.is_closing() and _carries_a_request(reader, writer):
            await asyncio.sleep(0.005)
        if not writer.is_closing():
            writer.write(data)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        pending: set[asyncio.Task[None]] = set()
        try:
            while (request := await read_request(reader)) is not None:
                answer, stray = make(marker(request[0]))
                if delay is None:
                    writer.write(answer + stray)
                else:
                    writer.write(answer)
                    task = asyncio.create_task(later(reader, writer, delay(), stray))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
        finally:
            for task in pending:
                task.cancel()

    return handler
