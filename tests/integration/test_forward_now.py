"""A request with no body on an idle pooled upstream connection is forwarded with no task
(forward.py's `Answering`, upstream.py's `Pool.send`): its head is written from the handler and
its answer relayed, counted and logged from the upstream connection's read callback. What the
client and the upstream see, and every failure's answer, are those of the task path; what stops
being simple (a retry, an answer not whole with its head) goes on as a task."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.http.upstream import Pool
from tests.conftest import AUDIENCE, ISSUER
from tests.integration.test_answer_splice_review import linger0
from tests.support.raw import RawServer, bounded_by, eventually

CONFIG = f"""\
realm: api
upstream: {{url: "{{raw}}", timeout: {{timeout}}, connect_timeout: 1s}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - {{name: public, match: {{path_prefix: /}}, auth: none}}
"""
ANSWER = b"HTTP/1.1 200 OK\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\nX-Up: %d\r\nContent-Length: %d\r\n\r\n%b"


def answer(n: int, body: bytes = b"ok") -> bytes:
    return ANSWER % (n, len(body), body)


async def start(sidecar: Any, raw_server: Any, upstream: Any, timeout: str = "2s") -> tuple[Any, RawServer, list[int]]:
    """A sidecar in front of the raw `upstream`, its pool reusing connections at once (no
    probation: the fast path is what is under test); and a list that grows by one for each
    request `Pool.send` took (forwarded with no task)."""
    server: RawServer = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{server.port}", timeout=timeout)
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
    return s, server, sent


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: sidecar.test\r\nX-Request-Id: rid-{path.strip('/')}\r\n\r\n".encode()


async def connect(s: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = s.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


def counts(s: Any) -> dict[str, int]:
    return {key[3]: n for key, n in s.runtime.metrics.route("public").totals().items()}  # (requests_total)


def serving(per_request: Callable[[int, int, bytes], Any]) -> Any:
    """A raw upstream that calls `per_request(connection, index on it, head)` for each request
    head and writes what it returns (bytes, or None: close without answering)."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        index = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            index += 1
            out = per_request(n, index, head)
            if asyncio.iscoroutine(out):
                out = await out
            if out is None:
                return
            writer.write(out)
            await writer.drain()

    return upstream


@bounded_by(20)
async def test_on_a_pooled_connection_both_sides_get_the_bytes_the_task_path_gives(
    sidecar: Any, raw_server: Any
) -> None:
    heads: list[bytes] = []

    def each(n: int, index: int, head: bytes) -> bytes:
        heads.append(head)
        return answer(1)

    s, server, sent = await start(sidecar, raw_server, serving(each))
    reader, writer = await connect(s)
    answers = []
    for _ in range(3):
        writer.write(request("/same"))
        answers.append(await read_answer(reader))
    writer.close()
    assert len(sent) == 2, "the first connected (a task); the next two went on the pooled connection"
    assert server.connections == 1
    assert answers[0] == answers[1] == answers[2]
    assert answers[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nX-Request-Id: rid-same\r\n" in answers[0]
    assert heads[0] == heads[1] == heads[2], "the same head upstream"
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    assert counts(s) == {"2xx": 3}


@bounded_by(20)
async def test_a_stale_pooled_connection_is_retried_once_and_only_for_an_idempotent_request(
    sidecar: Any, raw_server: Any
) -> None:
    # Each upstream connection answers its first request and closes on its second, unanswered.
    s, server, sent = await start(
        sidecar, raw_server, serving(lambda n, index, head: answer(n) if index == 1 else None)
    )
    reader, writer = await connect(s)
    writer.write(request("/one"))
    assert b"\r\nX-Up: 1\r\n" in await read_answer(reader)
    writer.write(request("/two"))  # on connection 1, which closes: sent again on a new one
    second = await read_answer(reader)
    assert second.startswith(b"HTTP/1.1 200 ") and b"\r\nX-Up: 2\r\n" in second
    writer.write(request("/three", "POST"))  # on connection 2, which closes: a POST is not replayed
    third = await read_answer(reader)
    writer.close()
    assert third.startswith(b"HTTP/1.1 502 ") and b"bad_gateway" in third
    assert len(sent) == 2 and server.connections == 2
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    assert counts(s) == {"2xx": 2, "5xx": 1}


@bounded_by(20)
async def test_a_pending_answer_is_cut_at_the_upstream_timeout_with_the_504(sidecar: Any, raw_server: Any) -> None:
    closed = asyncio.Event()

    async def each(n: int, index: int, head: bytes) -> bytes | None:
        if n == 1 and index == 2:
            await asyncio.sleep(30)  # never answers; the proxy's abort cancels this handler
        return answer(n)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        try:
            await serving(each)(reader, writer, n)
        finally:
            if n == 1:
                closed.set()

    s, server, sent = await start(sidecar, raw_server, upstream, timeout="0.5s")
    reader, writer = await connect(s)
    writer.write(request("/one"))
    assert (await read_answer(reader)).startswith(b"HTTP/1.1 200 ")
    began = asyncio.get_running_loop().time()
    writer.write(request("/two"))
    late = await read_answer(reader)
    took = asyncio.get_running_loop().time() - began
    assert late.startswith(b"HTTP/1.1 504 ") and b"\r\nX-Request-Id: rid-two\r\n" in late
    assert 0.45 <= took < 5
    assert len(sent) == 1
    writer.write(request("/three"))  # the timed-out connection is not reused
    assert b"\r\nX-Up: 2\r\n" in await read_answer(reader)
    writer.close()
    await server.stop()  # (cancels the stalled handler, if the abort has not ended it yet)
    assert closed.is_set()
    assert counts(s) == {"2xx": 2, "5xx": 1}


@bounded_by(20)
async def test_a_client_gone_while_its_answer_is_pending_drops_the_upstream_connection(
    sidecar: Any, raw_server: Any
) -> None:
    asked = asyncio.Event()
    dropped = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(n))
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        assert await reader.read() == b""  # the proxy closed it: never reused, never answered
        dropped.set()

    s, _server, sent = await start(sidecar, raw_server, upstream)
    reader, writer = await connect(s)
    writer.write(request("/one"))
    assert (await read_answer(reader)).startswith(b"HTTP/1.1 200 ")
    writer.write(request("/two"))
    await asyncio.wait_for(asked.wait(), 5)
    # Gone with a reset: a FIN alone may be a half-close, whose request is still answered
    # (test_connection_close.py).
    linger0(writer)
    writer.close()
    await asyncio.wait_for(dropped.wait(), 5)
    assert len(sent) == 1
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    assert counts(s) == {"2xx": 1, "4xx": 1}, "the first, then a 499"
    assert s.runtime.pool.idle_count() == 0


@bounded_by(20)
async def test_an_answer_not_whole_with_its_head_is_finished_by_a_task(sidecar: Any, raw_server: Any) -> None:
    async def each(n: int, index: int, head: bytes) -> bytes:
        if index == 1:
            return answer(n)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhal"

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        index = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            index += 1
            writer.write(await each(n, index, head))
            await writer.drain()
            if index > 1:
                await asyncio.sleep(0.1)
                writer.write(b"ves")

    s, server, sent = await start(sidecar, raw_server, upstream)
    reader, writer = await connect(s)
    writer.write(request("/one"))
    assert (await read_answer(reader)).startswith(b"HTTP/1.1 200 ")
    writer.write(request("/two"))
    assert (await read_answer(reader)).endswith(b"\r\n\r\nhalves")
    writer.write(request("/three"))
    assert (await read_answer(reader)).endswith(b"\r\n\r\nhalves"), "and the connection was reused"
    writer.close()
    assert len(sent) == 2 and server.connections == 1
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    assert counts(s) == {"2xx": 3}


@bounded_by(20)
async def test_pipelined_requests_are_answered_in_their_order(sidecar: Any, raw_server: Any) -> None:
    def each(n: int, index: int, head: bytes) -> bytes:
        return answer(n, head.split(b" ")[1])

    s, server, sent = await start(sidecar, raw_server, serving(each))
    reader, writer = await connect(s)
    writer.write(request("/warm"))
    assert (await read_answer(reader)).endswith(b"/warm")
    writer.write(b"".join(request(f"/p{i}") for i in range(5)))
    bodies = [(await read_answer(reader)).split(b"\r\n\r\n")[1] for _ in range(5)]
    writer.close()
    assert bodies == [f"/p{i}".encode() for i in range(5)]
    assert len(sent) == 5 and server.connections == 1
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    assert counts(s) == {"2xx": 6}
