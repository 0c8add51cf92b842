"""Through the real proxy: streaming both ways in bounded memory, body limits, upstream failures, WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp

from proxy.http.http1 import Request, Server
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.support.raw import bounded_by

STREAM_CONFIG = f"""\
upstream: {{url: "{{upstream}}", timeout: 1s, connect_timeout: 1s, max_body: {{max_body}}}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""
GIB = 1024**3
MIB = 1024**2


def bearer(key: TestKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(key=key)}"}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


async def generated(total: int, chunk: int = MIB) -> AsyncIterator[bytes]:
    block = b"u" * chunk
    sent = 0
    while sent < total:
        piece = block[: min(chunk, total - sent)]
        sent += len(piece)
        yield piece


async def test_one_gib_upload_streams_in_bounded_memory(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="0")
    before = peak_rss_bytes()
    async with await s.request(
        "POST", "/upload", data=generated(GIB), headers=bearer(rsa_key), timeout=aiohttp.ClientTimeout(total=120)
    ) as response:
        assert response.status == 200
        assert await response.json() == {"received": GIB}
    # Client, proxy and upstream share this process: buffering the body anywhere would add ~1 GiB.
    assert peak_rss_bytes() - before < 200 * MIB
    assert s.upstream.last().header("Transfer-Encoding") == "chunked"


async def test_one_gib_download_streams_in_bounded_memory(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="0")
    before = peak_rss_bytes()
    received = 0
    async with await s.get(
        f"/download?bytes={GIB}", headers=bearer(rsa_key), timeout=aiohttp.ClientTimeout(total=120)
    ) as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(MIB):
            received += len(chunk)
    assert received == GIB
    assert peak_rss_bytes() - before < 200 * MIB


@bounded_by(90)
async def test_a_slow_client_gets_a_large_answer_whole_while_the_sidecar_holds_little_of_it(
    sidecar: Any, rsa_key: TestKey
) -> None:
    # While the client's buffer is full the sidecar waits (http/flow.py) and stops reading the
    # upstream, so what it holds for a slow client is a buffer and a chunk, not the answer; and
    # every wait ends when the client reads on, so the answer arrives whole, in order of bytes.
    s = await sidecar(STREAM_CONFIG, max_body="0")
    size = 48 * MIB
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        async with await s.get(
            f"/download?bytes={size}", headers=bearer(rsa_key), timeout=aiohttp.ClientTimeout(total=80)
        ) as response:
            assert response.status == 200
            held_before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            received = 0
            while piece := await response.content.read(64 * 1024):
                assert piece.count(b"x") == len(piece)
                received += len(piece)
                await asyncio.sleep(0.003)  # at most ~20 MiB/s: the sidecar's buffer to us fills
            # Client, proxy and upstream share this process: had the sidecar buffered the
            # answer for us, the peak would be most of its 48 MiB.
            peak = tracemalloc.get_traced_memory()[1] - held_before
    finally:
        if not tracing:
            tracemalloc.stop()
    assert received == size
    assert peak < 8 * MIB, f"{peak / MIB:.1f} MiB held at the peak"


async def test_content_length_over_max_body_is_413_before_the_upstream_is_asked(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="1MB")
    async with await s.request("POST", "/upload", data=b"x" * (MIB + 1), headers=bearer(rsa_key)) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "payload_too_large"
    assert s.upstream.seen == []


async def test_chunked_body_over_max_body_is_413(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="1MB")
    async with await s.request(
        "POST", "/upload", data=generated(3 * MIB, 64 * 1024), headers=bearer(rsa_key)
    ) as response:
        assert response.status == 413


async def test_body_within_the_limit_passes_with_its_content_length(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="1MB")
    async with await s.request("PUT", "/upload", data=b"y" * 1000, headers=bearer(rsa_key)) as response:
        assert await response.json() == {"received": 1000}
    assert s.upstream.last().header("Content-Length") == "1000"


async def test_upstream_refused_is_502_with_a_json_body(sidecar: Any, rsa_key: TestKey, unused_tcp_port: int) -> None:
    s = await sidecar(STREAM_CONFIG.replace('"{upstream}"', f'"http://127.0.0.1:{unused_tcp_port}"'), max_body="0")
    async with await s.get("/x", headers=bearer(rsa_key)) as response:
        assert response.status == 502
        assert await response.json() == {
            "error": "bad_gateway",
            "error_description": "The upstream service is unavailable",
        }


async def test_upstream_timeout_is_504(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="0")
    async with await s.get("/slow?seconds=3", headers=bearer(rsa_key)) as response:
        assert response.status == 504
        assert (await response.json())["error"] == "gateway_timeout"


@contextlib.contextmanager
def unreachable_port() -> Iterator[int]:
    """A loopback port whose connects neither succeed nor fail: a listener with a full accept
    queue (backlog 0, filled by connections it never accepts) drops further SYNs on Linux."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            time.sleep(0.05)  # let the handshakes fill the queue
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def test_upstream_connect_timeout_is_502_not_504(sidecar: Any, rsa_key: TestKey) -> None:
    # Nothing was sent, so the upstream is unavailable (502); 504 says an answer was late.
    with unreachable_port() as port:
        s = await sidecar(
            STREAM_CONFIG.replace('"{upstream}"', f'"http://127.0.0.1:{port}"')
            .replace("connect_timeout: 1s", "connect_timeout: 200ms")
            .replace("timeout: 1s", "timeout: 5s"),
            max_body="0",
        )
        started = time.monotonic()
        async with await s.get("/x", headers=bearer(rsa_key)) as response:
            assert response.status == 502
            assert await response.json() == {
                "error": "bad_gateway",
                "error_description": "The upstream service is unavailable",
            }
        assert 0.19 <= time.monotonic() - started < 3.0  # the connect timeout ended it, not the 5s answer timeout
        # A WebSocket handshake opens its own connection: the same answer.
        with contextlib.suppress(aiohttp.WSServerHandshakeError):
            async with s.client.ws_connect(s.url + "/ws", headers=bearer(rsa_key)):
                raise AssertionError("the upgrade must fail")
        counts = s.runtime.metrics.route("api").totals()  # (counts and cells: requests_total)
        assert {key[3]: n for key, n in counts.items()} == {"5xx": 2}
        assert {key[2] for key in counts} == {"upstream_unavailable"}


async def test_upstream_status_and_bodyless_answers_pass_through(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="0")
    for code in (204, 304, 404, 500):
        async with await s.get(f"/status/{code}", headers=bearer(rsa_key)) as response:
            assert response.status == code
            body = await response.read()
            assert body == (b"" if code in (204, 304) else f"status {code}".encode())
    async with await s.request("HEAD", "/anything", headers=bearer(rsa_key)) as response:
        assert response.status == 200 and await response.read() == b""


async def test_client_disconnect_mid_download_cancels_the_upstream_stream(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="0")
    response = await s.get(f"/download?bytes={GIB}", headers=bearer(rsa_key))
    await response.content.readexactly(MIB)
    response.close()  # the client goes away after 1 MiB of 1 GiB
    # The proxy stops pulling from the upstream: in-flight drops back to zero promptly.
    for _ in range(100):
        if s.runtime.metrics.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert s.runtime.metrics.in_flight == 0


async def test_websocket_is_authenticated_then_relayed_both_ways(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="0")
    async with s.client.ws_connect(s.url + "/ws", headers=bearer(rsa_key)) as ws:
        assert (await asyncio.wait_for(ws.receive_str(), 5)) == "hello user-42"
        await ws.send_str("ping")
        assert (await asyncio.wait_for(ws.receive_str(), 5)) == "ping"
        await ws.send_bytes(b"\x00\x01")
        assert (await asyncio.wait_for(ws.receive_bytes(), 5)) == b"\x00\x01"
    assert s.upstream.last().header("Authorization") is None


async def test_websocket_without_a_token_is_refused_before_the_upgrade(sidecar: Any) -> None:
    s = await sidecar(STREAM_CONFIG, max_body="0")
    try:
        async with s.client.ws_connect(s.url + "/ws"):
            raise AssertionError("the upgrade must be refused")
    except aiohttp.WSServerHandshakeError as refused:
        assert refused.status == 401
    assert s.upstream.seen == []


async def test_a_client_gone_before_its_request_is_forwarded_sends_nothing_upstream(sidecar: Any) -> None:
    """The proxy answers what it can at once and forwards the rest in a task. A client that
    leaves in between (its reset read in the same loop turn) must cost the upstream nothing,
    and the request is still counted and logged (499), with nothing left in flight. (The
    request has a body, so a task forwards it whatever the pool holds: one with none may go
    out on a pooled connection from the handler itself, test_forward_now.py.)"""
    s = await sidecar()
    async with await s.get("/public/warm") as response:  # an idle upstream connection to reuse
        assert response.status == 200

    def leave_then_forward(request: Request) -> Any:
        rest = s.proxy.handle(request)
        assert rest is not None, "a public route is forwarded"
        assert request.transport is not None
        request.transport.abort()  # its connection_lost now runs before the task
        return rest

    server = Server(leave_then_forward)
    await server.listen("127.0.0.1", 0)
    try:
        host, port = server.sockets[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /public/gone HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        async with asyncio.timeout(2):
            while s.runtime.metrics.in_flight:
                await asyncio.sleep(0.01)
        assert not any(seen.raw_path.startswith("/public/gone") for seen in s.upstream.seen)
        counts = s.runtime.metrics.route("public").totals()  # (counts and cells: requests_total)
        assert {key[3]: n for key, n in counts.items()} == {"2xx": 1, "4xx": 1}, "the warm-up, then a 499"
    finally:
        await server.shutdown(0)
