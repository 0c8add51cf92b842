"""Through the real proxy, on raw sockets: how a connection ends (proxy/http/http1.py).

A client that half-closes (sends its requests, then `shutdown(SHUT_WR)`, as `nc -N` or an
HTTP/1.0 client does) is answered every complete request it sent, and then the proxy closes
(RFC 9112 §9.6); a request the half-close cut short gets no answer, as when the client closes
outright. A WebSocket tunnel passes the half-close on to the upstream.

A connection the proxy closes after a refusal while the client may still be sending (an upload
refused before its body was read, a malformed request, a slow head) is closed the lingering way
(RFC 9112 §9.6): the write side first, then what the client still sends is read and dropped, for
at most `LINGER_TIME` seconds and `LINGER_BYTES` bytes, then the connection is closed. Closing at
once with the client's bytes unread makes the kernel answer them with a reset: a client that
sends its whole body before reading (most do) fails on the reset and never reads the refusal.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from yarl import URL

from proxy.http import http1
from proxy.http.http1 import Server
from tests.conftest import TestKey, mint
from tests.integration.conftest import BASE_CONFIG, Sidecar
from tests.integration.test_http1_attacks import server_url, ws_head
from tests.integration.test_security import first_response
from tests.integration.test_wire_review import server_frames, ws_frame
from tests.support.raw import bounded_by, eventually

bounded = bounded_by(20.0)
BIG_CONFIG = BASE_CONFIG.replace("max_body: 1MB", "max_body: 64MB")
PIECE = 64 * 1024


async def connect(where: Sidecar | str) -> socket.socket:
    url = URL(where if isinstance(where, str) else where.url)
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (url.host, url.port)), 2.0)
    return sock


async def send_body(sock: socket.socket, size: int, *, burst: int = 4) -> OSError | None:
    """Send `size` bytes in 64 KiB writes, `burst` writes at a time with a pause between, as an
    upload goes out; the error the sending met (a reset), or None."""
    loop = asyncio.get_running_loop()
    piece = b"a" * PIECE
    sent = 0
    try:
        while sent < size:
            for _ in range(burst):
                await asyncio.wait_for(loop.sock_sendall(sock, piece[: size - sent]), 5.0)
                sent += min(PIECE, size - sent)
                if sent >= size:
                    break
            await asyncio.sleep(0.005)
    except (OSError, TimeoutError) as error:
        return error if isinstance(error, OSError) else OSError(f"send stalled after {sent} bytes")
    return None


async def read_all(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything the proxy sends, and how it ended: "eof", "reset" or "timeout"."""
    loop = asyncio.get_running_loop()
    got = b""
    try:
        async with asyncio.timeout(timeout):
            while more := await loop.sock_recv(sock, 65536):
                got += more
    except TimeoutError:
        return got, "timeout"
    except ConnectionError:
        return got, "reset"
    return got, "eof"


def answers(raw: bytes) -> list[tuple[int, bytes, dict[str, str]]]:
    """Each complete answer in `raw` (Content-Length framed): status, body, head fields."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields.get("content-length", "0"))
        if len(rest) < length:
            break
        out.append((int(lines[0].split()[1]), rest[:length], fields))
        raw = rest[length:]
    return out


async def own_server(s: Sidecar, **options: Any) -> Server:
    """A second listener of the sidecar's proxy, with server options of its own."""
    server = s.proxy.server(**options)
    await server.listen("127.0.0.1", 0)
    return server


async def settled(s: Sidecar) -> None:
    """Every connection closed and counted so, no request left in flight."""
    await eventually(lambda: s.runtime.metrics.connections.open == 0 and s.runtime.metrics.in_flight == 0, 5.0)


# -- 1. a client that half-closes -------------------------------------------------------------------
HALF_CLOSED = [
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n", [200], id="one-request"),
    pytest.param(b"GET /public/a HTTP/1.0\r\n\r\n", [200], id="http10"),
    pytest.param(b"GET /public/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", [200], id="http10-keep-alive"),
    pytest.param(b"GET /orders HTTP/1.1\r\nHost: x\r\n\r\n", [401], id="refused-from-the-head"),
    pytest.param(
        b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n" * 3 + b"GET /orders HTTP/1.1\r\nHost: x\r\n\r\n",
        [200, 200, 200, 401],
        id="pipelined",
    ),
    pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", [200], id="with-a-body"),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        [200],
        id="chunked",
    ),
    pytest.param(
        b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\nGET /public/b HTTP/1.1\r\nHost: x\r\nX-Cut: ",
        [200],
        id="complete-then-a-head-cut-short",
    ),
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Cut: ", [], id="a-head-cut-short"),
    pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello", [], id="a-body-cut-short"),
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", [400], id="malformed"),
]


@pytest.mark.parametrize(("data", "statuses"), HALF_CLOSED)
@bounded
async def test_a_half_closed_client_gets_every_answer_it_asked_for_then_the_close(
    sidecar: Any, data: bytes, statuses: list[int]
) -> None:
    s = await sidecar()
    sock = await connect(s)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
        raw, how = await read_all(sock)
    finally:
        sock.close()
    assert how == "eof", raw
    assert [status for status, _, _ in answers(raw)] == statuses, raw
    assert len(s.upstream.seen) == statuses.count(200)
    if b"Content-Length: 10" in data:
        assert s.upstream.seen == []  # the body cut short never went on
    await settled(s)


@bounded
async def test_a_half_closed_upload_relayed_whole_is_answered(sidecar: Any) -> None:
    """A body far larger than a read (relayed, or spliced, to the upstream as it comes), sent
    whole before the half-close: the upstream receives all of it and the client its answer."""
    s = await sidecar(BIG_CONFIG)
    size = 6 * 1024 * 1024
    sock = await connect(s)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        assert await send_body(sock, size, burst=16) is None
        sock.shutdown(socket.SHUT_WR)
        raw, how = await read_all(sock, 10.0)
    finally:
        sock.close()
    assert how == "eof"
    [(status, body, _)] = answers(raw)
    assert status == 200 and json.loads(body)["body_size"] == size
    await settled(s)


@bounded
async def test_a_half_close_while_the_upstream_is_still_answering_waits_for_the_answer(sidecar: Any) -> None:
    s = await sidecar()
    sock = await connect(s)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"GET /slow?seconds=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        raw, how = await read_all(sock)
    finally:
        sock.close()
    # (/slow is on the `api` route: 401 from the head.) Then the same on the public route.
    assert how == "eof" and [a[0] for a in answers(raw)] == [401]
    s2 = await sidecar(BASE_CONFIG.replace("path_prefix: /public/", "path_prefix: /slow"))
    sock = await connect(s2)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"GET /slow?seconds=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        raw, how = await read_all(sock)
    finally:
        sock.close()
    assert how == "eof"
    [(status, body, _)] = answers(raw)
    assert status == 200 and json.loads(body) == {"slow": True}
    await settled(s2)


@bounded
async def test_a_half_close_on_an_idle_keep_alive_connection_closes_it_at_once(sidecar: Any) -> None:
    s = await sidecar()
    sock = await connect(s)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        while not answers(raw):
            raw += await asyncio.wait_for(loop.sock_recv(sock, 65536), 3.0)
        assert s.runtime.metrics.connections.open == 1
        sock.shutdown(socket.SHUT_WR)
        # (The keep-alive timeout is 75 s: the close is the half-close's.)
        rest, how = await read_all(sock, 3.0)
    finally:
        sock.close()
    assert how == "eof" and rest == b""
    await settled(s)


@bounded
async def test_a_half_close_in_a_websocket_tunnel_reaches_the_upstream(sidecar: Any, rsa_key: TestKey) -> None:
    """The client's half-close goes on to the upstream as a half-close: what the upstream still
    sends (the echo of the client's last frame, then its close) reaches the client."""
    s = await sidecar()
    sock = await connect(s)
    loop = asyncio.get_running_loop()
    try:
        token = mint({"sub": "ws-user"}, key=rsa_key)
        await loop.sock_sendall(sock, ws_head("/ws", f"Authorization: Bearer {token}\r\n"))
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += await asyncio.wait_for(loop.sock_recv(sock, 65536), 3.0)
        head, _, frames = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        await loop.sock_sendall(sock, ws_frame(b"last words"))
        sock.shutdown(socket.SHUT_WR)
        rest, how = await read_all(sock, 5.0)
    finally:
        sock.close()
    assert how == "eof"
    assert server_frames(frames + rest)[:2] == [b"hello ws-user", b"last words"]
    await settled(s)


# -- 2. the lingering close after a refusal ----------------------------------------------------------
def _refused_uploads() -> list[Any]:
    big = 4 * 1024 * 1024
    return [
        pytest.param(
            b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % big, big, 413, id="413-too-large"
        ),
        pytest.param(
            b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % big, big, 401, id="401-before-the-body"
        ),
        pytest.param(
            b"POST /public/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            big,
            400,
            id="400-bad-chunk",
        ),
        pytest.param(
            b"GET /public/a HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 8000 + b"\r\n",
            big,
            431,
            id="431-head-too-large",
        ),
    ]


@pytest.mark.parametrize(("head", "size", "status"), _refused_uploads())
@bounded
async def test_a_client_that_sends_its_whole_upload_before_reading_gets_the_refusal(
    sidecar: Any, head: bytes, size: int, status: int
) -> None:
    """The client writes the head, then the whole body in bursts, and only then reads, as
    blocking clients do: the refusal came early, and it is read whole, then the close."""
    s = await sidecar()
    sock = await connect(s)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, head)
        sending = await send_body(sock, size)
        raw, how = await read_all(sock)
    finally:
        sock.close()
    assert sending is None, f"the upload met {sending!r} (the refusal's close reset the connection)"
    assert how == "eof"
    [(got, _, fields)] = answers(raw)
    assert got == status and fields["connection"] == "close"
    assert s.upstream.seen == []
    await settled(s)


@bounded
async def test_a_client_that_sends_after_a_408_can_still_read_it(sidecar: Any) -> None:
    s = await sidecar()
    server = await own_server(s, header_timeout=0.3)
    try:
        sock = await connect(server_url(server))
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"GET /public/a HTTP/1.1\r\nHost: x\r\n")
            await asyncio.sleep(0.6)  # past header_timeout: the 408 is sent (and the connection closed)
            sending = await send_body(sock, 1024 * 1024)
            raw, how = await read_all(sock)
        finally:
            sock.close()
        assert sending is None, f"sending met {sending!r}"
        assert how == "eof" and [a[0] for a in answers(raw)] == [408]
        await eventually(lambda: s.runtime.metrics.connections.open == 0, 5.0)
    finally:
        await server.shutdown(0)


@bounded
async def test_a_client_that_never_stops_sending_is_closed_at_the_lingering_bounds(sidecar: Any) -> None:
    """Fast (the byte bound) and slow (the time bound): the connection ends either way, the
    refusal read first, and nothing is left counted."""
    s = await sidecar()
    loop = asyncio.get_running_loop()
    head = b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"
    # Fast: 64 KiB writes, as fast as the proxy reads them, until the connection breaks.
    sock = await connect(s)
    try:
        await loop.sock_sendall(sock, head)
        sending = await send_body(sock, 4 * http1.LINGER_BYTES, burst=64)
        assert sending is not None, "the proxy read more than its lingering bound"
        raw, _ = await read_all(sock, 3.0)
    finally:
        sock.close()
    assert raw.startswith(b"HTTP/1.1 413 ")
    await settled(s)
    # Slow: 1 KiB every 20 ms, well within the byte bound, for up to three times the time bound.
    sock = await connect(s)
    try:
        await loop.sock_sendall(sock, head)
        began = time.monotonic()
        broke = False
        while time.monotonic() - began < 3 * http1.LINGER_TIME:
            try:
                await loop.sock_sendall(sock, b"a" * 1024)
            except OSError:
                broke = True
                break
            await asyncio.sleep(0.02)
        assert broke, "the proxy lingered past its time bound"
    finally:
        sock.close()
    await settled(s)


@bounded
async def test_a_shutdown_does_not_wait_for_a_lingering_connection_past_its_bound(sidecar: Any) -> None:
    s = await sidecar()
    server = await own_server(s)
    sock = await connect(server_url(server))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def trickle() -> None:
        with_error = False
        while not stop.is_set() and not with_error:
            try:
                await loop.sock_sendall(sock, b"a" * 1024)
            except OSError:
                with_error = True
            await asyncio.sleep(0.02)

    try:
        await loop.sock_sendall(sock, b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        sending = asyncio.create_task(trickle())
        raw = b""
        while not answers(raw):
            raw += await asyncio.wait_for(loop.sock_recv(sock, 65536), 3.0)
        assert raw.startswith(b"HTTP/1.1 413 ")
        # Lingering: the connection is still open (and counted), its request is not.
        await eventually(lambda: s.runtime.metrics.in_flight == 0, 2.0)
        assert s.runtime.metrics.connections.open == 1
        began = time.monotonic()
        await server.shutdown(30.0)
        took = time.monotonic() - began
        stop.set()
        await sending
    finally:
        sock.close()
    assert took < http1.LINGER_TIME + 1.5, f"the shutdown waited {took:.1f}s"
    await eventually(lambda: s.runtime.metrics.connections.open == 0, 3.0)


@bounded
async def test_a_refusal_answered_whole_closes_without_lingering_when_nothing_more_comes(sidecar: Any) -> None:
    """The client reads the refusal and closes: the proxy's side closes with it, at once."""
    s = await sidecar()
    sock = await connect(s)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"GET /public/a HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n")
        raw, how = await read_all(sock, 3.0)
    finally:
        sock.close()
    assert how == "eof" and first_response(raw).status == 400
    await settled(s)
