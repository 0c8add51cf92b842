"""proxy/request/forward.py at the level of one request: `forward` run on an `Exchange` made by hand.

The exchange holds what the earlier steps would have put there (a route plan from a real
snapshot, the path, the query, the header pairs); the upstream is real, on loopback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from proxy.request.exchange import Exchange
from proxy.request.forward import forward
from tests.conftest import TestKey
from tests.support.raw import RawServer, bounded_by
from tests.support.steps import CONFIG, Parts, request_bytes, run_step, start_parts


@pytest.fixture
async def parts(aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey) -> Any:
    # The upstream URL has a base path: the request path is appended to it.
    made = await start_parts(aiohttp_server, tmp_path, rsa_key, CONFIG.replace('"{upstream}"', '"{upstream}/base/"'))
    yield made
    await made.proxy.close()


def routed(ex: Exchange, route: str, path: str, query: str, fields: list[tuple[bytes, bytes]]) -> Any:
    snapshot = ex.snapshot = ex.runtime.snapshot
    assert snapshot is not None
    ex.plan = snapshot.plans[route]
    ex.path, ex.query, ex.fields = path, query, fields
    return forward(ex)


@bounded_by(10)
async def test_forward_sends_the_exchanges_path_query_and_header_pairs_as_they_are(parts: Parts) -> None:
    fields = [(b"Host", b"app.test"), (b"x-odd-Case", b"caf\xc3\xa9"), (b"X-Two", b"1"), (b"X-Two", b"2")]
    fields += [(b"X-User-Id", "zoë".encode()), (b"X-Two", b"3")]

    def step(ex: Exchange) -> Any:
        return routed(ex, "public", "/p/q", "a=%2F&b", fields)

    ran = await run_step(parts, request_bytes("/ignored"), step)
    assert ran.status == 200 and ran.error is None
    seen = parts.upstream.last()
    assert seen.raw_path == "/base/p/q?a=%2F&b"
    assert seen.headers["host"] == ["app.test"] and seen.headers["x-two"] == ["1", "2", "3"], "in order"
    assert seen.header("x-odd-case") == "café" and seen.header("X-User-Id") == "zoë"
    assert b"\r\nX-Request-Id: rid-test\r\n" in ran.answer, "the answer carries the exchange's request id"


@bounded_by(10)
async def test_the_http_layer_writes_the_framing_whatever_the_pairs_say(parts: Parts) -> None:
    # identity.py never passes these on; the encoder drops them anyway: the body's framing is
    # the upstream client's, and the origin's Host is written when the pairs hold none.
    fields = [(b"Content-Length", b"99"), (b"transfer-encoding", b"chunked"), (b"X-A", b"1")]
    ran = await run_step(parts, request_bytes("/ignored"), lambda ex: routed(ex, "public", "/x", "", fields))
    assert ran.status == 200
    seen = parts.upstream.last()
    assert seen.raw_path == "/base/x" and seen.body_size == 0
    assert "content-length" not in seen.headers and "transfer-encoding" not in seen.headers
    assert seen.header("Host") == parts.upstream.url.removeprefix("http://")


@bounded_by(10)
async def test_an_answers_hop_by_hop_fields_and_request_id_stop_at_the_proxy(
    aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey, raw_server: Any
) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
            b"X-Request-Id: theirs\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\nX-Kept: k\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        await writer.drain()

    server: RawServer = await raw_server(upstream)
    parts = await start_parts(aiohttp_server, tmp_path, rsa_key, upstream_url=f"http://127.0.0.1:{server.port}")
    try:
        ran = await run_step(parts, request_bytes("/ignored"), lambda ex: routed(ex, "public", "/x", "", []))
    finally:
        await parts.proxy.close()
    head = ran.answer.split(b"\r\n\r\n")[0].lower()
    assert ran.status == 200 and ran.answer.endswith(b"\r\n\r\nok")
    assert b"x-secret" not in head and b"keep-alive" not in head and b"theirs" not in head
    assert b"\r\nx-kept: k" in head and head.count(b"\r\ndate: ") == 1
    assert b"\r\nx-request-id: rid-test" in head


async def _answers(rsa_key: TestKey, aiohttp_server: Any, tmp_path: Path, raw_server: Any, upstream: Any) -> list[Any]:
    """Two requests in turn through a proxy whose upstream is `upstream` (a raw handler)."""
    server: RawServer = await raw_server(upstream)
    parts = await start_parts(aiohttp_server, tmp_path, rsa_key, upstream_url=f"http://127.0.0.1:{server.port}")
    try:
        return [
            await run_step(parts, request_bytes("/ignored"), lambda ex: routed(ex, "public", "/x", "", []))
            for _ in range(2)
        ]
    finally:
        await parts.proxy.close()


@bounded_by(10)
async def test_heads_with_the_same_field_names_are_relayed_each_with_its_own_values(
    aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey, raw_server: Any
) -> None:
    # The answer's fields go by a plan made once per list of names (forward._PLANS): the
    # values, a name with a % in it and a plain `Connection: close` must all come out exact.
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 Fine\r\nX-A: a%d\r\nX-%%d: %%s%d\r\nConnection: close\r\nX-B:\r\n"
                b"Content-Length: 3\r\n\r\nok%d" % (n, n, n)
            )
            await writer.drain()

    first, second = await _answers(rsa_key, aiohttp_server, tmp_path, raw_server, upstream)
    for n, ran in enumerate((first, second), 1):
        head, _, body = ran.answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 Fine\r\nX-A: a%d\r\nX-%%d: %%s%d\r\nX-B: \r\n" % (n, n)), head
        assert body == b"ok%d" % n and b"\r\nX-Request-Id: rid-test\r\n" in head
        assert head.count(b"\r\nDate: ") == 1 and b"Connection: close" in head  # ours: the client asked to close


@bounded_by(15)
async def test_a_large_answer_trickled_slower_than_the_timeout_in_all_but_faster_per_read_arrives_whole(
    aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey, raw_server: Any
) -> None:
    # Relayed from the read callback (Response.relay), the task is not woken per read: each
    # read must still start the upstream's read timeout (2 s here) again.
    size, pieces = 200_000, 4

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(pieces):
            writer.write(b"x" * (size // pieces))
            await writer.drain()
            await asyncio.sleep(0.7)  # 2.8 s in all: past the timeout, never 2 s without a byte
        await reader.read()

    server: RawServer = await raw_server(upstream)
    parts = await start_parts(aiohttp_server, tmp_path, rsa_key, upstream_url=f"http://127.0.0.1:{server.port}")
    try:
        ran = await run_step(parts, request_bytes("/ignored"), lambda ex: routed(ex, "public", "/x", "", []))
    finally:
        await parts.proxy.close()
    head, _, body = ran.answer.partition(b"\r\n\r\n")
    assert ran.status == 200 and b"Content-Length: 200000" in head
    assert body == b"x" * size


@bounded_by(15)
async def test_a_large_answer_that_stalls_mid_relay_is_cut_at_the_timeout(
    aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey, raw_server: Any
) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        await asyncio.sleep(30)  # never the rest

    server: RawServer = await raw_server(upstream)
    parts = await start_parts(aiohttp_server, tmp_path, rsa_key, upstream_url=f"http://127.0.0.1:{server.port}")
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        ran = await run_step(parts, request_bytes("/ignored"), lambda ex: routed(ex, "public", "/x", "", []))
    finally:
        await parts.proxy.close()
    _, _, body = ran.answer.partition(b"\r\n\r\n")
    assert ran.status == 200 and len(body) == 100_000, "the head and what came, then the connection cut"
    # Not before the 2 s timeout, and not when the upstream would have gone on (30 s): the upper
    # bound leaves room for a loaded machine, as a fixed 4.5 s did not.
    assert 1.9 <= loop.time() - began < 10, "cut at the upstream's 2 s timeout"
