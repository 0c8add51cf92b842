"""proxy/request/app.py at the level of one request: `Proxy.handle` on real requests, the
exchange it makes recorded in the metrics. Real parts (tests/support/steps.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from proxy.http.http1 import Request, Server
from tests.conftest import TestKey
from tests.support.raw import bounded_by
from tests.support.steps import Parts, request_bytes, start_parts


@pytest.fixture
async def parts(aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey) -> Any:
    made = await start_parts(aiohttp_server, tmp_path, rsa_key)
    yield made
    await made.proxy.close()


async def serve(handler: Any, raw: bytes) -> bytes:
    server = Server(handler)
    await server.listen("127.0.0.1", 0)
    try:
        host, port = server.sockets[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer
    finally:
        await server.shutdown(0)


def counts(parts: Parts, route: str) -> dict[tuple[str, ...], float]:
    return dict(parts.runtime.metrics.route(route).counts.items())


@bounded_by(10)
async def test_a_refusal_is_answered_within_handle_and_counted_once(parts: Parts) -> None:
    returned: list[object] = []

    def handler(request: Request) -> Awaitable[None] | None:
        rest = parts.proxy.handle(request)
        returned.append(rest)
        return rest

    answer = await serve(handler, request_bytes("/api/orders"))
    assert answer.startswith(b"HTTP/1.1 401 ") and b'\r\nWWW-Authenticate: Bearer realm="api"' in answer
    assert b"\r\nX-Request-Id: " in answer
    assert returned == [None], "answered in the handler's own call: no task"
    assert parts.runtime.metrics.in_flight == 0
    assert {key[3]: n for key, n in counts(parts, "api").items()} == {"4xx": 1}


@bounded_by(10)
async def test_a_client_gone_before_the_rest_ran_costs_the_upstream_nothing_and_is_a_499(parts: Parts) -> None:
    # app.py is the one place this is handled: the server runs the rest regardless.
    def handler(request: Request) -> Awaitable[None] | None:
        rest = parts.proxy.handle(request)
        assert rest is not None, "a public route is forwarded in a task"
        assert request.transport is not None
        request.transport.abort()  # connection_lost runs before the task does
        return rest

    assert await serve(handler, request_bytes("/public/gone")) == b""
    async with asyncio.timeout(2):
        while parts.runtime.metrics.in_flight:
            await asyncio.sleep(0.01)
    assert parts.upstream.seen == []
    assert {key[3]: n for key, n in counts(parts, "public").items()} == {"4xx": 1}, "counted as a 499"
