"""Through the real proxy, after issue 10's wire changes were merged: the interactions between
them (proxy/http/http1.py's and proxy/http/upstream.py's shared read buffers, pipelining, upgrades, the
connection count under every kind of close, request framing, upstream answer anomalies).

Each read of every client connection lands in one buffer per `Server` (and every upstream
read in one buffer per `Pool`): a view of it kept past its callback would show one
connection's bytes to another. The isolation tests below run many connections at once, each
with bytes of its own, and check that each gets back exactly its own.
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import suppress
from typing import Any

import pytest

from tests.conftest import TestKey, mint
from tests.integration.test_http1_attacks import (  # noqa: F401
    OK,
    RAW_CONFIG,
    fixed,
    open_client,
    raw_upstream,
    read_to_end,
    responses,
    server_url,
)
from tests.integration.test_security import first_response, send_raw, upstream_paths
from tests.support.raw import bounded_by, eventually

bounded = bounded_by(20.0)
SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
CLIENTS = 24


def ws_frame(payload: bytes) -> bytes:
    """A masked client text frame (RFC 6455 §5.2), payload < 126 bytes."""
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked server frames in `data` (short frames only)."""
    out = []
    while len(data) >= 2:
        size = data[1] & 0x7F
        assert size < 126
        if len(data) < 2 + size:
            break
        out.append(data[2 : 2 + size])
        data = data[2 + size :]
    return out


# -- 1. the shared read buffers ---------------------------------------------------------------------
@bounded
async def test_pipelined_requests_of_concurrent_clients_each_reach_the_upstream_and_come_back_as_their_own(
    sidecar: Any,
) -> None:
    """Every client pipelines three requests (a body, a tagged header, a close) in pieces that
    interleave with the other clients' pieces: each request the upstream sees, and each answer
    each client gets, carries that client's tag and nothing of another's."""
    s = await sidecar()

    async def client(i: int) -> list[dict[str, Any]]:
        tag = f"client{i:03d}-" + os.urandom(6).hex()
        body = (tag.encode() * 200)[:3000]
        data = (
            f"POST /public/{tag}/0 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
            + f"GET /public/{tag}/1 HTTP/1.1\r\nHost: x\r\nX-Tag: {tag * 40}\r\n\r\n".encode()
            + f"GET /public/{tag}/2 HTTP/1.1\r\nHost: x\r\nX-Tag: {tag}\r\nConnection: close\r\n\r\n".encode()
        )
        reader, writer = await open_client(s)
        for at in range(0, len(data), 700):
            writer.write(data[at : at + 700])
            await writer.drain()
            await asyncio.sleep(0)
        raw, closed = await read_to_end(reader, 8.0)
        writer.close()
        assert closed
        answers = responses(raw)
        assert [a.status for a in answers] == [200, 200, 200], raw[:300]
        seen = [json.loads(a.body) for a in answers]
        assert [x["path"] for x in seen] == [f"/public/{tag}/{n}" for n in range(3)]
        assert seen[0]["body_size"] == len(body)
        assert seen[1]["headers"]["x-tag"] == [tag * 40]
        assert seen[2]["headers"]["x-tag"] == [tag]
        return seen

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    assert len(upstream_paths(s)) == 3 * CLIENTS


@bounded
async def test_bytes_held_behind_concurrent_websocket_handshakes_reach_each_ones_own_tunnel(
    sidecar: Any, rsa_key: TestKey
) -> None:
    """Each client sends its handshake and, in the same write, a frame of its own (bytes the
    proxy holds until the 101): each gets the echo of its own frame, never another's."""
    s = await sidecar()

    async def client(i: int) -> None:
        tag = f"ws{i:03d}-{os.urandom(4).hex()}".encode()
        head = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            + f"Authorization: Bearer {mint({'sub': tag.decode()}, key=rsa_key)}\r\n\r\n".encode()
        )
        reader, writer = await open_client(s)
        writer.write(head + ws_frame(tag) + ws_frame(tag + b"-2"))
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        got = b""
        async with asyncio.timeout(5.0):
            while len(server_frames(got)) < 3:
                chunk = await reader.read(4096)
                assert chunk, f"closed after {got!r}"
                got += chunk
        assert server_frames(got) == [b"hello " + tag, tag, tag + b"-2"]
        writer.close()

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


@bounded
async def test_upstream_answers_read_into_the_shared_buffer_go_to_their_own_clients(
    sidecar: Any, raw_upstream: Any
) -> None:
    """Many upstream connections answer at once, in small pieces: each client gets exactly its
    own answer (the upstream echoes the request line), chunked and with a Content-Length."""

    async def answer(conn: Any, writer: asyncio.StreamWriter) -> None:
        line = conn.head.split(b"\r\n", 1)[0]
        body = line * 50
        if b"chunked" in line:
            data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            data += (
                b"".join(
                    b"%x\r\n%b\r\n" % (len(body[at : at + 333]), body[at : at + 333]) for at in range(0, len(body), 333)
                )
                + b"0\r\nX-T: 1\r\n\r\n"
            )
        else:
            data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        for at in range(0, len(data), 97):
            writer.write(data[at : at + 97])
            await writer.drain()
            await asyncio.sleep(0)

    upstream = await raw_upstream(answer)
    s = await sidecar(RAW_CONFIG, raw=upstream.url)

    async def client(i: int) -> None:
        kind = "chunked" if i % 2 else "length"
        target = f"/public/{kind}/{i}-{os.urandom(4).hex()}"
        raw = await send_raw(s, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), timeout=8.0)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), raw[:200]
        if kind == "chunked":
            decoded, rest = b"", body
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                decoded += rest[:size]
                rest = rest[size + 2 :]
            body = decoded
        assert body == f"GET {target} HTTP/1.1".encode() * 50

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


# -- 2. the connection count returns to zero after every kind of close -------------------------------
@bounded
async def test_the_open_connection_count_returns_to_zero_after_every_kind_of_close(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await sidecar()
    counts = s.runtime.metrics.connections
    server = s.proxy.server(max_connections=6, header_timeout=0.4, keepalive_timeout=0.8)
    await server.listen("127.0.0.1", 0)
    url = server_url(server)
    try:

        async def one(data: bytes, timeout: float = 3.0) -> bytes:
            reader, writer = await open_client(url)
            # A connection refused at accept may be closed already: asyncio's transport drops
            # a write then, uvloop's raises RuntimeError (the client's loop, not the proxy).
            if not writer.transport.is_closing():
                with suppress(ConnectionError):
                    writer.write(data)
            raw, _ = await read_to_end(reader, timeout)
            writer.close()
            return raw

        ws = (
            b"GET /public/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        kinds = [
            one(b"GET /public/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),  # answered, close
            one(b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n", 2.0),  # keep-alive, closed idle
            one(b"GET /orders HTTP/1.1\r\nHost: x\r\n\r\n"),  # 401, kept alive then idle
            one(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello"),  # 400
            one(b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Slow: "),  # header_timeout 408
            one(b""),  # nothing at all: idle close
            one(ws + ws_frame(b"x"), 1.0),  # upgraded, then the client closes
        ]
        await asyncio.gather(*kinds)
        await eventually(lambda: counts.open == 0, 3.0)
        # At the limit: the extra connections are refused at accept, and the count comes back.
        held = [await open_client(url) for _ in range(6)]
        await eventually(lambda: counts.open == 6, 3.0)
        rejected = counts.rejected
        extra = await one(b"GET /public/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 2.0)
        assert extra == b""
        assert counts.rejected == rejected + 1
        for _, writer in held:
            writer.close()
        await eventually(lambda: counts.open == 0, 3.0)
        # Drain: an idle keep-alive connection and one mid-request; both end, the count with them.
        idle_reader, idle_writer = await open_client(url)
        idle_writer.write(b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 3.0)
        busy_reader, busy_writer = await open_client(url)
        busy_writer.write(b"GET /public/b HTTP/1.1\r\nHost: x\r\n")
        await eventually(lambda: counts.open == 2, 3.0)
        server.start_drain()
        busy_writer.write(b"\r\n")
        raw, closed = await read_to_end(busy_reader, 3.0)
        assert closed and first_response(raw).status == 200
        assert first_response(raw).headers.get("Connection") == "close"
        _, closed = await read_to_end(idle_reader, 3.0)
        assert closed
        await eventually(lambda: counts.open == 0, 3.0)
    finally:
        await server.shutdown(0)
    assert counts.open == 0


# -- 3. request smuggling classes -------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="CL-and-TE",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            id="TE-and-CL",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", id="TE-obs-fold"
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="TE-inside-obs-fold",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="TE-in-http10"
        ),
        pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", id="CL-plus"),
        pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello", id="CL-minus"),
        pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5 5\r\n\r\nhello", id="CL-space"),
        pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello", id="CL-list"),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            id="CL-twice-same",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            id="CL-twice-different",
        ),
        pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello", id="CL-hex"),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello", id="CL-space-before-colon"
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            id="TE-space-before-colon",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nhello", id="CL-huge"
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            id="chunk-size-overflow",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
            id="chunk-size-trailing-space",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
            id="chunk-bare-LF",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            id="chunk-data-longer-than-size",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            id="chunk-size-negative",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
            id="chunk-size-0x",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /public/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
            id="bad-framing-behind-a-good-request",
        ),
        pytest.param(
            b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: gzip\r\n\r\n",
            id="framing-fields-in-trailers",
        ),
        pytest.param(
            b"GET /public/a HTTP/1.1\r\nHost: x\r\n\x00Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="NUL-in-field-name",
        ),
        pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="bare-CR"),
    ],
)
@bounded
async def test_ambiguous_request_framing_is_refused_and_nothing_behind_it_is_read(sidecar: Any, data: bytes) -> None:
    s = await sidecar()
    raw = await send_raw(s, data + SMUGGLED, timeout=2.0)
    statuses = [r.status for r in responses(raw)]
    assert statuses, raw[:300]
    assert 400 <= statuses[-1] < 500 or statuses[-1] == 501, raw[:300]
    assert all(status < 500 or status == 501 for status in statuses), raw[:300]
    assert responses(raw)[-1].headers.get("Connection") == "close"
    assert not any("smuggled" in path for path in upstream_paths(s)), upstream_paths(s)


@pytest.mark.parametrize(
    "body, size",
    [
        pytest.param(b"5;ext=1\r\nhello\r\n0\r\n\r\n", 5, id="chunk-extension"),
        pytest.param(b'5;a="q;uoted"\r\nhello\r\n0;b\r\n\r\n', 5, id="quoted-chunk-extension"),
        pytest.param(b"00005\r\nhello\r\n0\r\n\r\n", 5, id="leading-zeros"),
        pytest.param(
            b"5\r\nhello\r\n0\r\nHost: evil\r\nAuthorization: Bearer x\r\nX-User-Id: root\r\n\r\n",
            5,
            id="trailers-naming-routing-and-identity-fields",
        ),
    ],
)
@bounded
async def test_legal_chunked_oddities_are_decoded_and_the_next_request_is_read_where_it_starts(
    sidecar: Any, body: bytes, size: int
) -> None:
    """Chunk extensions are ignored, zeros lead a size harmlessly, and trailer fields
    (whatever they name) are dropped: the upstream gets the body, framed afresh, and the next
    pipelined request starts right after the last chunk."""
    s = await sidecar()
    raw = await send_raw(
        s,
        b"POST /public/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"GET /public/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        timeout=3.0,
    )
    assert [r.status for r in responses(raw)] == [200, 200], raw[:400]
    assert json.loads(responses(raw)[0].body)["body_size"] == size
    assert upstream_paths(s) == ["/public/upload", "/public/next"]
    seen = s.upstream.seen[0]
    assert seen.header("Host") != "evil"
    assert seen.header("Authorization") is None and seen.header("X-User-Id") is None
    assert seen.header("Content-Length") in (None, str(size))


@pytest.mark.parametrize("value", [b"05", b"0005"])
@bounded
async def test_a_content_length_with_leading_zeros_is_its_number(sidecar: Any, value: bytes) -> None:
    """RFC 9110 §8.6: 1*DIGIT, so `05` is five; the upstream is told the same five bytes."""
    s = await sidecar()
    raw = await send_raw(
        s,
        b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + value
        + b"\r\n\r\nhello"
        + b"GET /public/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        timeout=3.0,
    )
    answers = responses(raw)
    assert [r.status for r in answers] in ([200, 200], [400]), raw[:400]
    if len(answers) == 2:
        assert json.loads(answers[0].body)["body_size"] == 5


# -- 4. upstream answer anomalies -------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, answer, status",
    [
        pytest.param(
            "GET",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTRAY",
            200,
            id="1xx-then-stray",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!",
            200,
            id="two-answers",
        ),
        pytest.param("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 504, id="content-length-too-long"),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: t\r\n\r\n",
            200,
            id="chunked-with-trailers",
        ),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 200, id="HEAD-with-length"),
        pytest.param("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello", 304, id="304-with-body"),
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\nhello", 204, id="204-with-body"),
        pytest.param(
            "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", 200, id="connection-close"
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
            502,
            id="two-content-lengths",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            None,
            id="CL-and-TE",
        ),
        pytest.param("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, id="http10-answer"),
        pytest.param("GET", b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok", None, id="status-999"),
        pytest.param("GET", b"HTTP/1.1 200 OK\r\n X-Folded: 1\r\nContent-Length: 2\r\n\r\nok", None, id="leading-fold"),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nok\r\n0\r\n\r\n",
            None,
            id="chunk-size-overflow",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;" + b"e" * 70000 + b"\r\nok\r\n0\r\n\r\n",
            None,
            id="long-chunk-extension",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            None,
            id="chunked-http10-answer",
        ),
        pytest.param(
            "GET",
            b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            200,
            id="1xx-with-length-then-103",
        ),
        pytest.param("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n", 200, id="CRLF-after-body"),
        pytest.param(
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            None,
            id="chunked-twice",
        ),
    ],
)
@bounded
async def test_an_anomalous_upstream_answer_never_reaches_another_client_nor_makes_a_500(
    sidecar: Any, raw_upstream: Any, method: str, answer: bytes, status: int | None
) -> None:
    """The first connection answers oddly; every later one answers `OK`. The odd answer is
    relayed or refused with a 502 or 504 (never a 500 of ours; a status outside 100-599, which
    llhttp reads, is relayed as it came), the HEAD answer comes without waiting
    for a body, and no later client gets a byte of the odd one, whatever the pool did."""
    upstream = await raw_upstream(fixed(answer, OK))
    s = await sidecar(RAW_CONFIG, raw=upstream.url)
    raw = await send_raw(
        s, f"{method} /public/odd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), timeout=3.0
    )
    first = first_response(raw) if raw else None
    if status is not None:
        assert first is not None and first.status == status, raw[:300]
    if first is not None and 500 <= first.status < 600:
        # Ours, then: an upstream failure (502, or 504 for an answer that stalled), never a 500.
        assert first.status in (502, 504), raw[:300]
    if method == "HEAD":
        assert raw.endswith(b"\r\n\r\n"), raw[:300]
    assert b"STRAY" not in raw and b"evil" not in raw
    for n in range(6):
        after = await send_raw(
            s, f"GET /public/after/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), timeout=3.0
        )
        got = first_response(after)
        assert (got.status, got.body) == (200, b"ok"), after[:300]
        assert after.count(b"HTTP/1.1 ") == 1, after[:300]


@bounded
async def test_a_head_answer_with_a_length_comes_back_at_once(sidecar: Any, raw_upstream: Any) -> None:
    """An answer to HEAD ends at its head (RFC 9112 §6.3 item 1): the proxy never waits for the
    1000 bytes its Content-Length announces (the upstream keeps the connection open)."""
    upstream = await raw_upstream(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    s = await sidecar(RAW_CONFIG, raw=upstream.url)
    reader, writer = await open_client(s)
    writer.write(b"HEAD /public/h HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 1000" in head


@bounded
async def test_an_authorised_request_on_a_connection_shared_with_refusals_gets_its_own_identity(
    sidecar: Any, rsa_key: TestKey
) -> None:
    """Pipelined on one connection: a refused token, a good one, none: each request is judged
    alone, and only the good one carries an identity upstream."""
    s = await sidecar()
    good = mint({"sub": "alice"}, key=rsa_key)
    data = (
        b"GET /orders/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\r\n"
        + f"GET /orders/2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\n\r\n".encode()
        + b"GET /orders/3 HTTP/1.1\r\nHost: x\r\nX-User-Id: alice\r\nConnection: close\r\n\r\n"
    )
    raw = await send_raw(s, data, timeout=3.0)
    assert [r.status for r in responses(raw)] == [401, 200, 401], raw[:400]
    assert upstream_paths(s) == ["/orders/2"]
    assert s.upstream.last().header("X-User-Id") == "alice"


@bounded
async def test_a_head_pipelined_behind_a_slow_answer_is_timed_from_that_answer(sidecar: Any, rsa_key: TestKey) -> None:
    """header_timeout (here 0.8 s) runs from a head's first byte, but a head that begins while
    the request before it is still being answered (1.5 s here) is timed from that answer: the
    client did nothing slow, and both requests are answered."""
    s = await sidecar()
    server = s.proxy.server(header_timeout=0.8)
    await server.listen("127.0.0.1", 0)
    try:
        reader, writer = await open_client(server_url(server))
        writer.write(
            f"GET /slow?seconds=1.5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mint(key=rsa_key)}\r\n\r\n"
            "GET /public/next HTTP/1.1\r\n".encode()
        )
        await asyncio.sleep(1.2)
        writer.write(b"Host: x\r\nConnection: close\r\n\r\n")
        raw, closed = await read_to_end(reader, 6.0)
        writer.close()
        assert closed
        assert [r.status for r in responses(raw)] == [200, 200], raw[:400]
    finally:
        await server.shutdown(0)


@bounded
async def test_a_tunnel_open_at_shutdown_is_cut_and_uncounted(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    counts = s.runtime.metrics.connections
    server = s.proxy.server()
    await server.listen("127.0.0.1", 0)
    reader, writer = await open_client(server_url(server))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        + f"Authorization: Bearer {mint(key=rsa_key)}\r\n\r\n".encode()
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)).startswith(b"HTTP/1.1 101 ")
    assert counts.open == 1
    await server.shutdown(0.5)
    _, closed = await read_to_end(reader, 3.0)
    writer.close()
    assert closed
    await eventually(lambda: counts.open == 0, 3.0)


@pytest.mark.parametrize(
    "trailer",
    [
        b"X-Trailer: t",
        b"Set-Cookie: session=attacker",
        b"X-User-Id: root",
        b"Transfer-Encoding: chunked",
        b"Connection: keep-alive",
    ],
)
@bounded
async def test_an_upstream_trailer_field_never_becomes_a_header_field_of_the_answer(
    sidecar: Any, raw_upstream: Any, trailer: bytes
) -> None:
    """RFC 9110 §6.5.1: trailer fields are not merged into the head. They were: `Set-Cookie`
    in the trailer became a cookie, and `Content-Length: 50` reframed a 2-byte answer as a
    chunked one cut short."""
    upstream = await raw_upstream(
        fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailer + b"\r\n\r\n", OK)
    )
    s = await sidecar(RAW_CONFIG, raw=upstream.url)
    raw = await send_raw(s, b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=3.0)
    answer = first_response(raw)
    assert (answer.status, answer.body) == (200, b"ok"), raw[:300]
    assert answer.headers.get("Content-Length") == "2"
    assert trailer.split(b":")[0].decode() not in {
        k for k in answer.headers if k not in ("Content-Length", "Connection")
    }
    assert trailer not in raw


@pytest.mark.parametrize("trailer", [b"Content-Length: 50", b"Content-Length: nope"])
@bounded
async def test_a_content_length_in_an_upstream_trailer_never_reframes_the_answer(
    sidecar: Any, raw_upstream: Any, trailer: bytes
) -> None:
    """llhttp refuses a Content-Length in a chunked message's trailer: the answer whose head
    already went out is cut (a chunked body without its last chunk, then close), never ended
    as if complete, and the connection is not reused."""
    upstream = await raw_upstream(
        fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailer + b"\r\n\r\n", OK)
    )
    s = await sidecar(RAW_CONFIG, raw=upstream.url)
    raw = await send_raw(s, b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=3.0)
    answer = first_response(raw)
    assert answer.status == 502 or (
        answer.headers.get("Transfer-Encoding") == "chunked" and not raw.endswith(b"0\r\n\r\n")
    ), raw[:300]
    assert trailer not in raw and "Content-Length" not in answer.headers
    after = first_response(await send_raw(s, b"GET /public/y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert (after.status, after.body) == (200, b"ok")
    assert len(upstream.conns) == 2


@bounded
async def test_an_endless_upstream_trailer_field_is_cut_by_its_size(sidecar: Any, raw_upstream: Any) -> None:
    """httptools holds a field until it ends: a trailer field that never ends, after the last
    chunk, is refused by the bytes that came (as an endless head is), not held without bound."""

    async def answer(conn: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Endless: ")
        with suppress(ConnectionError):
            for _ in range(64):  # 4 MiB at most
                writer.write(b"a" * 65536)
                await writer.drain()

    upstream = await raw_upstream(answer)
    s = await sidecar(RAW_CONFIG, raw=upstream.url)
    reader, writer = await open_client(s)
    writer.write(b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    # Well before the upstream read timeout (2 s): cut by size. The head may have gone out
    # already (the answer is streamed): then the cut shows as a chunked body without its end.
    raw, closed = await read_to_end(reader, 1.2)
    writer.close()
    assert closed, raw[:300]
    answer = first_response(raw)
    assert answer.status == 502 or (answer.status == 200 and not raw.endswith(b"0\r\n\r\n")), raw[:300]


@bounded
async def test_a_refused_handshakes_trailer_fields_never_join_its_head(sidecar: Any, raw_upstream: Any) -> None:
    """The WebSocket side (`_Tunnel`) read a chunked refusal's trailer fields into its head."""
    upstream = await raw_upstream(
        fixed(
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nno\r\n0\r\nSet-Cookie: session=attacker\r\nX-Trailer: t\r\n\r\n"
        )
    )
    s = await sidecar(RAW_CONFIG, raw=upstream.url)
    raw = await send_raw(
        s,
        b"GET /public/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        timeout=2.0,
    )
    answer = first_response(raw)
    assert answer.status == 403, raw[:300]
    assert b"session=attacker" not in raw and b"X-Trailer" not in raw


@bounded
async def test_pipelined_requests_sent_before_a_drain_are_all_answered_the_last_with_close(sidecar: Any) -> None:
    """Requests already on an established connection when the drain starts (pipelined, some
    parsed and some still unread) are answered; only the last answer says `Connection: close`."""
    s = await sidecar()
    server = s.proxy.server()
    await server.listen("127.0.0.1", 0)
    try:
        reader, writer = await open_client(server_url(server))
        writer.write(b"GET /public/warm HTTP/1.1\r\nHost: x\r\n\r\n")
        warm = responses(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3.0))
        await asyncio.wait_for(reader.readexactly(int(warm[0].headers["Content-Length"])), 1.0)
        server.start_drain()
        many = b"".join(f"GET /public/p{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in range(40))
        writer.write(many)
        raw, closed = await read_to_end(reader, 4.0)
        writer.close()
        assert closed
        got = responses(raw)
        assert [r.status for r in got] == [200] * 40, raw[-400:]
        assert [r.headers.get("Connection") for r in got][-1] == "close"
        assert all(r.headers.get("Connection") != "close" for r in got[-40:-1])
    finally:
        await server.shutdown(0)


# -- 5. no request makes a 500 of ours --------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"GET http://sidecar.test/public/a HTTP/1.1\r\nHost: sidecar.test\r\n\r\n",
        b"GET http://other.test:99/orders HTTP/1.1\r\nHost: sidecar.test\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /public/a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /public/%00%ff%c0%af/../../orders HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /public/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /public/a?\xff=\xfe&%zz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"get /public/a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"FOO /public/a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-A: \xff\xfe\x80\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\n\xff: 1\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe.\x80.\x81\r\n\r\n",
        b"GET /orders HTTP/1.1\r\nHost: x\r\nAuthorization: \r\n\r\n",
        b"GET /orders HTTP/1.1\r\nHost: x\r\nCookie: \xff=\xfe; ;;=\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nConnection: \xff, close\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nConnection: Host, X-Forwarded-For, Authorization\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: \xff\r\n\r\n",
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nExpect: \xff\r\nContent-Length: 1\r\n\r\na",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: \xff, 999.1.1.1, ::zz\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Request-Id: \xff\x80\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + b"r" * 8000 + b"\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: [::1\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x:99999999999\r\n\r\n",
        b"GET //public/a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTrailer: X-A\r\n\r\n",
    ],
)
@bounded
async def test_no_request_gets_a_500_of_ours(sidecar: Any, data: bytes, caplog: Any) -> None:
    s = await sidecar()
    raw = await send_raw(
        s, data[:-2] + b"Connection: close\r\n\r\n" if data.endswith(b"\r\n\r\n") else data, timeout=2.0
    )
    got = [r.status for r in responses(raw)]
    assert got, raw[:300]
    assert all(status < 500 or status in (501, 505) for status in got), raw[:400]
    assert "Traceback" not in caplog.text and "Unhandled" not in caplog.text


@bounded
async def test_an_upstream_trailer_in_a_later_read_is_dropped_too(sidecar: Any, raw_upstream: Any) -> None:
    """The trailer section arriving on its own, after the head and the content: still no header."""

    async def answer(conn: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"Set-Cookie: session=attacker\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"\r\n")

    upstream = await raw_upstream(answer)
    s = await sidecar(RAW_CONFIG, raw=upstream.url)
    raw = await send_raw(s, b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=3.0)
    answer_ = first_response(raw)
    assert answer_.status == 200 and b"session=attacker" not in raw, raw[:300]
    assert raw.endswith((b"ok", b"0\r\n\r\n")), raw[-50:]
