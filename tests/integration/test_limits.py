"""Bounded waits and bounded connections, on the real proxy.

In process (the `sidecar` fixture): a request body that trickles in past `upstream.body_timeout`
(408, and the upstream request aborted), and WebSocket tunnels closed by `websocket.idle_timeout`,
`max_lifetime` and `close_on_token_expiry`. As `jwt-sidecar run` in a subprocess with a small
open-file limit: the proxy port saturated up to `max_connections` and past it, with the admin
port still answering; and running out of descriptors at accept, which must neither spin nor
flood the log. The upstreams here are raw servers (tests/support/raw.py), so a test sees
exactly when the proxy closes its side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import resource
import time
from contextlib import AbstractAsyncContextManager, suppress
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.reload import reload
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint
from tests.support.process import Run, running
from tests.support.raw import RawServer, bounded_by

bounded = bounded_by(20.0)

CONFIG = f"""\
upstream: {{url: "{{raw}}", timeout: 2s, connect_timeout: 1s, body_timeout: {{body}}}}
websocket: {{idle_timeout: {{idle}}, max_lifetime: {{life}}}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}"}}
routes:
  - name: public
    match: {{path_prefix: /public/}}
    auth: none
  - name: expiring
    match: {{path_prefix: /expiring/}}
    auth: {{provider: main}}
    websocket: {{close_on_token_expiry: true}}
  - name: api
    match: {{path_prefix: /}}
    auth: {{provider: main}}
"""


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


class Upstream:
    """A raw upstream: answers a WebSocket handshake with 101 and then echoes raw bytes, or
    reads a request body to its end; either way it notes when the proxy closed its side."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.closed: list[float] = []
        self.server: RawServer | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        body = bytearray()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            key = re.search(rb"(?im)^sec-websocket-key: *(\S+)", head)
            if key:
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Accept: " + accept_key(key.group(1)) + b"\r\n\r\n"
                )
            while data := await reader.read(65536):
                if key:
                    writer.write(data)  # the tunnel is raw bytes: echo them
                else:
                    body += data
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.bodies.append(bytes(body))
            self.closed.append(time.monotonic())

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"


async def start(
    sidecar: Any, raw_server: Any, *, body: str = "1s", idle: str = "0", life: str = "0", extra: str = ""
) -> tuple[Any, Upstream]:
    upstream = Upstream()
    upstream.server = await raw_server(upstream.serve)
    s = await sidecar(CONFIG + extra, raw=upstream.url, body=body, idle=idle, life=life)
    return s, upstream


async def open_client(s: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = s.url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the proxy closes (or resets) the connection within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


# -- the request body's deadline -------------------------------------------------------------------


@bounded
async def test_a_trickled_body_gets_408_at_body_timeout_and_the_upstream_request_is_aborted(
    sidecar: Any, raw_server: Any
) -> None:
    # A byte every 0.25 s never trips the per-read timeout (2 s): only the deadline ends it.
    s, upstream = await start(sidecar, raw_server, body="1s")
    reader, writer = await open_client(s)

    async def trickle() -> None:
        with suppress(ConnectionError):
            for _ in range(1000):
                writer.write(b"x")
                await asyncio.sleep(0.25)

    writer.write(b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    began = time.monotonic()
    trickling = asyncio.ensure_future(trickle())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        answered = time.monotonic() - began
    finally:
        trickling.cancel()
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert b"\r\nConnection: close\r\n" in head
    assert 0.7 <= answered < 3.0, f"answered after {answered:.2f}s for a body_timeout of 1s"
    # The upstream had the head and the first bytes: its request is aborted, not left waiting.
    for _ in range(300):
        if upstream.closed:
            break
        await asyncio.sleep(0.01)
    assert upstream.closed, "the upstream connection is still open after the 408"
    assert upstream.heads[0].startswith(b"POST /public/upload ")
    assert 0 < len(upstream.bodies[0]) < 1000


@bounded
async def test_a_slow_body_that_completes_within_body_timeout_is_forwarded_whole(sidecar: Any, raw_server: Any) -> None:
    s, upstream = await start(sidecar, raw_server, body="3s")
    _reader, writer = await open_client(s)
    writer.write(b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
    for piece in (b"ab", b"cd", b"ef", b"gh"):  # 0.9 s in all, under 3 s
        await asyncio.sleep(0.3)
        writer.write(piece)
    await asyncio.sleep(0.3)
    writer.close()
    for _ in range(300):
        if upstream.bodies:
            break
        await asyncio.sleep(0.01)
    assert upstream.bodies == [b"abcdefgh"]


@bounded
async def test_a_slow_head_gets_408_at_header_timeout_and_is_counted(sidecar: Any, raw_server: Any) -> None:
    s, upstream = await start(sidecar, raw_server, extra="header_timeout: 300ms\n")
    reader, writer = await open_client(s)
    writer.write(b"GET /public/slow HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    began = time.monotonic()
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"\r\nConnection: close\r\n" in answer, answer[:200]
    assert time.monotonic() - began < 2.5
    assert upstream.heads == []
    async with s.client.get(s.admin_url + "/metrics") as response:
        text = await response.text()
    assert (
        sample(
            text,
            "jwt_sidecar_requests_total",
            route="(none)",
            method="other",
            decision="rejected",
            reason="header_timeout",
            status="4xx",
        )
        == 1
    )


@bounded
async def test_keep_alive_timeout_closes_an_idle_connection_without_an_answer(sidecar: Any, raw_server: Any) -> None:
    s, _ = await start(sidecar, raw_server, extra="keep_alive_timeout: 600ms\n")
    # After an answer (our 401, kept alive), and before any request at all: waiting for a
    # request is idle, not slow.
    reader, writer = await open_client(s)
    writer.write(b"GET /orders HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401 ") and b"connection: close" not in head.lower()
    length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
    await reader.readexactly(length)
    silent_reader, silent_writer = await open_client(s)
    began = time.monotonic()
    try:
        assert not await closed_within(reader, 0.3), "closed before keep_alive_timeout"
        assert await closed_within(reader, 3.0)
        # Closed too, and never answered: nothing at all arrives before the end.
        assert await asyncio.wait_for(silent_reader.read(), 1.0) == b""
    finally:
        writer.close()
        silent_writer.close()
    assert 0.5 <= time.monotonic() - began < 3.0


@bounded
async def test_a_reload_that_changes_the_connection_limits_is_refused_as_needing_a_restart(
    sidecar: Any, raw_server: Any, tmp_path: Path
) -> None:
    s, _ = await start(sidecar, raw_server)
    path = Path(s.runtime.config_path)
    original = path.read_text()
    for change in ("header_timeout: 3s\n", "max_connections: 100\n", "keep_alive_timeout: 5s\n"):
        path.write_text(original + change)
        assert await reload(s.runtime) is False, change
        assert s.runtime.settings.header_timeout == 10 and s.runtime.settings.max_connections is None
        assert s.runtime.settings.keep_alive_timeout == 75


# -- WebSocket tunnels -----------------------------------------------------------------------------


async def handshake(s: Any, path: str, token: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await open_client(s)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes = b"ping") -> bool:
    """True when `data` comes back through the tunnel (the upstream echoes raw bytes)."""
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.readexactly(len(data)), 2) == data
    except (ConnectionError, asyncio.IncompleteReadError):
        return False


@bounded
async def test_an_idle_tunnel_is_closed_after_idle_timeout_and_traffic_keeps_it_open(
    sidecar: Any, raw_server: Any
) -> None:
    s, upstream = await start(sidecar, raw_server, idle="500ms")
    reader, writer = await handshake(s, "/public/ws")
    try:
        for _ in range(6):  # 1.2 s of traffic every 0.2 s: never idle for 0.5 s
            await asyncio.sleep(0.2)
            assert await echoes(reader, writer)
        silent = time.monotonic()  # the echo just came back: the last byte either way
        assert await closed_within(reader, 3.0), "the idle tunnel was not closed"
        after = time.monotonic() - silent
    finally:
        writer.close()
    assert 0.4 <= after < 2.5, f"closed {after:.2f}s after the last byte, idle_timeout 0.5s"
    await asyncio.sleep(0.1)
    assert len(upstream.closed) == 1, "the upstream side of the tunnel is still open"


@bounded
async def test_a_busy_tunnel_is_closed_at_max_lifetime(sidecar: Any, raw_server: Any) -> None:
    s, upstream = await start(sidecar, raw_server, life="1s")
    reader, writer = await handshake(s, "/public/ws")
    opened = time.monotonic()
    try:
        while await echoes(reader, writer):
            assert time.monotonic() - opened < 4.0, "the tunnel outlived max_lifetime"
            await asyncio.sleep(0.1)
        lived = time.monotonic() - opened
    finally:
        writer.close()
    assert 0.8 <= lived < 3.0, f"closed after {lived:.2f}s, max_lifetime 1s"
    await asyncio.sleep(0.1)
    assert len(upstream.closed) == 1


@bounded
async def test_a_tunnel_closes_when_its_token_expires_where_the_route_asks_for_it(
    sidecar: Any, raw_server: Any, rsa_key: TestKey
) -> None:
    # exp 28 s ago: still accepted with the provider's default 30 s leeway, for about 2 s more.
    s, upstream = await start(sidecar, raw_server)
    token = mint({"exp": int(time.time()) - 28}, key=rsa_key)
    expiring = await handshake(s, "/expiring/ws", token)
    lasting = await handshake(s, "/api/ws", token)  # the same token, a route without the option
    opened = time.monotonic()
    try:
        while await echoes(*expiring):
            assert time.monotonic() - opened < 5.0, "the tunnel outlived its token"
            await asyncio.sleep(0.1)
        lived = time.monotonic() - opened
        assert 0.3 <= lived < 3.5, f"closed after {lived:.2f}s; the token had at most 2 s left"
        assert await echoes(*lasting), "close_on_token_expiry is off on this route"
    finally:
        expiring[1].close()
        lasting[1].close()
    assert len(upstream.closed) >= 1


# -- the connection limit, in a process with few descriptors --------------------------------------


def _nofile(limit: int) -> Any:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return set_limit


def run_sidecar(
    tmp_path: Path, jwks_server: Any, rsa_key: TestKey, upstream: str, extra: str, nofile: int
) -> AbstractAsyncContextManager[Run]:
    """`run` with at most `nofile` descriptors, ready (the context stops it)."""
    jwks_server.document = jwks_of(rsa_key)
    text = (
        CONFIG.replace("{raw}", upstream)
        .replace("{jwks}", jwks_server.url())
        .replace("{body}", "5s")
        .replace("{idle}", "0")
        .replace("{life}", "0")
        + f"access_log: false\n{extra}"
    )
    return running(tmp_path, text, stdout=False, preexec_fn=_nofile(nofile))


async def admin_get(admin: str, path: str) -> tuple[int, str]:
    """A fresh connection each time: the admin port must accept new ones at saturation."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(admin + path, timeout=aiohttp.ClientTimeout(total=5)) as response:
            return response.status, await response.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


@bounded_by(60.0)
async def test_at_max_connections_new_ones_are_closed_and_counted_and_the_admin_port_answers(
    tmp_path: Path, raw_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    upstream = Upstream()
    upstream.server = await raw_server(upstream.serve)
    # 256 descriptors, max_connections not set: (256 - 128) / 2 = 64.
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with run_sidecar(tmp_path, jwks_server, rsa_key, upstream.url, "", nofile=256) as run:
        port, admin = run.listen, run.admin_url
        try:
            assert "open-file limit 256; at most 64 client connections" in run.stderr()
            for _ in range(64):
                held.append(await asyncio.open_connection("127.0.0.1", port))
            for _ in range(100):
                status, text = await admin_get(admin, "/metrics")
                if sample(text, "jwt_sidecar_connections_open") == 64:
                    break
                await asyncio.sleep(0.05)
            assert sample(text, "jwt_sidecar_connections_open") == 64
            # Over the limit: closed at once, before a byte is read.
            for _ in range(20):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except ConnectionResetError:
                    continue  # reset before the connect even completed here: closed, as it should be
                with suppress(ConnectionError):
                    writer.write(b"GET /public/x HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await closed_within(reader, 3.0), "a connection over max_connections was kept"
                writer.close()
            # The admin port answers, on new connections, with the proxy port full.
            assert (await admin_get(admin, "/healthz"))[0] == 200
            assert (await admin_get(admin, "/readyz"))[0] == 200
            status, text = await admin_get(admin, "/metrics")
            assert status == 200
            assert sample(text, "jwt_sidecar_connections_rejected_total", reason="limit") == 20
            assert sample(text, "jwt_sidecar_connections_open") == 64
            # The connections within the limit still reach the upstream (their descriptors are reserved).
            reader, writer = held[0]
            writer.write(b"POST /public/up HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            for _ in range(300):
                if upstream.heads:
                    break
                await asyncio.sleep(0.01)
            assert upstream.heads and upstream.heads[0].startswith(b"POST /public/up ")
            # Room again once some close.
            for _, writer in held[32:]:
                writer.close()
            del held[32:]
            for _ in range(100):
                status, text = await admin_get(admin, "/metrics")
                if sample(text, "jwt_sidecar_connections_open") == 32:
                    break
                await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /orders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
        finally:
            for _, writer in held:
                writer.close()
            await run.stop()
    assert "Traceback" not in run.stderr()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@bounded_by(60.0)
async def test_out_of_descriptors_at_accept_neither_spins_nor_floods_the_log_and_recovers(
    tmp_path: Path, raw_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    # max_connections set far past what 256 descriptors allow: accept itself fails (EMFILE).
    upstream = Upstream()
    upstream.server = await raw_server(upstream.serve)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with run_sidecar(tmp_path, jwks_server, rsa_key, upstream.url, "max_connections: 5000\n", nofile=256) as run:
        port, admin = run.listen, run.admin_url
        try:
            assert "max_connections 5000 leaves too few" in run.stderr()
            for _ in range(300):  # the kernel completes these handshakes whether or not we accept
                held.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.5)
            logged = len(run.stderr().splitlines())
            cpu = cpu_seconds(run.pid)
            await asyncio.sleep(3.0)
            spent = cpu_seconds(run.pid) - cpu
            lines = run.stderr().splitlines()[logged:]
            assert spent < 1.5, f"{spent:.2f} s of CPU in 3 s while out of descriptors: the accept loop spins"
            assert len(lines) <= 2, "out of descriptors, the log grows:\n" + "\n".join(lines[:20])
            for _, writer in held:
                writer.close()
            held.clear()
            # Descriptors free again: both ports accept (the listeners did not give up).
            for _ in range(100):
                try:
                    if (await admin_get(admin, "/healthz"))[0] == 200:
                        break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
            assert (await admin_get(admin, "/readyz"))[0] == 200
            for _ in range(100):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /orders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                try:
                    answer = await asyncio.wait_for(reader.read(), 5)
                except ConnectionError:
                    answer = b""
                writer.close()
                if answer:
                    break
                await asyncio.sleep(0.1)
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
            assert run.returncode is None
        finally:
            for _, writer in held:
                writer.close()
            await run.stop()
    assert "Traceback" not in run.stderr()
