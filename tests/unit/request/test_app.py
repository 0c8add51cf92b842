"""proxy/request/app.py at the level of one request: `Proxy.handle` on real requests, the
exchange it makes recorded in the metrics. Real parts (tests/support/steps.py)."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from proxy.http.http1 import Request, Server
from proxy.ops.reload import reload
from proxy.request.app import Proxy
from proxy.telemetry.accesslog import AccessLog
from tests.conftest import TestKey, mint
from tests.support.raw import bounded_by
from tests.support.steps import Parts, request_bytes, start_parts


@pytest.fixture
async def parts(aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey) -> Any:
    made = await start_parts(aiohttp_server, tmp_path, rsa_key)
    yield made
    await made.proxy.close()


async def serve(handler: Any, raw: bytes) -> bytes:
    """`raw` answered by a server calling `handler` (a `Proxy`: its own server, `Proxy.server()`)."""
    server = handler.server() if isinstance(handler, Proxy) else Server(handler)
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


async def serve_each(handler: Any, raws: list[bytes]) -> list[bytes]:
    """Each of `raws` on one connection, the next sent once the answer before it is in."""
    server = handler.server() if isinstance(handler, Proxy) else Server(handler)
    await server.listen("127.0.0.1", 0)
    answers = []
    try:
        host, port = server.sockets[0]
        reader, writer = await asyncio.open_connection(host, port)
        for raw in raws:
            writer.write(raw)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = 0 if raw.startswith(b"HEAD ") else int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
            answers.append(head + await asyncio.wait_for(reader.readexactly(length), 5))
        writer.close()
        return answers
    finally:
        await server.shutdown(0)


def counts(parts: Parts, route: str) -> dict[tuple[str, ...], float]:
    return dict(parts.runtime.metrics.route(route).totals().items())  # what a scrape reads


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


def _kept_alive(target: str, *fields: str, method: str = "GET") -> bytes:
    return request_bytes(target, *fields, method=method).replace(b"Connection: close\r\n", b"")


def _masked(answer: bytes) -> bytes:
    return re.sub(rb"\r\n(Date|X-Request-Id): [^\r]*", rb"\r\n\1: -", answer)


@bounded_by(10)
@pytest.mark.parametrize("served_by", ["server", "handle"])
async def test_a_401_answered_again_for_its_method_and_target_is_the_same_answer_line_and_count(
    parts: Parts, served_by: str
) -> None:
    # The first 401 for no token on (GET, /api/orders?page=1) is decided by the pipeline; the
    # ones after it by what app.py prepared from it (`_Quick`): the same bytes, log line and
    # count, answered from the head (`Proxy.server()`'s `quick`, when the connection stays open)
    # or from a `Request` (`handle`; and the proxy's server for the last, which closes).
    stream = io.BytesIO()
    log = parts.runtime.access_log = AccessLog(stream)
    raws = [
        _kept_alive("/api/orders?page=1", "X-Request-Id: first-one"),
        _kept_alive("/api/orders?page=1", "X-Request-Id: second-one"),
        _kept_alive("/api/orders?page=1"),
        _kept_alive("/api/orders?page=1", method="HEAD"),
        request_bytes("/api/orders?page=1", "X-Request-Id: last-one"),
    ]
    if served_by == "server":  # one at a time: a request with none before it is answered from its head
        answers = await serve_each(parts.proxy, raws)
    else:  # pipelined, through `handle`
        answered = await serve(parts.proxy.handle, b"".join(raws))
        answers = [b"HTTP/1.1 401 " + part for part in answered.split(b"HTTP/1.1 401 ")[1:]]
    assert len(answers) == 5
    assert b"\r\nX-Request-Id: first-one\r\n" in answers[0] and b"\r\nX-Request-Id: second-one\r\n" in answers[1]
    assert re.search(rb"\r\nX-Request-Id: [0-9a-f]{32}\r\n", answers[2]), "an id of ours when the client sent none"
    assert _masked(answers[1]) == _masked(answers[2]) == _masked(answers[0])
    assert answers[0].endswith(b"\r\n\r\n{}") and answers[3].endswith(b"\r\n\r\n"), "HEAD: no body"
    assert _masked(answers[4]) == _masked(answers[0]).replace(b"\r\n\r\n{}", b"\r\nConnection: close\r\n\r\n{}")
    assert len(parts.runtime.snapshot.refusals) == 2, "GET and HEAD each prepared once"  # type: ignore[union-attr]

    log.flush()
    lines = stream.getvalue().decode().splitlines()
    assert [json.loads(line)["request_id"] for line in lines[:2]] == ["first-one", "second-one"]
    shapes = [re.sub(r'"(time|request_id)":"[^"]*"|"latency_ms":[0-9.]+', "-", line) for line in lines]
    assert shapes[0] == shapes[1] == shapes[2] == shapes[4]
    assert shapes[3] == shapes[0].replace('"method":"GET"', '"method":"HEAD"')
    assert json.loads(lines[1]) | {"time": 0, "latency_ms": 0} == {
        "time": 0,
        "request_id": "second-one",
        "client": "127.0.0.1",
        "method": "GET",
        "path": "/api/orders",
        "route": "api",
        "provider": "main",
        "status": 401,
        "decision": "denied",
        "reason": "token_missing",
        "subject": None,
        "latency_ms": 0,
    }

    assert counts(parts, "api") == {
        ("GET", "denied", "token_missing", "4xx"): 4,
        ("HEAD", "denied", "token_missing", "4xx"): 1,
    }
    body, _ = parts.runtime.metrics.render()
    text = body.decode()
    assert 'requests_total{decision="denied",method="GET",reason="token_missing",route="api",status="4xx"} 4.0' in text
    assert 'requests_total{decision="denied",method="HEAD",reason="token_missing",route="api",status="4xx"} 1.0' in text
    assert re.search(r'jwt_sidecar_auth_duration_seconds_count\{route="api"\} 5\.0', text), (
        "the auth step observed each time"
    )


@bounded_by(10)
async def test_a_target_refused_for_no_token_is_served_when_a_token_comes(parts: Parts, rsa_key: TestKey) -> None:
    raw = (
        _kept_alive("/api/orders")
        + _kept_alive("/api/orders")
        + request_bytes("/api/orders", f"Authorization: Bearer {mint(key=rsa_key)}")
    )
    answer = await serve(parts.proxy.handle, raw)
    assert answer.count(b"HTTP/1.1 401 ") == 2 and answer.count(b"HTTP/1.1 200 ") == 1
    assert len(parts.upstream.seen) == 1


@bounded_by(10)
async def test_a_reload_forgets_the_401s_prepared_under_the_config_before(parts: Parts) -> None:
    await serve(parts.proxy, _kept_alive("/api/orders") + request_bytes("/api/orders"))
    assert counts(parts, "api") == {("GET", "denied", "token_missing", "4xx"): 2}
    path = Path(parts.runtime.config_path or "")
    text = path.read_text()
    path.write_text(text[: text.rindex("auth: {provider: main}")] + "auth: none\n")  # the api route made public
    assert await reload(parts.runtime)
    answer = await serve(parts.proxy, _kept_alive("/api/orders") + request_bytes("/api/orders"))
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert len(parts.upstream.seen) == 2


@bounded_by(10)
async def test_401s_answered_from_the_head_keep_their_turn_among_pipelined_requests(parts: Parts) -> None:
    await serve(parts.proxy, request_bytes("/api/orders"))  # the first: prepared by the pipeline
    raw = (
        _kept_alive("/public/a", "X-Request-Id: one")
        + _kept_alive("/api/orders", "X-Request-Id: two")
        + _kept_alive("/api/orders", "X-Request-Id: three")
        + _kept_alive("/public/b", "X-Request-Id: four")
        + request_bytes("/api/orders", "X-Request-Id: five")
    )
    answer = await serve(parts.proxy, raw)
    assert re.findall(rb"HTTP/1\.1 (\d+) ", answer) == [b"200", b"401", b"401", b"200", b"401"]
    assert re.findall(rb"\r\nX-Request-Id: (\w+)\r\n", answer) == [b"one", b"two", b"three", b"four", b"five"]
    assert counts(parts, "api") == {("GET", "denied", "token_missing", "4xx"): 4}


@bounded_by(10)
async def test_a_401_answered_from_the_head_while_draining_still_says_close(parts: Parts) -> None:
    await serve(parts.proxy, request_bytes("/api/orders"))
    server = parts.proxy.server()
    await server.listen("127.0.0.1", 0)
    try:
        host, port = server.sockets[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(_kept_alive("/api/orders"))
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n{}"), 5)
        assert b"Connection: close" not in first
        server.start_drain()
        writer.write(_kept_alive("/api/orders"))
        last = await asyncio.wait_for(reader.read(), 5)
        assert last.startswith(b"HTTP/1.1 401 ") and b"\r\nConnection: close\r\n" in last
        writer.close()
    finally:
        await server.shutdown(0)
    assert counts(parts, "api") == {("GET", "denied", "token_missing", "4xx"): 3}
