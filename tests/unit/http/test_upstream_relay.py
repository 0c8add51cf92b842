"""proxy.upstream's request bodies from a `BodySource` (the body passes itself on, as http1's
`Request.relay_body` does through forward.py), against hand-written loopback servers: the
same wire, limits and failures as a body the sending task iterates."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.http.upstream import BodySource, Pool, UpstreamError
from tests.support.raw import bounded_by, eventually
from tests.unit.http.test_upstream import OK, MiB, answering, body_of, read_request

bounded = bounded_by(10.0)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool(probation=0)
    yield pool
    await pool.close()


class Pieces(BodySource):
    """Hands `pieces` to the sink one loop turn apart; awaits `drain` whenever it says full."""

    def __init__(self, *pieces: bytes, pause: float = 0.0, fail: BaseException | None = None) -> None:
        self.pieces = pieces
        self.pause = pause
        self.fail = fail
        self.passed = 0
        self.drains = 0

    def relay(
        self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[bool]], target: object = None
    ) -> Awaitable[bool]:
        return self._relay(sink, drain)

    async def _relay(self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[bool]]) -> bool:
        for piece in self.pieces:
            await asyncio.sleep(self.pause)
            self.passed += 1
            if sink(piece):
                self.drains += 1
                if not await drain():
                    return False
        if self.fail is not None:
            raise self.fail
        return True


async def post(pool: Pool, port: int, body: BodySource, *, length: int | None = None, timeout: float = 5.0) -> Any:
    return await pool.request(
        "POST",
        "http",
        "127.0.0.1",
        port,
        "/up",
        [("Host", "x")],
        body,
        content_length=length,
        connect_timeout=5.0,
        read_timeout=timeout,
    )


def recording(seen: list[bytes]) -> Any:
    """Keeps each request's bytes as they came (up to its body's end), answers OK to each."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        data = bytearray()
        while more := await reader.read(65536):
            data += more
            if data.endswith((b"0\r\n\r\n", b"abcdefghij")):
                seen.append(bytes(data))
                data.clear()
                writer.write(OK)

    return handler


@bounded
async def test_a_relayed_body_goes_out_with_content_length_or_chunked_as_given(pool: Pool, raw_server: Any) -> None:
    seen: list[bytes] = []
    server = await raw_server(recording(seen))
    response = await post(pool, server.port, Pieces(b"abcde", b"", b"fghij"), length=10)
    assert (response.status, await body_of(response)) == (200, b"ok")
    response.release()
    assert seen[0].endswith(b"\r\nContent-Length: 10\r\n\r\nabcdefghij"), seen

    response = await post(pool, server.port, Pieces(b"first", b"", b"second"))
    assert (response.status, await body_of(response)) == (200, b"ok")
    response.release()
    # (An empty piece would end a chunked body early: it is not sent.)
    assert seen[1].endswith(b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"), seen


@bounded
async def test_a_relayed_body_longer_than_its_length_is_never_sent_past_it(pool: Pool, raw_server: Any) -> None:
    rest = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        request = await read_request(reader)
        assert request is not None and request[1] == b"abc"
        rest.append(await reader.read())  # what followed the declared body: must be nothing

    server = await raw_server(handler)
    with pytest.raises(UpstreamError, match="longer"):
        await post(pool, server.port, Pieces(b"abc", b"GET /smuggled HTTP/1.1\r\n\r\n"), length=3)
    await eventually(lambda: server.closed == 1)
    assert rest == [b""]


@bounded
async def test_a_relayed_body_shorter_than_its_length_fails(pool: Pool, raw_server: Any) -> None:
    server = await raw_server(answering(OK))
    with pytest.raises(UpstreamError, match="ended after 3 of 10"):
        await post(pool, server.port, Pieces(b"abc"), length=10)
    assert pool.idle_count() == 0


@bounded
async def test_a_relayed_upload_stops_when_the_upstream_answers_and_closes(pool: Pool, raw_server: Any) -> None:
    async def refuses(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(TimeoutError):  # linger, reading, so the close is a FIN, not a reset
            async with asyncio.timeout(1.0):
                while await reader.read(65536):
                    pass

    server = await raw_server(refuses)
    body = Pieces(*[b"x" * 1024] * 200, pause=0.01)
    response = await post(pool, server.port, body, length=200 * 1024)
    assert (response.status, await body_of(response)) == (413, b"")
    response.release()
    assert body.passed < 100 and body.drains == 1  # stopped well before the body's end
    assert pool.idle_count() == 0


@bounded
async def test_a_relayed_upload_to_an_upstream_that_never_reads_times_out(pool: Pool, raw_server: Any) -> None:
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await asyncio.sleep(10)

    body = Pieces(*[b"x" * 65536] * 1024)  # 64 MiB
    with pytest.raises(TimeoutError):
        await post(pool, (await raw_server(deaf)).port, body, timeout=0.3)
    assert body.drains > 0 and body.passed * 65536 < 16 * MiB  # the drain wait timed out


@bounded
async def test_a_failing_relayed_body_propagates_unchanged(pool: Pool, raw_server: Any) -> None:
    class ClientWentAway(Exception):
        pass

    server = await raw_server(answering(OK))
    with pytest.raises(ClientWentAway):
        await post(pool, server.port, Pieces(b"start", fail=ClientWentAway()))
    await eventually(lambda: server.closed == 1)
    assert pool.idle_count() == 0


class Lingering(Pieces):
    """`Pieces`, then a while before the relay returns: its task resumes after the answer came."""

    async def _relay(self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[bool]]) -> bool:
        done = await super()._relay(sink, drain)
        await asyncio.sleep(0.2)
        return done


@bounded
async def test_an_answer_after_the_last_byte_but_before_the_relay_returns_keeps_the_connection(
    pool: Pool, raw_server: Any
) -> None:
    # The last piece went out from the client's read callback; the upstream answered before the
    # forwarding task ran again. That is an answer to a whole request: the connection is reused.
    seen: list[bytes] = []
    server = await raw_server(recording(seen))
    response = await post(pool, server.port, Lingering(b"abcde", b"fghij"), length=10)
    assert (response.status, await body_of(response)) == (200, b"ok")
    response.release()
    assert pool.idle_count() == 1


@bounded
async def test_an_answer_before_the_last_byte_does_not_keep_the_connection(pool: Pool, raw_server: Any) -> None:
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)  # keep-alive, but before the body came
        await reader.read()

    server = await raw_server(early)
    response = await post(pool, server.port, Pieces(b"abcde", b"fghij", pause=0.1), length=10)
    assert (response.status, await body_of(response)) == (200, b"ok")
    response.release()
    assert pool.idle_count() == 0
