"""The no-task forward path (forward.py's `forward_now`/`Answering`, upstream.py's `Pool.send`)
against a misbehaving upstream, on a pool that reuses connections at once (no probation: the
fast path is what is under test): stray bytes after an answer (tests/support/strays.py), 1xx
interim answers and heads split across reads, bodiless answers that announce a body, a client
gone mid-answer; and the bytes the upstream receives are the task path's, on every kind of
route (identity headers injected, spoofed ones stripped, tokens removed from where they came)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.http.upstream import Pool
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.integration.conftest import BASE_CONFIG
from tests.support import strays
from tests.support.raw import bounded_by
from tests.support.strays import STRAYS

RAW_CONFIG = BASE_CONFIG.replace("{upstream}", "{raw}")


async def fast_pool(s: Any) -> list[int]:
    old = s.runtime.pool
    pool = s.runtime.pool = Pool(probation=0)
    await old.close()
    sent: list[int] = []
    send = pool.send

    def counting(*args: Any, **kwargs: Any) -> Any:
        conn = send(*args, **kwargs)
        if conn is not None:
            sent.append(1)
        return conn

    pool.send = counting  # type: ignore[method-assign]
    return sent


async def read_answer(reader: asyncio.StreamReader, method: str) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    status = int(head.split(b" ")[1])
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if method == "HEAD" or status in (204, 304):
        length = 0
    return head, await reader.readexactly(length)


def marker_of(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-marker:"):
            return line.partition(b":")[2].strip()
    return None


@pytest.mark.parametrize("delay", [None, 0.05])
@pytest.mark.parametrize("mode", list(STRAYS))
@bounded_by(30)
async def test_pipelined_keepalive_users_each_get_their_own_answer_on_the_no_task_path(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, mode: str, delay: float | None
) -> None:
    method = STRAYS[mode][0]
    # Late stray bytes come while the connection carries no request (`when_idle`): with the
    # probation off, bytes that come between a request and its answer ARE its answer to any
    # HTTP/1.1 client (a timer run late on a loaded machine did that: every client's sixth
    # request got another's first answer, on session 5's code as on session 6's), and keeping
    # them from there is the probation's work (tests/unit/http/test_upstream.py, "on probation").
    upstream = await raw_server(strays.misbehaving(mode, None if delay is None else (lambda: delay), when_idle=True))
    s = await sidecar(RAW_CONFIG, raw=f"http://127.0.0.1:{upstream.port}")
    sent = await fast_pool(s)
    host, port = s.url.removeprefix("http://").split(":")

    async def client(c: int) -> list[str]:
        reader, writer = await asyncio.open_connection(host, int(port))
        users = [f"u{c}-{i}" for i in range(6)]
        token = mint({"sub": f"u{c}"}, key=rsa_key)
        wrong = []
        for rnd in range(2):
            batch = users[rnd * 3 : rnd * 3 + 3]
            writer.write(
                b"".join(
                    f"{method} /orders/{u} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
                    for u in batch
                )
            )
            for u in batch:
                try:
                    head, body = await asyncio.wait_for(read_answer(reader, method), 5)
                except (asyncio.IncompleteReadError, ConnectionError):
                    wrong.append(f"{u}: cut")
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    break
                got = marker_of(head)
                if got is not None and (got != u.encode() or (body and body != got)):
                    wrong.append(f"{u}: got {got!r}")
                elif got is None and not head.startswith((b"HTTP/1.1 502", b"HTTP/1.1 504")):
                    wrong.append(f"{u}: {head[:40]!r}")
            await asyncio.sleep(0.02)
        writer.close()
        return wrong

    results = await asyncio.gather(*(client(c) for c in range(6)))
    assert [w for r in results for w in r if "got" in w] == []
    if delay is not None and mode not in ("head-body", "204-length-body", "304-length-body", "304-chunked-body"):
        # (those four never reuse their connection: the answer announced a body it must not have)
        assert sent, "the no-task path was taken"


EQUAL_CONFIG = f"""\
realm: api
upstream: {{url: "{{raw}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}"}}
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email, roles: X-User-Roles}}
routes:
  - {{name: public, match: {{path_prefix: /public/}}, auth: none}}
  - {{name: optional, match: {{path_prefix: /maybe/}}, auth: {{provider: main, optional: true}}}}
  - name: report
    match: {{path_prefix: /report/}}
    auth: {{provider: main, mode: report, scopes: {{all_of: [nope]}}}}
  - name: sources
    match: {{path_prefix: /sources/}}
    auth: {{provider: main}}
    token_sources: [{{cookie: session}}, {{query: access_token}}]
  - name: fwd
    match: {{path_prefix: /fwd/}}
    auth: {{provider: main}}
    headers: {{claims: {{sub: X-User-Id}}, forward_token: true, payload: X-Jwt-Payload}}
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""


@bounded_by(30)
async def test_the_upstream_gets_the_same_bytes_with_and_without_a_task(
    sidecar: Any, raw_server: Any, rsa_key: TestKey
) -> None:
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await strays.read_request(reader)) is not None:
            heads.append(request[0])
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
            writer.write(head if request[0].startswith(b"HEAD ") else head + b"ok")

    server = await raw_server(upstream)
    s = await sidecar(EQUAL_CONFIG, raw=f"http://127.0.0.1:{server.port}")
    sent = await fast_pool(s)
    pool = s.runtime.pool
    send = pool.send
    token = mint({"email": "a@b.c", "roles": ["x", "y"]}, key=rsa_key)
    spoof = (
        "X-User-Id: evil\r\nx-user-email: evil@x\r\nX-Jwt-Payload: e30\r\nConnection: keep-alive, X-Keep\r\n"
        "X-Keep: 1\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
        "Te: trailers\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\n"
    )
    cases = [
        ("GET", "/public/a?b=c", f"Authorization: Bearer {token}\r\n{spoof}"),
        ("GET", "/maybe/a", spoof),
        ("GET", "/maybe/a", f"Authorization: Bearer {token}\r\n{spoof}"),
        ("GET", "/report/a", f"Authorization: Bearer {token}\r\n{spoof}"),
        ("GET", "/report/a", f"Authorization: Bearer {token}x\r\n{spoof}"),
        ("GET", f"/sources/a?x=1&access_token={token}&y=2", spoof),
        ("GET", "/sources/a?x=1", f"Cookie: a=1; session={token}; b=2\r\n{spoof}"),
        ("GET", "/fwd/a", f"Authorization: Bearer {token}\r\n{spoof}"),
        ("GET", "/api/a", f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n{spoof}"),
        ("HEAD", "/api/a", f"Authorization: Bearer {token}\r\n{spoof}"),
        ("DELETE", "/api/a", f"Authorization: Bearer {token}\r\n{spoof}"),
        ("OPTIONS", "/api/a", f"Authorization: Bearer {token}\r\n{spoof}"),
    ]
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    for index, (method, target, fields) in enumerate(cases):
        raw = f"{method} {target} HTTP/1.1\r\nHost: sidecar.test\r\nX-Request-Id: case-{index}\r\n{fields}\r\n".encode()
        got = []
        for with_task in (True, True, False):  # the first warms the token cache and the pool
            pool.send = (lambda *a, **k: None) if with_task else send  # type: ignore[method-assign]
            if not with_task:  # an idle pooled connection (a HEAD's is never reused)
                writer.write(b"GET /public/warm HTTP/1.1\r\nHost: x\r\n\r\n")
                await asyncio.wait_for(read_answer(reader, "GET"), 5)
            before, count = len(heads), len(sent)
            writer.write(raw)
            head, _ = await asyncio.wait_for(read_answer(reader, method), 5)
            assert head.startswith(b"HTTP/1.1 200 "), (index, head)
            assert len(heads) == before + 1
            got.append(heads[-1])
            if index != 4:  # (4: a token that fails verification is never cached: a task each time)
                assert len(sent) == count + (0 if with_task else 1), index
        assert got[1] == got[2], (index, got[1], got[2])
        assert b"evil" not in got[2], got[2]
    writer.close()


PUBLIC = f"""\
realm: api
upstream: {{url: "{{raw}}", timeout: 1s, connect_timeout: 1s}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - {{name: public, match: {{path_prefix: /}}, auth: none}}
"""


def answers_by_index(make: Any) -> Any:
    """An upstream that writes `make(index, head)` (a list of (delay, bytes)) for the index-th request it reads."""
    count = [0]

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await strays.read_request(reader)) is not None:
            count[0] += 1
            for delay, data in make(count[0], request[0]):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)

    return upstream


@pytest.mark.parametrize(
    "second",
    [
        [
            (0, b"HTTP/1.1 100 Continue\r\n\r\n"),
            (0.05, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"),
            (0.05, b"HTTP/1.1 200 OK\r\nX-Marker: two\r\nContent-Length: 3\r\n\r\ntwo"),
        ],
        [(0, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Marker: two\r\nContent-Length: 3\r\n\r\ntwo")],
        [(0, b"HTTP/1.1 200 OK\r\nX-Marker: two\r\nCont"), (0.05, b"ent-Length: 3\r\n\r\n"), (0.05, b"two")],
    ],
    ids=["interim-split", "interim-whole", "head-split"],
)
@bounded_by(20)
async def test_interim_and_split_answers_on_the_no_task_path(sidecar: Any, raw_server: Any, second: Any) -> None:
    def make(index: int, head: bytes) -> Any:
        if index == 1:
            return [(0, b"HTTP/1.1 200 OK\r\nX-Marker: one\r\nContent-Length: 3\r\n\r\none")]
        if index == 2:
            return second
        return [(0, b"HTTP/1.1 200 OK\r\nX-Marker: three\r\nContent-Length: 5\r\n\r\nthree")]

    server = await raw_server(answers_by_index(make))
    s = await sidecar(PUBLIC, raw=f"http://127.0.0.1:{server.port}")
    sent = await fast_pool(s)
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    got = []
    for path in ("/1", "/2", "/3"):
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, body = await asyncio.wait_for(read_answer(reader, "GET"), 5)
        got.append((head.split(b"\r\n")[0], marker_of(head), body))
    writer.close()
    assert got == [
        (b"HTTP/1.1 200 OK", b"one", b"one"),
        (b"HTTP/1.1 200 OK", b"two", b"two"),
        (b"HTTP/1.1 200 OK", b"three", b"three"),
    ]
    assert len(sent) == 2 and server.connections == 1


@pytest.mark.parametrize(
    ("method", "second"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nX-Marker: two\r\nContent-Length: 44\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nX-Marker: two\r\nContent-Length: 44\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nX-Marker: two\r\nContent-Length: 44\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nX-Marker: two\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
)
@bounded_by(20)
async def test_a_bodiless_answer_that_announces_a_body_ends_its_connection_on_the_no_task_path(
    sidecar: Any, raw_server: Any, method: str, second: bytes
) -> None:
    # The GET's 44-byte answer, sent late after the bodiless one: read as the next request's answer, it would be one.
    stray = b"HTTP/1.1 200 OK\r\nX-Marker: two\r\nContent-Length: 3\r\n\r\ntwo"
    assert len(stray) < 60

    def make(index: int, head: bytes) -> Any:
        if index == 1:
            return [(0, b"HTTP/1.1 200 OK\r\nX-Marker: one\r\nContent-Length: 3\r\n\r\none")]
        if index == 2:
            return [(0, second), (0.1, stray)]
        return [(0, b"HTTP/1.1 200 OK\r\nX-Marker: three\r\nContent-Length: 5\r\n\r\nthree")]

    server = await raw_server(answers_by_index(make))
    s = await sidecar(PUBLIC, raw=f"http://127.0.0.1:{server.port}")
    sent = await fast_pool(s)
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    got = []
    for path, verb in (("/1", "GET"), ("/2", method), ("/3", "GET")):
        writer.write(f"{verb} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, body = await asyncio.wait_for(read_answer(reader, verb), 5)
        got.append((marker_of(head), body))
    writer.close()
    assert got == [(b"one", b"one"), (b"two", b""), (b"three", b"three")]
    assert len(sent) == 1 and server.connections == 2


@bounded_by(20)
async def test_a_client_gone_mid_answer_on_the_no_task_path_drops_the_upstream(sidecar: Any, raw_server: Any) -> None:
    dropped = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await strays.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await strays.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        try:
            while True:
                await asyncio.sleep(0.05)
                writer.write(b"x" * 1000)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            dropped.set()
            raise

    server = await raw_server(upstream)
    s = await sidecar(PUBLIC, raw=f"http://127.0.0.1:{server.port}")
    sent = await fast_pool(s)
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(read_answer(reader, "GET"), 5)
    writer.write(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await reader.readexactly(500)
    writer.close()
    await asyncio.wait_for(dropped.wait(), 5)
    assert len(sent) == 1
    assert s.runtime.pool.idle_count() == 0
    await asyncio.sleep(0.1)
    assert s.runtime.metrics.in_flight == 0
