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
