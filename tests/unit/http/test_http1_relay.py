"""proxy.http1's `Request.relay_body`: a request body passed on from the connection's read
callback, against real loopback sockets (the handlers are test fixtures; nothing is mocked).

The sink records what it is given and whether it ran inside a task: pieces that arrive while
the relay runs are passed on by the read callback itself, not by the handler's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.http.flow import HELD
from proxy.http.http1 import BodyError, BodyTimeout, BodyTooLarge, Request
from tests.support.raw import bounded_by
from tests.unit.http.test_http1 import Harness, KiB, assert_silent, read_answer, request_bytes, rest

bounded = bounded_by(5.0)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


class Sink:
    """A relay's sink: keeps each piece, and whether a task (not a read callback) passed it."""

    def __init__(self, *, full_after: int | None = None) -> None:
        self.pieces: list[bytes] = []
        self.in_task: list[bool] = []
        self.full_after = full_after  # say "full" once this many bytes came (None: never)
        self.drains = 0

    def __call__(self, data: bytes | memoryview) -> bool:
        self.pieces.append(bytes(data))  # (a view of the read buffer is valid during the call only)
        self.in_task.append(asyncio.current_task() is not None)
        return self.full_after is not None and len(self.body) >= self.full_after

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)

    async def drain(self) -> bool:
        self.drains += 1
        return True


def relaying(sink: Sink, outcome: list[Any], **kwargs: Any) -> Any:
    """A handler that relays the body to `sink` and answers with what `relay_body` did."""

    async def handler(request: Request) -> None:
        try:
            outcome.append(await request.relay_body(sink, sink.drain, **kwargs))
        except BodyError as error:
            outcome.append(error)
            request.respond(400, None, [], type(error).__name__.encode())
            return
        request.respond(200, None, [], b"%d" % len(sink.body))

    return handler


@bounded
async def test_a_body_is_passed_on_by_the_read_callback_as_it_comes(harness: Harness) -> None:
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome))
    reader, writer = await harness.connect(server)
    body = bytes(range(256)) * 256  # 64 KiB
    writer.write(request_bytes("/cl", method="PUT", headers=(("Content-Length", str(len(body))),)))
    for at in range(0, len(body), 8 * KiB):
        await asyncio.sleep(0.01)
        writer.write(body[at : at + 8 * KiB])
    answer = await read_answer(reader)
    assert (answer.status, answer.body, outcome) == (200, b"65536", [True])
    assert sink.body == body and len(sink.pieces) >= 2
    # Whatever came before the relay began was passed on by the handler; the rest, by the
    # read callback, with no task woken for it.
    assert not any(sink.in_task[1:]), sink.in_task
    # The connection carries on after a relayed body.
    writer.write(request_bytes("/next", method="POST", body=b"again"))
    assert (await read_answer(reader)).body == b"%d" % (len(body) + 5)  # (one sink for both)
    assert sink.body == body + b"again" and outcome == [True, True]


@bounded
async def test_a_chunked_bodys_small_pieces_of_one_read_leave_together(harness: Harness) -> None:
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome))
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/te", method="POST", headers=(("Transfer-Encoding", "chunked"),)))
    await asyncio.sleep(0.05)  # the relay has begun: what follows comes through the read callback
    small = [bytes([65 + i % 26]) * 10 for i in range(100)]
    writer.write(b"".join(b"%x;ext=1\r\n%b\r\n" % (len(piece), piece) for piece in small))
    await asyncio.sleep(0.05)
    writer.write(b"5\r\nlast.\r\n0\r\nX-Trailer: no\r\n\r\n")
    answer = await read_answer(reader)
    assert answer.status == 200 and outcome == [True]
    assert sink.pieces == [b"".join(small), b"last."], [len(p) for p in sink.pieces]


@bounded
async def test_a_pipelined_requests_body_is_not_the_relays(harness: Harness) -> None:
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome))
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/a", method="POST", headers=(("Content-Length", "10"),)))
    await asyncio.sleep(0.05)
    # One read: the end of the first body and all of a second request.
    writer.write(b"0123456789" + request_bytes("/b", method="POST", body=b"second"))
    first, second = await read_answer(reader), await read_answer(reader)
    assert (first.body, second.body) == (b"10", b"16")
    assert sink.pieces[0] == b"0123456789" and sink.body == b"0123456789second"
    assert outcome == [True, True]


@bounded
async def test_a_body_over_the_limit_stops_before_the_bytes_past_it(harness: Harness) -> None:
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome, limit=10 * KiB))
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/te", method="POST", headers=(("Transfer-Encoding", "chunked"),)))
    for _ in range(4):
        await asyncio.sleep(0.03)
        writer.write(b"%x\r\n%b\r\n" % (4 * KiB, b"z" * 4 * KiB))
    answer = await read_answer(reader)
    assert answer.status == 400 and answer.body == b"BodyTooLarge"
    assert isinstance(outcome[0], BodyTooLarge)
    assert sink.body == b"z" * 8 * KiB  # the piece that crossed the limit went nowhere
    assert answer.headers.getall("Connection") == ["close"]


@bounded
async def test_a_full_sink_stops_the_reading_until_drained(harness: Harness) -> None:
    events: list[str] = []
    sink = Sink(full_after=1)

    def noting(data: bytes | memoryview) -> bool:
        events.append("piece")
        return sink(data)

    async def slow_drain() -> bool:
        events.append("drain")
        await asyncio.sleep(0.2)
        events.append("drained")
        sink.full_after = None  # it keeps up from now on
        return True

    outcome: list[Any] = []

    async def handler(request: Request) -> None:
        outcome.append(await request.relay_body(noting, slow_drain))
        request.respond(200, None, [], sink.body)

    server = await harness.serve(handler)
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/cl", method="PUT", headers=(("Content-Length", "30"),)))
    for piece in (b"a" * 10, b"b" * 10, b"c" * 10):
        await asyncio.sleep(0.05)
        writer.write(piece)
    answer = await read_answer(reader)
    assert answer.body == b"a" * 10 + b"b" * 10 + b"c" * 10 and outcome == [True]
    # Nothing was read while the sink was full: the next pieces came after the drain.
    assert events[:3] == ["piece", "drain", "drained"], events


@bounded
async def test_a_drain_that_wants_no_more_ends_the_relay_with_the_rest_unread(harness: Harness) -> None:
    outcome: list[Any] = []
    got: list[bytes] = []

    def full(data: bytes | memoryview) -> bool:
        got.append(bytes(data))  # (a view of the read buffer is valid during the call only)
        return True

    async def gone() -> bool:
        return False  # the destination answered and is closing

    async def handler(request: Request) -> None:
        outcome.append(await request.relay_body(full, gone))
        request.respond(413, None, [], b"no more")

    server = await harness.serve(handler)
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/cl", method="PUT", headers=(("Content-Length", "100"),)))
    await asyncio.sleep(0.05)
    writer.write(b"0123456789")
    answer = await read_answer(reader)
    assert (answer.status, outcome, got) == (413, [False], [b"0123456789"])
    assert answer.headers.getall("Connection") == ["close"]  # the rest of the body is unread
    assert await rest(reader) == b""


@bounded
async def test_a_relayed_body_that_stalls_times_out(harness: Harness) -> None:
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome, timeout=0.2))
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/", method="POST", headers=(("Content-Length", "10"),)) + b"abc")
    began = time.monotonic()
    answer = await read_answer(reader)
    assert answer.status == 400 and answer.body == b"BodyTimeout"
    assert isinstance(outcome[0], BodyTimeout) and str(outcome[0]) == "no body bytes for 0.2s"
    assert 0.15 < time.monotonic() - began < 2.0
    assert sink.body == b"abc"


@bounded
async def test_bytes_that_keep_coming_move_the_relays_timeout(harness: Harness) -> None:
    # A byte every 0.1 s against a per-read timeout of 0.3 s: never idle that long, done in ~1 s.
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome, timeout=0.3))
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/", method="POST", headers=(("Content-Length", "10"),)))
    for _ in range(10):
        await asyncio.sleep(0.1)
        writer.write(b"x")
    answer = await read_answer(reader)
    assert (answer.status, outcome, sink.body) == (200, [True], b"x" * 10)


@bounded
async def test_a_trickled_relayed_body_times_out_at_its_deadline(harness: Harness) -> None:
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome, timeout=1.0, total=0.5))
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/", method="POST", headers=(("Content-Length", "100"),)))
    began = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                writer.write(b"x")
                await asyncio.sleep(0.1)

    trickling = asyncio.ensure_future(trickle())
    try:
        answer = await read_answer(reader, timeout=3.0)
    finally:
        trickling.cancel()
    assert answer.status == 400 and str(outcome[0]) == "the body was not all here after 0.5s"
    assert time.monotonic() - began < 1.5


@bounded
async def test_a_relayed_bodys_total_counts_only_the_waits_for_the_client(harness: Harness) -> None:
    # The destination is slow (0.8 s to drain after the first piece); the client is not. Only
    # the ~0.1 s spent waiting for the second piece counts against the 0.5 s.
    sink = Sink(full_after=1)

    async def slow_drain() -> bool:
        await asyncio.sleep(0.8)
        sink.full_after = None
        return True

    outcome: list[Any] = []

    async def handler(request: Request) -> None:
        outcome.append(await request.relay_body(sink, slow_drain, 1.0, total=0.5))
        request.respond(200, None, [], sink.body)

    server = await harness.serve(handler)
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/", method="POST", headers=(("Content-Length", "8"),)))
    await asyncio.sleep(0.05)
    writer.write(b"abcd")
    await asyncio.sleep(0.9)
    writer.write(b"efgh")
    answer = await read_answer(reader)
    assert (answer.status, answer.body, outcome) == (200, b"abcdefgh", [True])


@bounded
async def test_a_client_leaving_mid_body_fails_the_relay(harness: Harness) -> None:
    sink, outcome = Sink(), []
    stopped = asyncio.Event()

    async def handler(request: Request) -> None:
        try:
            await request.relay_body(sink, sink.drain)
        except (BodyError, asyncio.CancelledError) as error:
            outcome.append(type(error))
            stopped.set()
            raise

    server = await harness.serve(handler)
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/", method="POST", headers=(("Content-Length", "10"),)) + b"abc")
    await asyncio.sleep(0.05)
    writer.write_eof()
    await asyncio.wait_for(stopped.wait(), 2)
    assert sink.body == b"abc" and outcome
    assert await rest(reader) == b""


@bounded
async def test_bad_chunk_framing_mid_relay_fails_it_after_the_pieces_before(harness: Harness) -> None:
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome))
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/", method="POST", headers=(("Transfer-Encoding", "chunked"),)))
    await asyncio.sleep(0.05)
    writer.write(b"5\r\nhello\r\nzz\r\n")  # a good chunk, then not a chunk size, in one read
    answer = await read_answer(reader)
    assert answer.status == 400 and answer.body == b"BodyError" and sink.body == b"hello"
    assert answer.headers.getall("Connection") == ["close"]


@bounded
async def test_100_continue_is_sent_when_the_relay_begins(harness: Harness) -> None:
    gate = asyncio.Event()
    sink, outcome = Sink(), []
    relay = relaying(sink, outcome)

    async def handler(request: Request) -> None:
        await gate.wait()
        await relay(request)

    server = await harness.serve(handler)
    reader, writer = await harness.connect(server)
    writer.write(request_bytes("/up", method="PUT", headers=(("Content-Length", "5"), ("Expect", "100-continue"))))
    await assert_silent(reader, 0.2)  # not relaying yet: no invitation
    gate.set()
    interim = await read_answer(reader)
    assert interim.status == 100
    writer.write(b"hello")
    final = await read_answer(reader)
    assert (final.status, final.body, sink.body) == (200, b"5", b"hello")


@bounded
@pytest.mark.parametrize("over_the_limit", [False, True])
async def test_a_relayed_body_is_read_in_large_reads_only_while_paused_writers_hold_little(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, over_the_limit: bool
) -> None:
    # Large reads (fewer system calls per byte) may leave one read in a slow upstream's
    # buffer: beyond flow.HELD's limit, a relayed body is read 32 KiB at a time again.
    if over_the_limit:
        monkeypatch.setattr(HELD, "limit", HELD.bytes)
    sink, outcome = Sink(), []
    server = await harness.serve(relaying(sink, outcome))
    reader, writer = await harness.connect(server)
    body = bytes(range(256)) * 8192  # 2 MiB
    writer.write(request_bytes("/cl", method="PUT", headers=(("Content-Length", str(len(body))),)))
    await asyncio.sleep(0.05)  # the relay has begun: each read is passed on as it comes
    writer.write(body)
    answer = await read_answer(reader)
    assert (answer.status, outcome, sink.body == body) == (200, [True], True)
    largest = max(map(len, sink.pieces))
    if over_the_limit:
        assert largest <= 32 * KiB, largest
    else:
        assert largest > 32 * KiB, [len(piece) for piece in sink.pieces]


@bounded
async def test_bytes_after_an_upgrade_pipelined_behind_a_relayed_body_survive_the_next_reads(harness: Harness) -> None:
    # A relayed body's read is parsed from the server's one read buffer (no copy): what is
    # kept of it (here the bytes after an upgrade request's head) must be a copy, for the
    # next read, on this connection or another, lands in the same buffer.
    async def handler(request: Request) -> None:
        if request.upgrade:
            inbox: asyncio.Queue[bytes] = asyncio.Queue()

            async def source() -> AsyncIterator[bytes]:
                while (data := await inbox.get()) != b"bye":
                    yield data.upper()

            await request.tunnel(
                101, None, [("Upgrade", "shout"), ("Connection", "Upgrade")], inbox.put_nowait, source()
            )
            return
        pieces: list[bytes] = []

        def sink(data: bytes) -> bool:
            pieces.append(bytes(data))
            return False

        async def drain() -> bool:
            return True

        await request.relay_body(sink, drain)
        request.respond(200, None, [], b"%d" % len(b"".join(pieces)))

    server = await harness.serve(handler)
    reader, writer = await harness.connect(server)
    other_reader, other_writer = await harness.connect(server)
    writer.write(request_bytes("/a", method="POST", headers=(("Content-Length", "10"),)))
    other_body = b"\xff" * (2 * 1024 * KiB)
    other_writer.write(request_bytes("/b", method="POST", headers=(("Content-Length", str(len(other_body))),)))
    await asyncio.sleep(0.05)  # both relays have begun
    # One read: the end of the body, an upgrade request, and the first bytes after its head.
    writer.write(
        b"0123456789" + request_bytes("/ws", headers=(("Connection", "Upgrade"), ("Upgrade", "shout"))) + b"early"
    )
    other_writer.write(other_body)  # the other connection's reads land in the same buffer meanwhile
    assert (await read_answer(reader)).body == b"10"
    assert (await read_answer(other_reader)).body == b"%d" % len(other_body)
    assert (await read_answer(reader)).status == 101
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"EARLY"
    writer.write(b"bye")
