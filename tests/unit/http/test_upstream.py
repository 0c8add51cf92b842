"""proxy.upstream against real loopback servers: hand-written HTTP for exact wire control, aiohttp for realism.

Every test is bounded by `bounded` (asyncio.wait_for); no mocks, no external addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.http.flow import HELD
from proxy.http.upstream import Pool, Response, UpstreamConnectError, UpstreamError, UpstreamProtocolError, _Connection
from tests.support.raw import Handler, bounded_by, eventually
from tests.support.strays import STRAYS, misbehaving, read_request, whole
from tests.support.tls import self_signed_files

LIMIT = 10.0  # seconds any one test may take
MiB = 1024 * 1024


bounded = bounded_by(LIMIT)


# --- hand-written requests and answers (the server: tests/support/raw.py) --------------


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """A handler that answers each request on a connection with the next of `answers`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        for answer in answers:
            if await read_request(reader) is None:
                return
            writer.write(answer)
            await writer.drain()
        if not then_close:
            await reader.read()  # hold the connection open until the client closes it

    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def first_then(answer: bytes) -> Handler:
    """The first connection answers its first request with `answer`; after that, every
    request on any connection gets OK."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        first = index == 1
        while await read_request(reader) is not None:
            writer.write(answer if first else OK)
            first = False

    return handler


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    # Without the probation (reuse only after 0.1 s idle until an origin proves itself, see
    # test_an_origin_on_probation_*): these tests are about the reuse itself.
    pool = Pool(probation=0)
    yield pool
    await pool.close()


async def send(
    pool: Pool,
    port: int,
    target: str = "/",
    *,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: AsyncIterator[bytes] | None = None,
    content_length: int | None = None,
    read_timeout: float = 5.0,
    connect_timeout: float = 5.0,
    scheme: str = "http",
    host: str = "127.0.0.1",
) -> Response:
    return await pool.request(
        method,
        scheme,
        host,
        port,
        target,
        headers,
        body,
        content_length=content_length,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


async def body_of(response: Response) -> bytes:
    return b"".join([chunk async for chunk in response.iter_chunks()])


async def fetch(pool: Pool, port: int, target: str = "/", **kwargs: Any) -> tuple[Response, bytes]:
    response = await send(pool, port, target, **kwargs)
    body = await body_of(response)
    response.release()
    return response, body


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


# --- an aiohttp upstream ---------------------------------------------------------------


class Seen:
    """What the aiohttp upstream observed: client ports (one per connection) and bytes streamed."""

    def __init__(self) -> None:
        self.peers: set[int] = set()
        self.sent = 0


SEEN = web.AppKey("seen", Seen)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[SEEN].peers.add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
    return web.json_response(
        {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body": body.decode(),
        }
    )


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()  # no length: aiohttp answers HTTP/1.1 with chunked coding
    await response.prepare(request)
    for piece in (b"alpha ", b"beta ", b"gamma"):
        await response.write(piece)
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def _big(request: web.Request) -> web.StreamResponse:
    size = int(request.query["mib"]) * MiB
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    block = bytes(range(256)) * 256  # 64 KiB
    for _ in range(size // len(block)):
        await response.write(block)
        request.app[SEEN].sent += len(block)
    await response.write_eof()
    return response


async def _hello(request: web.Request) -> web.Response:
    request.app[SEEN].peers.add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
    return web.Response(text="hello", headers={"X-Kind": "hello"})


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    app = web.Application()
    app[SEEN] = Seen()
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/big", _big)
    app.router.add_get("/hello", _hello)  # add_get also answers HEAD
    return await aiohttp_server(app)


# --- bodies and framing ----------------------------------------------------------------


@bounded
async def test_get_against_aiohttp_sends_exactly_the_given_headers(pool: Pool, upstream: Any) -> None:
    headers = [("X-Dup", "1"), ("X-Single", "s"), ("X-Dup", "2"), ("X-Forwarded-For", "10.0.0.1")]
    response = await send(pool, upstream.port, "/echo?a=1&b=%2Fx", headers=headers)
    assert response.status == 200 and response.reason == "OK"
    assert response.has_body()
    seen = json.loads(await response.read(64 * 1024) or b"")
    response.release()
    assert seen["method"] == "GET" and seen["target"] == "/echo?a=1&b=%2Fx"
    assert seen["headers"] == [
        ["X-Dup", "1"],
        ["X-Single", "s"],
        ["X-Dup", "2"],
        ["X-Forwarded-For", "10.0.0.1"],
        ["Host", f"127.0.0.1:{upstream.port}"],
    ]
    assert ("Content-Type", "application/json; charset=utf-8") in response.headers


@bounded
async def test_request_head_on_the_wire(pool: Pool, raw_server: Any) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while (request := await read_request(reader)) is not None:
            heads.append(request[0])
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = await raw_server(handler)
    await fetch(pool, server.port, "/p%20q?x=%2F", headers=[("X-One", "1"), ("X-Dup", "a"), ("X-Dup", "b")])
    # A caller's Host is kept (and not added twice); a stray Content-Length is ours to write.
    await fetch(pool, server.port, "/", method="DELETE", headers=[("host", "svc.internal"), ("Content-Length", "9")])
    assert heads == [
        f"GET /p%20q?x=%2F HTTP/1.1\r\nX-One: 1\r\nX-Dup: a\r\nX-Dup: b\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode(),
        b"DELETE / HTTP/1.1\r\nhost: svc.internal\r\n\r\n",
    ]


@bounded
async def test_request_head_is_one_write(pool: Pool) -> None:
    """A blocking server in a thread wakes on the first segment: a split head would show up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(LIMIT)
    first_reads: list[bytes] = []

    def serve() -> None:
        connection, _ = listener.accept()
        connection.settimeout(LIMIT)
        with connection:
            while data := connection.recv(65536):
                first_reads.append(data)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    headers = [(f"X-Header-{i}", "v" * 40) for i in range(30)]
    try:
        for _ in range(30):
            await fetch(pool, listener.getsockname()[1], "/one", headers=headers)
    finally:
        await pool.close()
        await asyncio.to_thread(thread.join, LIMIT)
        listener.close()
    assert len(first_reads) == 30
    assert all(read.startswith(b"GET /one HTTP/1.1\r\n") and read.endswith(b"\r\n\r\n") for read in first_reads)


@bounded
async def test_chunked_response_with_extensions_and_trailers(pool: Pool, raw_server: Any) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b'5;name=value\r\nhello\r\n6;flag;q="x y"\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n'
    )
    server = await raw_server(answering(chunked, OK))
    response, body = await fetch(pool, server.port)
    assert body == b"hello world"
    assert ("Transfer-Encoding", "chunked") in response.headers
    # The trailer section was consumed: the next answer on the same connection parses.
    assert (await fetch(pool, server.port))[1] == b"ok"
    assert server.connections == 1


@bounded
async def test_chunked_response_from_aiohttp(pool: Pool, upstream: Any) -> None:
    response = await send(pool, upstream.port, "/chunked")
    assert await response.read(1024) is None  # no length known yet: nothing consumed
    assert await body_of(response) == b"alpha beta gamma"
    response.release()
    assert pool.idle_count() == 1


@bounded
async def test_chunked_upload_to_aiohttp(pool: Pool, upstream: Any) -> None:
    response = await send(pool, upstream.port, "/echo", method="POST", body=chunks_of(b"ab", b"", b"cd" * 5000))
    seen = json.loads(await body_of(response))
    response.release()
    assert seen["body"] == "ab" + "cd" * 5000
    assert ["Transfer-Encoding", "chunked"] in seen["headers"]
    assert not any(name.lower() == "content-length" for name, _ in seen["headers"])


@bounded
async def test_chunked_upload_on_the_wire(pool: Pool, raw_server: Any) -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"\r\nTransfer-Encoding: chunked\r\n" in head
        received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(OK)
        await reader.read()

    server = await raw_server(handler)
    await fetch(pool, server.port, method="PUT", body=chunks_of(b"abc", b"", b"0123456789abcdefX"))
    assert received == [b"3\r\nabc\r\n11\r\n0123456789abcdefX\r\n0\r\n\r\n"]


@bounded
async def test_content_length_upload_to_aiohttp(pool: Pool, upstream: Any) -> None:
    response = await send(
        pool,
        upstream.port,
        "/echo",
        method="PUT",
        headers=[("Content-Length", "999")],
        body=chunks_of(b"hello ", b"world"),
        content_length=11,
    )
    seen = json.loads(await body_of(response))
    response.release()
    assert seen["method"] == "PUT" and seen["body"] == "hello world"
    assert [v for k, v in seen["headers"] if k.lower() == "content-length"] == ["11"]
    assert not any(name.lower() == "transfer-encoding" for name, _ in seen["headers"])


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", id="http11-connection-close"),
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\n", id="http10"),
    ],
)
@bounded
async def test_close_delimited_body_ends_at_eof(pool: Pool, raw_server: Any, answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(answer + b"first part, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"second part")

    server = await raw_server(handler)
    response = await send(pool, server.port)
    assert await response.read(1024) is None  # length unknown until EOF
    assert await body_of(response) == b"first part, second part"
    response.release()
    assert pool.idle_count() == 0


# --- keep-alive ----------------------------------------------------------------------


@bounded
async def test_sequential_requests_share_one_connection(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(answering(OK, OK, OK))
    for _ in range(3):
        _response, body = await fetch(pool, server.port)
        assert body == b"ok"
    assert server.connections == 1
    assert pool.idle_count() == 1


@bounded
async def test_concurrent_requests_get_their_own_answers(pool: Pool, upstream: Any) -> None:
    async def one(i: int) -> None:
        body = f"request {i} ".encode() * (i + 1)
        response = await send(
            pool,
            upstream.port,
            f"/echo?i={i}",
            method="POST",
            body=chunks_of(body),
            content_length=len(body),
            headers=[("X-I", str(i))],
        )
        seen = json.loads(await body_of(response))
        response.release()
        assert (seen["target"], seen["body"], seen["headers"][0]) == (f"/echo?i={i}", body.decode(), ["X-I", str(i)])

    seen = upstream.app[SEEN]
    await asyncio.gather(*(one(i) for i in range(40)))
    first_round = set(seen.peers)
    # All 40 were in flight at once with nothing pooled yet: one connection each, none shared.
    assert len(first_round) == 40
    assert pool.idle_count() == len(first_round), "every connection came back to the pool"
    await asyncio.gather(*(one(i) for i in range(40)))  # the second round runs on the pooled connections
    assert seen.peers == first_round, "the second round opened no new connection"
    assert pool.idle_count() == len(first_round)
    assert len(upstream.app[SEEN].peers) == pool.idle_count()


@bounded
async def test_sequential_requests_share_one_connection_aiohttp(pool: Pool, upstream: Any) -> None:
    for _ in range(5):
        assert (await fetch(pool, upstream.port, "/hello"))[1] == b"hello"
    assert len(upstream.app[SEEN].peers) == 1


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", id="connection-close"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, Close\r\n\r\nok", id="close-token"
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="http10"),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok", id="http10-keep-alive"
        ),
    ],
)
@bounded
async def test_connection_not_reused(pool: Pool, raw_server: Any, answer: bytes) -> None:
    server = await raw_server(answering(answer, answer))
    for _ in range(2):
        assert (await fetch(pool, server.port))[1] == b"ok"
        assert pool.idle_count() == 0
    assert server.connections == 2


@bounded
async def test_idle_connections_beyond_the_cap_are_closed(raw_server: Any) -> None:
    pool = Pool(max_idle_per_origin=1, probation=0)
    arrived = 0
    both = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        nonlocal arrived
        await read_request(reader)
        arrived += 1
        if arrived == 2:
            both.set()
        await both.wait()  # hold both answers until both connections are in use
        writer.write(OK)
        await reader.read()

    server = await raw_server(handler)
    try:
        await asyncio.gather(fetch(pool, server.port), fetch(pool, server.port))
        assert server.connections == 2
        assert pool.idle_count() == 1
        await eventually(lambda: server.closed == 1)
    finally:
        await pool.close()
    await eventually(lambda: server.closed == 2)


@bounded
async def test_idle_timeout_closes_the_connection(raw_server: Any) -> None:
    pool = Pool(idle_timeout=0.2, probation=0)
    server = await raw_server(answering(OK, OK))
    try:
        await fetch(pool, server.port)
        assert pool.idle_count() == 1
        await eventually(lambda: server.closed == 1)  # the sweeper closed it, no request needed
        assert pool.idle_count() == 0
        await fetch(pool, server.port)
        assert server.connections == 2
    finally:
        await pool.close()


@bounded
async def test_pool_close_closes_idle_connections(raw_server: Any) -> None:
    pool = Pool(probation=0)
    server = await raw_server(answering(OK))
    await fetch(pool, server.port)
    assert pool.idle_count() == 1
    await pool.close()
    assert pool.idle_count() == 0
    await eventually(lambda: server.closed == 1)
    with pytest.raises(RuntimeError):
        await send(pool, server.port)


@bounded
async def test_unsolicited_bytes_on_an_idle_connection_drop_it(pool: Pool, raw_server: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        if index == 1:
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    server = await raw_server(handler)
    await fetch(pool, server.port)
    await eventually(lambda: pool.idle_count() == 0)
    assert (await fetch(pool, server.port))[1] == b"ok"
    assert server.connections == 2


def stale_after_first() -> Handler:
    """The first connection answers once, then reads the next request and closes unanswered."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        if index == 1:
            await read_request(reader)
            writer.write(OK)
            await read_request(reader)
            return
        while await read_request(reader) is not None:
            writer.write(OK)

    return handler


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
@bounded
async def test_idempotent_request_retried_once_on_a_stale_connection(pool: Pool, raw_server: Any, method: str) -> None:
    server = await raw_server(stale_after_first())
    await fetch(pool, server.port)
    response, body = await fetch(pool, server.port, method=method)
    assert response.status == 200
    assert body == (b"" if method == "HEAD" else b"ok")
    assert server.connections == 2


@pytest.mark.parametrize(
    ("method", "body"),
    [
        pytest.param("POST", None, id="post"),
        pytest.param("PATCH", None, id="patch"),
        pytest.param("PUT", b"data", id="put-with-body"),
    ],
)
@bounded
async def test_unsafe_request_on_a_stale_connection_is_not_retried(
    pool: Pool, raw_server: Any, method: str, body: bytes | None
) -> None:
    server = await raw_server(stale_after_first())
    await fetch(pool, server.port)
    with pytest.raises(UpstreamConnectError):
        await send(
            pool,
            server.port,
            method=method,
            body=None if body is None else chunks_of(body),
            content_length=None if body is None else len(body),
        )
    await asyncio.sleep(0.05)
    assert server.connections == 1


@bounded
async def test_fresh_connection_failure_is_not_retried(pool: Pool, raw_server: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)  # then close without a byte of answer

    server = await raw_server(handler)
    with pytest.raises(UpstreamConnectError):
        await send(pool, server.port)
    await asyncio.sleep(0.05)
    assert server.connections == 1


# --- bodiless and interim answers -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "answer", "reused"),
    [
        # A HEAD answer's connection is never reused: an upstream that sends the GET's body anyway
        # (the common bug) may send it after the head, when the next request is on its way.
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", False, id="head-content-length"),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, id="head-content-length-0"),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False, id="head-chunked"),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", False, id="head-gzip"),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nX-No-Length: 1\r\n\r\n", False, id="head-no-length"),
        # A 204 or 304 that announces content bets on a body that must not come: not reused either.
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 100\r\n\r\n", False, id="204-content-length"),
        pytest.param(
            "GET",
            b'HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nETag: "x"\r\n\r\n',
            False,
            id="304-content-length",
        ),
        pytest.param(
            "GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", False, id="304-chunked"
        ),
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\n", True, id="204"),
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", True, id="204-content-length-0"),
        pytest.param("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n', True, id="304"),
    ],
)
@bounded
async def test_bodiless_answers(pool: Pool, raw_server: Any, method: str, answer: bytes, reused: bool) -> None:
    server = await raw_server(first_then(answer))
    response = await send(pool, server.port, method=method)
    assert not response.has_body()
    assert await response.read(1024) == b""
    assert await body_of(response) == b""
    response.release()
    assert pool.idle_count() == (1 if reused else 0)
    assert (await fetch(pool, server.port))[1] == b"ok"  # the framing stayed in step
    assert server.connections == (1 if reused else 2)


@bounded
async def test_head_answer_with_connection_close_is_not_reused(pool: Pool, raw_server: Any) -> None:
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: keep-alive, close\r\n\r\n"
    server = await raw_server(answering(close, close))
    for _ in range(2):
        response, _ = await fetch(pool, server.port, method="HEAD")
        assert response.status == 200 and pool.idle_count() == 0
    assert server.connections == 2


@bounded
async def test_head_against_aiohttp(pool: Pool, upstream: Any) -> None:
    response = await send(pool, upstream.port, "/hello", method="HEAD")
    assert response.status == 200 and not response.has_body()
    assert ("Content-Length", "5") in response.headers
    response.release()
    assert pool.idle_count() == 0  # never reused after a HEAD (test_bodiless_answers)
    assert (await fetch(pool, upstream.port, "/hello"))[1] == b"hello"
    assert len(upstream.app[SEEN].peers) == 2


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "separate-packets"])
@bounded
async def test_interim_answers_are_skipped(pool: Pool, raw_server: Any, split: bool) -> None:
    parts = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        for part in parts if split else [b"".join(parts)]:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)
        await read_request(reader)
        writer.write(OK)
        await reader.read()

    server = await raw_server(handler)
    response, body = await fetch(pool, server.port, method="POST", body=chunks_of(b"x"), content_length=1)
    assert (response.status, response.reason, body) == (201, "Created", b"done")
    assert response.headers == [("Content-Length", "4"), ("X-Final", "yes")]
    assert (await fetch(pool, server.port))[1] == b"ok"
    assert server.connections == 1


@bounded
async def test_switching_protocols_is_a_protocol_error(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(
        answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00")
    )
    with pytest.raises(UpstreamProtocolError, match="101"):
        await send(pool, server.port)
    assert pool.idle_count() == 0


# --- flow control ---------------------------------------------------------------------


@bounded
async def test_large_answer_is_not_buffered_for_a_slow_reader(pool: Pool, raw_server: Any) -> None:
    size = 64 * MiB
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = bytes(range(256)) * 256
        while sent < size:
            writer.write(block)
            await writer.drain()
            sent += len(block)
        await reader.read()

    server = await raw_server(handler)
    response = await send(pool, server.port)
    assert await response.read(10 * MiB) is None  # above the single-write limit: left to stream
    chunks = response.iter_chunks()
    total = len(await anext(chunks))
    await asyncio.sleep(0.3)  # a slow client: the upstream must stall, not fill our memory
    stalled_at = sent
    assert stalled_at < 16 * MiB
    biggest = 0
    async for chunk in chunks:
        total += len(chunk)
        biggest = max(biggest, len(chunk))
    response.release()
    assert total == size
    assert biggest <= 2 * MiB  # what waited between two reads stayed near the high-water mark
    assert pool.idle_count() == 1


@bounded
async def test_large_answer_from_aiohttp_read_slowly(pool: Pool, upstream: Any) -> None:
    response = await send(pool, upstream.port, "/big?mib=64")
    chunks = response.iter_chunks()
    total = len(await anext(chunks))
    await asyncio.sleep(0.3)
    assert upstream.app[SEEN].sent < 16 * MiB
    expected = bytes(range(256)) * 256
    tail = b""
    async for chunk in chunks:
        total += len(chunk)
        tail = (tail + chunk)[-len(expected) :]
    response.release()
    assert total == 64 * MiB and tail == expected


@bounded
async def test_upload_streams_before_the_body_ends(pool: Pool, raw_server: Any) -> None:
    first_seen = asyncio.Event()
    received = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.extend(await reader.readuntil(b"first\r\n"))
        first_seen.set()
        received.extend(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(OK)
        await reader.read()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first"
        await first_seen.wait()  # would hang (and hit the test's bound) if the client buffered
        yield b"second"

    server = await raw_server(handler)
    _response, body = await fetch(pool, server.port, method="POST", body=slow_body())
    assert body == b"ok"
    assert bytes(received) == b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"


@bounded
async def test_upload_stops_when_the_upstream_answers_and_closes(pool: Pool, raw_server: Any) -> None:
    produced = 0

    async def refuses(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(TimeoutError):  # linger, reading, so the close is a FIN, not a reset
            async with asyncio.timeout(1.0):
                while await reader.read(65536):
                    pass

    async def slow_body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(200):
            produced += 1
            await asyncio.sleep(0.01)
            yield b"x" * 1024

    server = await raw_server(refuses)
    response, body = await fetch(pool, server.port, method="POST", body=slow_body(), content_length=200 * 1024)
    assert (response.status, body) == (413, b"")
    assert produced < 100  # stopped well before the body's end
    assert pool.idle_count() == 0


@bounded
async def test_empty_body(pool: Pool, raw_server: Any) -> None:
    requests: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while (request := await read_request(reader)) is not None:
            requests.append(request)
            writer.write(OK)

    server = await raw_server(handler)
    await fetch(pool, server.port, method="POST", body=chunks_of(), content_length=0)
    await fetch(pool, server.port, method="POST", body=chunks_of(b""))
    await fetch(pool, server.port, method="POST", body=None, content_length=0)
    assert [(b"Content-Length: 0" in head, b"chunked" in head, body) for head, body in requests] == [
        (True, False, b""),
        (False, True, b""),
        (True, False, b""),
    ]
    assert server.connections == 1


@bounded
async def test_upload_waits_for_the_upstream_to_drain(pool: Pool, raw_server: Any) -> None:
    size = 32 * MiB
    produced = 0
    produced_while_stalled = -1

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        nonlocal produced_while_stalled
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # a slow upstream: reads nothing for a while
        produced_while_stalled = produced
        left = size
        while left:
            left -= len(await reader.read(min(left, 1 << 20)))
        writer.write(OK)
        await reader.read()

    async def big_body() -> AsyncIterator[bytes]:
        nonlocal produced
        block = b"u" * 65536
        while produced < size:
            produced += len(block)
            yield block

    server = await raw_server(handler)
    _response, body = await fetch(pool, server.port, method="PUT", body=big_body(), content_length=size)
    assert body == b"ok"
    assert 0 < produced_while_stalled < 16 * MiB


# --- timeouts and connection failures --------------------------------------------------


@bounded
async def test_read_timeout_waiting_for_the_answer(pool: Pool, raw_server: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        await reader.read()

    server = await raw_server(silent)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await send(pool, server.port, read_timeout=0.2)
    assert 0.15 < loop.time() - started < 2.0
    await eventually(lambda: server.closed == 1)  # the connection was dropped, not pooled
    assert pool.idle_count() == 0


@bounded
async def test_read_timeout_inside_the_body(pool: Pool, raw_server: Any) -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await reader.read()

    server = await raw_server(stalls)
    response = await send(pool, server.port, read_timeout=0.2)
    got = bytearray()
    with pytest.raises(TimeoutError):
        async for chunk in response.iter_chunks():
            got += chunk
    assert got == b"0123456789"
    response.release()
    await eventually(lambda: server.closed == 1)
    assert pool.idle_count() == 0


@bounded
async def test_upload_to_an_upstream_that_never_reads_times_out(pool: Pool, raw_server: Any) -> None:
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await asyncio.sleep(LIMIT)

    produced = 0

    async def big() -> AsyncIterator[bytes]:
        nonlocal produced
        while produced < 64 * MiB:
            produced += 65536
            await asyncio.sleep(0)
            yield b"x" * 65536

    server = await raw_server(deaf)
    with pytest.raises(TimeoutError):
        await send(pool, server.port, method="POST", body=big(), read_timeout=0.3)
    assert produced < 16 * MiB  # the drain wait timed out, not the wait for an answer


@bounded
async def test_connection_refused(pool: Pool) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connecting is refused
        with pytest.raises(UpstreamConnectError):
            await send(pool, port)


@bounded
async def test_connect_timeout(pool: Pool) -> None:
    # A listener with a full accept queue drops further SYNs, so connect() just waits.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                try:
                    filler.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                fillers.append(filler)
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            started = loop.time()
            # Nothing was sent: an upstream we cannot reach, not one slow to answer (forward.py:
            # 502, where a TimeoutError, an answer that did not come, is a 504).
            with pytest.raises(UpstreamConnectError, match=r"within 0\.2s"):
                await send(pool, port, connect_timeout=0.2)
            assert 0.19 <= loop.time() - started < 2.0  # it was the connect timeout that ended it
        finally:
            for filler in fillers:
                filler.close()


@bounded
async def test_cancelled_request_drops_its_connection(pool: Pool, raw_server: Any) -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read()

    server = await raw_server(handler)
    task = asyncio.create_task(send(pool, server.port))
    await arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: server.closed == 1)
    assert pool.idle_count() == 0


# --- broken answers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTPP/1.1 200 OK\r\n\r\n", id="bad-protocol"),
        pytest.param(b"hello world\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", id="bad-status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", id="bad-content-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", id="two-lengths"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", id="bad-chunk-size"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", id="bad-chunk-end"),
    ],
)
@bounded
async def test_malformed_answers(pool: Pool, raw_server: Any, answer: bytes) -> None:
    server = await raw_server(answering(answer))
    with pytest.raises(UpstreamProtocolError):
        response = await send(pool, server.port)
        await body_of(response)
    assert pool.idle_count() == 0


@bounded
async def test_bytes_after_the_answer_spoil_the_connection(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(answering(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra", OK))
    response, body = await fetch(pool, server.port)
    assert (response.status, body) == (200, b"ok")  # the answer we asked for is intact
    assert pool.idle_count() == 0  # but nobody knows where the next one would start
    assert (await fetch(pool, server.port))[1] == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "codings",
    [
        pytest.param([b"gzip"], id="gzip"),
        pytest.param([b"gzip, chunked"], id="gzip-chunked"),
        pytest.param([b"gzip", b"chunked"], id="gzip-then-chunked-lines"),
        pytest.param([b"chunked, gzip"], id="chunked-gzip"),
        pytest.param([b"identity"], id="identity"),
        pytest.param([b"x-custom, chunked"], id="unknown-chunked"),
        pytest.param([b"chunked", b"chunked"], id="chunked-twice"),
        # Chunked to RFC 9110's list rules, another coding to llhttp: refused, never read two ways.
        pytest.param([b"chunked\t"], id="trailing-tab"),
        pytest.param([b"chunked,"], id="trailing-comma"),
    ],
)
@bounded
async def test_transfer_codings_other_than_chunked_are_refused(
    pool: Pool, raw_server: Any, codings: list[bytes]
) -> None:
    # We decode chunked and nothing else; Transfer-Encoding is hop-by-hop, so relaying the
    # rest without it would hand the client coded bytes as the content (RFC 9112 §6.1, §6.3).
    fields = b"".join(b"Transfer-Encoding: %b\r\n" % value for value in codings)
    server = await raw_server(first_then(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n5\r\nhello\r\n0\r\n\r\n"))
    with pytest.raises(UpstreamProtocolError):
        await send(pool, server.port)
    assert pool.idle_count() == 0
    assert (await fetch(pool, server.port))[1] == b"ok"


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED", b"\tchunked  ", b" , chunked"])
@bounded
async def test_chunked_in_any_case_is_chunked(pool: Pool, raw_server: Any, coding: bytes) -> None:
    server = await raw_server(
        answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding:%b\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % coding, OK)
    )
    assert (await fetch(pool, server.port))[1] == b"hello"
    assert (await fetch(pool, server.port))[1] == b"ok"
    assert server.connections == 1


# --- bytes nobody asked for: never another request's answer ----------------------------


async def one_marked(pool: Pool, port: int, method: str, marker: str) -> str:
    """One request marked `marker`: what it got back ("ok" when it was its own answer)."""
    try:
        response = await send(pool, port, f"/m/{marker}", method=method, read_timeout=2.0)
        body = await body_of(response)
        response.release()
    except UpstreamError as error:
        return f"failed: {error}"
    got = dict(response.headers).get("X-Marker")
    if got != marker or (response.status == 200 and method == "GET" and body != marker.encode()):
        return f"crossed: {marker} got {got} {body!r}"
    return "ok"


@pytest.mark.parametrize("mode", list(STRAYS))
@bounded
async def test_bytes_after_an_answer_never_reach_another_request(raw_server: Any, mode: str) -> None:
    method = STRAYS[mode][0]
    pool = Pool(probation=0)
    try:
        server = await raw_server(misbehaving(mode, None))
        # Back to back on one connection, then in concurrent waves over several: 0 may cross.
        results = [await one_marked(pool, server.port, method, f"seq{i}") for i in range(20)]
        for wave in range(3):
            results += await asyncio.gather(*(one_marked(pool, server.port, method, f"w{wave}c{i}") for i in range(10)))
        assert results == ["ok"] * 50, [r for r in results if r != "ok"]
    finally:
        await pool.close()


@pytest.mark.parametrize("mode", ["second-answer", "head-body", "204-body", "after-chunked-end", "crlf-then-answer"])
@bounded
async def test_late_stray_bytes_on_an_idle_connection_spoil_it_and_its_origin(raw_server: Any, mode: str) -> None:
    # The stray bytes come 10-30 ms after the answer, while the connection waits in the pool:
    # that connection is closed, and so that more of them cannot reach a request the origin's
    # connections are no longer reused (each request then has its own).
    method = STRAYS[mode][0]
    pool = Pool(probation=0)
    delays = iter([0.01, 0.03, 0.02] * 20)
    try:
        server = await raw_server(misbehaving(mode, lambda: next(delays)))
        results = []
        for i in range(8):
            results.append(await one_marked(pool, server.port, method, f"seq{i}"))
            await asyncio.sleep(0.08)  # the stray bytes arrive in the pool
        results += await asyncio.gather(*(one_marked(pool, server.port, method, f"c{i}") for i in range(10)))
        results += await asyncio.gather(*(one_marked(pool, server.port, method, f"d{i}") for i in range(10)))
        assert results == ["ok"] * 28, [r for r in results if r != "ok"]
        assert server.connections == 28  # after the first stray, every request had its own connection
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "mode", ["second-answer", "head-body", "204-body", "304-body", "after-chunked-end", "crlf-then-answer"]
)
@bounded
async def test_an_upstream_whose_stray_bytes_come_late_is_caught_on_probation(raw_server: Any, mode: str) -> None:
    # Stray bytes 10-30 ms after every answer, and requests back to back: a connection reused
    # at once would carry the next request before they come, and they would be its answer.
    # On probation no connection is reused that soon, so they come to an idle connection.
    method = STRAYS[mode][0]
    pool = Pool()
    delays = iter([0.01, 0.03, 0.02] * 30)
    try:
        server = await raw_server(misbehaving(mode, lambda: next(delays)))
        results = [await one_marked(pool, server.port, method, f"seq{i}") for i in range(20)]
        for wave in range(3):
            results += await asyncio.gather(*(one_marked(pool, server.port, method, f"w{wave}c{i}") for i in range(10)))
            await asyncio.sleep(0.12)  # past the probation: only the distrust keeps connections apart now
        assert results == ["ok"] * 50, [r for r in results if r != "ok"]
        assert server.connections == 50
    finally:
        await pool.close()


@bounded
async def test_an_origin_on_probation_reuses_a_connection_once_it_sat_idle_without_a_stray(raw_server: Any) -> None:
    pool = Pool()
    try:
        server = await raw_server(answering(*[OK] * 20))
        for _ in range(3):  # back to back: each connection is too fresh to be reused
            assert (await fetch(pool, server.port))[1] == b"ok"
        assert server.connections == 3
        await asyncio.sleep(0.12)
        for _ in range(10):  # one sat idle long enough with nothing read: the origin is proven
            assert (await fetch(pool, server.port))[1] == b"ok"
        assert server.connections == 3
    finally:
        await pool.close()


@bounded
async def test_a_stray_on_one_connection_closes_the_origins_other_idle_connections(pool: Pool, raw_server: Any) -> None:
    writers: list[asyncio.StreamWriter] = []
    both = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        writers.append(writer)
        while (request := await read_request(reader)) is not None:
            if len(writers) < 2:
                await asyncio.wait_for(both.wait(), 2)  # two requests in flight: two connections
            both.set()
            writer.write(whole(request[0].split(b" ", 2)[1].rpartition(b"/")[2]))

    server = await raw_server(handler)
    assert await asyncio.gather(*(one_marked(pool, server.port, "GET", m) for m in ("alice", "carol"))) == ["ok"] * 2
    assert pool.idle_count() == 2
    writers[0].write(whole(b"alice"))  # one of them misbehaves while idle
    await eventually(lambda: pool.idle_count() == 0)  # both are closed: the other may be next
    assert await one_marked(pool, server.port, "GET", "bob") == "ok"
    assert server.connections == 3
    await eventually(lambda: server.closed == 3)  # and bob's connection was not pooled either


@bounded
async def test_bytes_that_landed_before_reuse_are_seen_before_the_request_is_sent(pool: Pool, raw_server: Any) -> None:
    # Bytes in the socket that the event loop has not yet delivered (they landed in this loop
    # turn) must keep the connection from carrying the next request, or they become its answer.
    writers: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        writers.append(writer)
        while (request := await read_request(reader)) is not None:
            writer.write(whole(request[0].split(b" ", 2)[1].rpartition(b"/")[2]))

    server = await raw_server(handler)
    assert await one_marked(pool, server.port, "GET", "alice") == "ok"
    assert pool.idle_count() == 1
    writers[0].write(whole(b"alice"))  # on loopback: in our socket's buffer when write returns
    assert await one_marked(pool, server.port, "GET", "bob") == "ok"  # no loop turn in between
    assert server.connections == 2


@bounded
async def test_an_answer_that_starts_before_the_request_ends_keeps_no_connection(pool: Pool, raw_server: Any) -> None:
    # The server answered (and kept the connection) while we were still sending the body: if it
    # did not read the rest of the body, it will read it as a request. Not reused.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        while await reader.read(65536):
            writer.write(OK) if index > 1 else None

    answered = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.wait_for(answered.wait(), 2)
        yield b"second"

    server = await raw_server(handler)
    task = asyncio.create_task(send(pool, server.port, method="POST", body=body(), content_length=11))
    await eventually(lambda: server.connections == 1)
    await asyncio.sleep(0.05)  # the answer is in
    answered.set()
    response = await task
    assert await body_of(response) == b"ok"
    response.release()
    assert pool.idle_count() == 0


@bounded
async def test_an_unsolicited_408_on_an_idle_connection_does_not_spoil_its_origin(pool: Pool, raw_server: Any) -> None:
    # Some servers say 408 before closing an idle connection: that connection goes, the origin's others stay usable.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(OK)
        if index == 1:
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            return
        while await read_request(reader) is not None:
            writer.write(OK)

    server = await raw_server(handler)
    await fetch(pool, server.port)
    await eventually(lambda: pool.idle_count() == 0)
    for _ in range(3):
        assert (await fetch(pool, server.port))[1] == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", id="content-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n", id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="inside-head"),
    ],
)
@bounded
async def test_body_cut_short(pool: Pool, raw_server: Any, answer: bytes) -> None:
    server = await raw_server(answering(answer, then_close=True))
    with pytest.raises(UpstreamProtocolError):
        response = await send(pool, server.port)
        await body_of(response)
    assert pool.idle_count() == 0


@bounded
async def test_read_raises_when_the_body_is_cut_short(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", then_close=True))
    response = await send(pool, server.port)
    with pytest.raises(UpstreamProtocolError, match="cut short"):
        await response.read(1024)
    response.release()


# --- read(), release(), close() --------------------------------------------------------


@bounded
async def test_read_returns_none_without_consuming(pool: Pool, raw_server: Any) -> None:
    more = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"a" * 1000)
        await more.wait()
        writer.write(b"b" * 1000)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await reader.read()

    server = await raw_server(handler)
    response = await send(pool, server.port)
    assert await response.read(1999) is None
    more.set()
    assert await response.read(2000) == b"a" * 1000 + b"b" * 1000
    response.release()
    response = await send(pool, server.port)
    assert await response.read(1024) is None  # chunked and unfinished: length unknown
    assert await body_of(response) == b"abc"
    response.release()
    assert server.connections == 1


@bounded
async def test_release_before_the_body_ends_closes(pool: Pool, upstream: Any) -> None:
    response = await send(pool, upstream.port, "/big?mib=8")
    await anext(response.iter_chunks())
    response.release()
    response.release()  # idempotent
    assert pool.idle_count() == 0
    assert (await fetch(pool, upstream.port, "/hello"))[1] == b"hello"


@bounded
async def test_close_mid_stream(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"))
    response = await send(pool, server.port)
    await anext(response.iter_chunks())
    response.close()
    response.release()  # after close: nothing left to do
    await eventually(lambda: server.closed == 1)
    assert pool.idle_count() == 0


@bounded
async def test_unread_but_complete_body_keeps_the_connection(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(answering(OK, OK))
    response = await send(pool, server.port)
    await asyncio.sleep(0.05)  # the whole answer is in; nobody reads it
    response.release()
    assert pool.idle_count() == 1
    assert (await fetch(pool, server.port))[1] == b"ok"
    assert server.connections == 1


# --- what the client refuses to send ---------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        pytest.param("/", [("X-Claim", "alice\r\nX-Admin: 1")], id="crlf-in-value"),
        pytest.param("/", [("X-Claim", "alice\nX-Admin: 1")], id="lf-in-value"),
        pytest.param("/", [("X-Evil\r\nX-Admin", "1")], id="crlf-in-name"),
        pytest.param("/ HTTP/1.1\r\nX-Admin: 1\r\n\r\nGET /", [], id="crlf-in-target"),
    ],
)
@bounded
async def test_line_breaks_in_the_head_are_refused(
    pool: Pool, raw_server: Any, target: str, headers: list[tuple[str, str]]
) -> None:
    server = await raw_server(answering(OK))
    with pytest.raises(ValueError):
        await send(pool, server.port, target, headers=headers)
    assert server.connections == 0


@bounded
async def test_body_longer_than_its_length_is_never_sent(pool: Pool, raw_server: Any) -> None:
    rest = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        request = await read_request(reader)
        assert request is not None and request[1] == b"abc"
        rest.append(await reader.read())  # what followed the declared body: must be nothing

    server = await raw_server(handler)
    with pytest.raises(UpstreamError, match="longer"):
        await send(
            pool,
            server.port,
            method="POST",
            body=chunks_of(b"abc", b"GET /smuggled HTTP/1.1\r\n\r\n"),
            content_length=3,
        )
    await eventually(lambda: server.closed == 1)
    assert rest == [b""]


@bounded
async def test_body_shorter_than_its_length(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(answering(OK))
    with pytest.raises(UpstreamError, match="ended after 3 of 10"):
        await send(pool, server.port, method="POST", body=chunks_of(b"abc"), content_length=10)
    assert pool.idle_count() == 0


@bounded
async def test_a_failing_body_propagates_unchanged(pool: Pool, raw_server: Any) -> None:
    class ClientWentAway(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"start"
        raise ClientWentAway

    server = await raw_server(answering(OK))
    with pytest.raises(ClientWentAway):
        await send(pool, server.port, method="POST", body=failing())
    await eventually(lambda: server.closed == 1)
    assert pool.idle_count() == 0


# --- TLS -------------------------------------------------------------------------------


@bounded
async def test_https(tmp_path: Path) -> None:
    cert, key = self_signed_files(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while (request := await read_request(reader)) is not None:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(request[0]), request[0]))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = Pool(ssl_context=trusting, probation=0)
    default = Pool()
    try:
        for _ in range(2):
            _response, body = await fetch(pool, port, "/secure", scheme="https", host="localhost")
            assert body.startswith(b"GET /secure HTTP/1.1\r\n") and f"Host: localhost:{port}".encode() in body
        assert connections == 1
        # The default context checks the certificate: a self-signed one is refused (502).
        with pytest.raises(UpstreamConnectError):
            await send(default, port, scheme="https", host="localhost")
        assert (await fetch(pool, port, scheme="https", host="localhost", method="HEAD"))[0].status == 200
    finally:
        await pool.close()
        await default.close()
        server.close()
        await server.wait_closed()


@bounded
async def test_an_endless_answer_head_is_refused_by_its_size(pool: Pool, raw_server: Any) -> None:
    # httptools holds a header field until it ends; the read timeout (10 s here) bounds time,
    # not bytes, so the size of an unfinished head must be capped on its own.
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                writer.write(b"a" * 65536)
                await writer.drain()
        await reader.read()

    server = await raw_server(endless)
    with pytest.raises(UpstreamProtocolError, match="head too large"):
        await send(pool, server.port, read_timeout=10.0)
    assert pool.idle_count() == 0


@bounded_by(20)
async def test_a_relay_whose_consumer_is_full_reads_no_more_of_the_upstream_until_it_has_drained(
    pool: Pool, raw_server: Any
) -> None:
    # Response.relay: body bytes go to the sink from the read callback; once the sink says
    # full, the upstream is not read until `drain` returns. Here the head comes with body
    # bytes (buffered before the relay begins, so the first sink call is the relay's own
    # flush) and the upstream has far more to send than one read.
    size = 4 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * 8192)
        await writer.drain()
        await asyncio.sleep(0.1)  # the head (and those bytes) are read before the rest comes
        writer.write(b"x" * (size - 8192))
        await writer.drain()

    server = await raw_server(handler)
    response = await send(pool, server.port)
    await asyncio.sleep(0.2)  # the rest is on its way: the socket has more than one read for us
    passed: list[int] = []
    drained = asyncio.get_running_loop().create_future()

    def sink(data: bytes) -> bool:
        passed.append(len(data))
        return True  # always full: each piece must wait for a drain

    async def drain() -> None:
        await drained

    relaying = asyncio.ensure_future(response.relay(sink, drain))
    await asyncio.sleep(0.3)
    assert sum(passed) <= 8192 + 16 * 1024, f"{sum(passed)} bytes passed on while the consumer was full"
    relaying.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await relaying
    response.close()


@bounded
@pytest.mark.parametrize("over_the_limit", [False, True])
async def test_a_relayed_answer_is_read_in_large_reads_only_while_paused_writers_hold_little(
    pool: Pool, raw_server: Any, monkeypatch: pytest.MonkeyPatch, over_the_limit: bool
) -> None:
    # Large reads (fewer system calls per byte) may leave one read in a slow client's buffer:
    # beyond flow.HELD's limit, a relayed answer is read 16 KiB at a time again.
    if over_the_limit:
        monkeypatch.setattr(HELD, "limit", HELD.bytes)
    size = 4 * MiB
    body = bytes(range(256)) * (size // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        await asyncio.sleep(0.1)  # the head is read alone: the relay begins before the body comes
        writer.write(body)
        await writer.drain()

    server = await raw_server(handler)
    response = await send(pool, server.port)
    pieces: list[bytes] = []

    def sink(data: bytes) -> bool:
        pieces.append(bytes(data))
        return False

    async def drain() -> None:
        raise AssertionError("never full")

    await response.relay(sink, drain)
    response.release()
    assert b"".join(pieces) == body
    largest = max(map(len, pieces))
    if over_the_limit:
        assert largest <= 16 * 1024, largest
    else:
        assert largest > 16 * 1024, [len(piece) for piece in pieces]


# A relayed Content-Length body is counted, not parsed (`_Connection._count`): what follows its
# last byte in the same read is judged as llhttp judged it. (extra bytes, "close" answer, reused?)
COUNTED_ENDS = {
    "nothing": (b"", False, True),
    "crlf": (b"\r\n", False, True),  # llhttp skips CR and LF between messages
    "second-answer": (OK, False, False),  # a stray: not reused (and the origin distrusted)
    "garbage": (b"xyz", False, False),
    "close-crlf": (b"\r\n", True, False),
    "close-garbage": (b"xyz", True, False),
}


@bounded
@pytest.mark.parametrize("mode", list(COUNTED_ENDS))
async def test_a_relayed_answers_counted_body_ends_as_llhttp_would_end_it(
    pool: Pool, raw_server: Any, mode: str
) -> None:
    extra, close, reused = COUNTED_ENDS[mode]
    size = 3 * MiB
    body = bytes(range(256)) * (size // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        first = index == 1  # the first connection's first answer; OK after that
        while await read_request(reader) is not None:
            if not first:
                writer.write(OK)
                continue
            first = False
            connection = b"Connection: close\r\n" if close else b""
            writer.write(b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n" % (connection, size))
            await asyncio.sleep(0.1)  # the head is read alone: the relay begins before the body comes
            writer.write(body[:-10])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(body[-10:] + extra)  # the body's end and what follows, in one read
            await writer.drain()

    server = await raw_server(handler)
    response = await send(pool, server.port)
    pieces: list[bytes] = []

    def sink(data: bytes | memoryview) -> bool:
        pieces.append(bytes(data))
        return False

    async def drain() -> None:
        raise AssertionError("never full")

    await response.relay(sink, drain)
    response.release()
    assert b"".join(pieces) == body
    await asyncio.sleep(0.1)
    again = await send(pool, server.port)
    assert (again.status, await again.read(100)) == (200, b"ok")
    again.release()
    assert (server.connections == 1) is reused, server.connections


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@bounded
async def test_send_on_a_pooled_connection_begins_the_exchange_as_begin_does(
    pool: Pool, raw_server: Any, method: str
) -> None:
    # `Pool.send` has `_Connection._begin` written out: right after it, the connection must be
    # where `_begin` puts it (an exchange's state from the answer before reset, every field).
    server = await raw_server(answering(OK, OK, OK))
    _response, body = await fetch(pool, server.port)
    assert body == b"ok" and pool.idle_count() == 1
    head = b"%b / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (method.encode(), server.port)
    conn = pool.send(
        method, "http", "127.0.0.1", server.port, head, connect_timeout=1, read_timeout=1, notify=lambda: None
    )
    assert isinstance(conn, _Connection)
    names = [name for name in _Connection.__slots__ if hasattr(conn, name)]
    sent = {name: getattr(conn, name) for name in names}
    conn._begin(method == "HEAD")
    assert {name: getattr(conn, name) for name in names} == sent
    conn.cancel()
