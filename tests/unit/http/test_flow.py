"""flow.Wakeup and flow.WriteFlow: how the wire code waits on its peer.

First through their own calls, where each outcome can be arranged exactly (a resume, a lost
connection, a timeout, a cancellation, a wake and a timeout in the same turn of the loop);
then on a real loopback connection, where asyncio's own `pause_writing`, `resume_writing`
and `connection_lost` drive them. Every way out of a wait must let go of its future and
timer: a connection waits thousands of times, and with the collector off (as
tests/integration/test_memory.py runs the proxy) nothing may be left for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from proxy.http.flow import HELD, Deadlines, Wakeup, WriteFlow, big_reads, send
from tests.support.raw import bounded_by

LONG = 30.0  # a timeout no passing test reaches, and that ends a failing one (a lost wake)


async def turns(n: int = 3) -> None:
    """Let the loop run a few times: whatever was woken has run by then."""
    for _ in range(n):
        await asyncio.sleep(0)


def futures() -> int:
    """Plain futures alive (not tasks), reachable or not: garbage counts too. (asyncio itself
    keeps the last cancelled one, with the error it raised: compare after a first round.)"""
    return sum(1 for o in gc.get_objects() if type(o) is asyncio.Future)


@contextmanager
def no_collection() -> Iterator[None]:
    """Only reference counting frees what is made inside: a cycle would stay, and be counted."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# Wakeup


@bounded_by(20)
async def test_a_wait_ends_at_the_wake_not_before() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(wakeup.wait(LONG))
    await turns()
    assert not waiting.done() and wakeup.waiting
    wakeup.wake()
    assert await waiting is False
    assert not wakeup.waiting


@bounded_by(20)
async def test_a_wait_that_times_out_says_so() -> None:
    loop = asyncio.get_running_loop()
    wakeup = Wakeup(loop)
    began = loop.time()
    assert await wakeup.wait(0.05) is True
    assert loop.time() - began >= 0.04  # the loop's clock may round a hair early
    assert not wakeup.waiting


@bounded_by(20)
async def test_a_wake_with_no_one_waiting_is_not_kept_for_the_next_wait() -> None:
    # The waiter looks at its own state before it waits: a stored wake would end a wait for
    # something that has not happened.
    wakeup = Wakeup(asyncio.get_running_loop())
    wakeup.wake()
    assert await wakeup.wait(0.05) is True


@bounded_by(20)
async def test_a_wait_with_no_timeout_waits_for_the_wake() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(wakeup.wait())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    wakeup.wake()
    assert await waiting is False


@bounded_by(20)
async def test_a_wake_and_a_timeout_in_the_same_turn_the_first_counts_and_nothing_raises() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(wakeup.wait(0))
    await asyncio.sleep(0)  # the wait began: its timer is due at the next turn
    wakeup.wake()  # before the timer runs: the wake came first
    wakeup.wake()  # twice is harmless
    assert await waiting is False
    # The other way round: the timer runs first, the wake in the same turn right after it.
    waiting = asyncio.ensure_future(wakeup.wait(0))
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0, wakeup.wake)
    assert await waiting is True


@bounded_by(20)
async def test_a_cancelled_wait_raises_and_the_next_one_works() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(wakeup.wait(LONG))
    await turns()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not wakeup.waiting
    wakeup.wake()  # a late callback finds no one, and no error
    again = asyncio.ensure_future(wakeup.wait(LONG))
    await turns()
    wakeup.wake()
    assert await again is False


@bounded_by(20)
async def test_no_way_out_of_a_wait_leaves_its_future_or_timer_behind() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())

    async def every_way_out() -> None:
        woken = asyncio.ensure_future(wakeup.wait(LONG))  # its timer must be cancelled, not left for an hour
        await asyncio.sleep(0)
        wakeup.wake()
        assert await woken is False
        assert await wakeup.wait(0) is True
        cancelled = asyncio.ensure_future(wakeup.wait(LONG))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not wakeup.waiting

    with no_collection():
        await every_way_out()
        before = futures()
        for _ in range(200):
            await every_way_out()
        assert futures() == before


# Deadlines: one timer for the timeouts of many waits


@bounded_by(10)
async def test_waits_on_one_shared_timer_each_time_out_at_their_own_time() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    short, long, woken = (Wakeup(loop, deadlines) for _ in range(3))
    began = loop.time()
    waits = [asyncio.ensure_future(w.wait(t)) for w, t in ((long, 0.4), (short, 0.1), (woken, 0.2))]
    await turns()
    woken.wake()
    assert await waits[2] is False, "woken before its time: not timed out"
    assert await waits[1] is True and loop.time() - began < 0.35, "the shorter one is not held by the longer"
    assert await waits[0] is True and loop.time() - began >= 0.39
    assert deadlines.waits == {}, "no way out of a wait leaves it behind"
    deadlines.close()


@bounded_by(10)
async def test_an_armed_wait_extended_times_out_that_long_after_the_extension() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    wakeup = Wakeup(loop, deadlines)
    began = loop.time()
    waiter = wakeup.arm(0.2)
    for _ in range(3):
        await asyncio.sleep(0.1)
        wakeup.extend(0.2)  # progress that did not need the waiter woken
    try:
        assert await waiter is True
    finally:
        wakeup.disarm()
    assert loop.time() - began >= 0.49, "timed out 0.2 s after the last extension, not after the first 0.2 s"
    assert deadlines.waits == {}
    deadlines.close()


# WriteFlow


@bounded_by(20)
async def test_a_writer_goes_on_at_once_when_writing_is_not_paused() -> None:
    flow = WriteFlow(asyncio.get_running_loop())
    with no_collection():
        before = futures()
        assert await flow.drain(LONG) is True
        assert futures() == before  # not even a future was made


@bounded_by(20)
async def test_a_paused_writer_waits_until_resume() -> None:
    flow = WriteFlow(asyncio.get_running_loop())
    flow.pause()
    writer = asyncio.ensure_future(flow.drain(LONG))
    await turns()
    assert not writer.done()
    flow.resume()
    assert await writer is True
    assert not flow.paused


@bounded_by(20)
async def test_a_resume_undone_before_the_writer_runs_keeps_it_waiting() -> None:
    # Paused again by the time the writer looks: it must not write into a full buffer.
    flow = WriteFlow(asyncio.get_running_loop())
    flow.pause()
    writer = asyncio.ensure_future(flow.drain(LONG))
    await turns()
    flow.resume()
    flow.pause()
    await turns()
    assert not writer.done()
    flow.resume()
    assert await writer is True


@bounded_by(20)
async def test_the_end_releases_a_waiting_writer_with_false_and_every_later_one_at_once() -> None:
    flow = WriteFlow(asyncio.get_running_loop())
    flow.pause()
    writer = asyncio.ensure_future(flow.drain(LONG))
    await turns()
    flow.end()
    assert await writer is False
    assert await flow.drain(LONG) is False  # still paused: no wait all the same
    flow.resume()
    assert await flow.drain(LONG) is False  # resumed: the connection is still over


@bounded_by(20)
async def test_a_writer_the_peer_never_drains_for_gets_a_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    flow = WriteFlow(loop)
    flow.pause()
    began = loop.time()
    with pytest.raises(TimeoutError):
        await flow.drain(0.05)
    assert loop.time() - began >= 0.04
    # The flow is not broken by it: a resume lets the next writer through.
    flow.resume()
    assert await flow.drain(0.05) is True


@bounded_by(20)
async def test_a_cancelled_writer_leaves_the_flow_as_it_was() -> None:
    flow = WriteFlow(asyncio.get_running_loop())
    flow.pause()
    writer = asyncio.ensure_future(flow.drain(LONG))
    await turns()
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert flow.paused  # cancelling a writer does not pretend the peer drained
    flow.resume()
    assert await flow.drain(LONG) is True


@bounded_by(20)
async def test_no_way_out_of_a_drain_leaves_its_future_or_timer_behind() -> None:
    async def every_way_out() -> None:
        flow = WriteFlow(asyncio.get_running_loop())
        for ending in ("resume", "cancel", "timeout", "end"):
            flow.pause()
            writer = asyncio.ensure_future(flow.drain(0.001 if ending == "timeout" else LONG))
            await asyncio.sleep(0)
            if ending == "resume":
                flow.resume()
            elif ending == "end":
                flow.end()
            elif ending == "cancel":
                writer.cancel()
            try:
                await writer
            except (TimeoutError, asyncio.CancelledError):
                pass

    with no_collection():
        await every_way_out()
        before = futures()
        for _ in range(100):
            await every_way_out()
        assert futures() == before


# On a real connection: asyncio calls the protocol, the protocol tells the flow.


class Writer(asyncio.Protocol):
    """A protocol that writes what it is given and waits through a `WriteFlow`, as ours do."""

    def __init__(self) -> None:
        self.flow = WriteFlow(asyncio.get_running_loop())
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(16 * 1024)

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.end()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    """A listening socket whose accepted side the test reads from, or not, by hand."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        yield listener
    finally:
        listener.close()


async def connected(listener: socket.socket) -> tuple[Writer, socket.socket]:
    loop = asyncio.get_running_loop()
    _, writer = await loop.create_connection(Writer, *listener.getsockname())
    accepted, _ = listener.accept()
    accepted.setblocking(False)
    return writer, accepted


async def fill(writer: Writer) -> int:
    """Write until asyncio pauses writing (the peer reads nothing): the bytes written."""
    assert writer.transport is not None
    block = b"w" * 65536
    written = 0
    for _ in range(2000):  # the kernel's buffers hold a few MiB at most
        if writer.flow.paused:
            return written
        writer.transport.write(block)
        written += len(block)
        await asyncio.sleep(0)
    raise AssertionError(f"writing never paused after {written} bytes")


@bounded_by(20)
async def test_a_writer_waits_while_the_peer_does_not_read_and_goes_on_once_it_does(peer: socket.socket) -> None:
    writer, accepted = await connected(peer)
    try:
        written = await fill(writer)
        draining = asyncio.ensure_future(writer.flow.drain(10))
        await asyncio.sleep(0.1)
        assert not draining.done()
        read = 0
        async with asyncio.timeout(10):
            while not draining.done():
                try:
                    read += len(accepted.recv(1 << 20))
                except BlockingIOError:
                    await asyncio.sleep(0.001)
        assert await draining is True
        assert read <= written
    finally:
        accepted.close()
        assert writer.transport is not None
        writer.transport.abort()


@bounded_by(20)
async def test_a_writer_waiting_on_a_peer_that_goes_away_is_released_with_false(peer: socket.socket) -> None:
    writer, accepted = await connected(peer)
    await fill(writer)
    draining = asyncio.ensure_future(writer.flow.drain(10))
    await asyncio.sleep(0.05)
    assert not draining.done()
    # Unread bytes and a close: the kernel resets the connection, asyncio calls connection_lost.
    accepted.close()
    async with asyncio.timeout(10):
        assert await draining is False
    assert writer.flow.ended


# --- what a relayed write leaves the transport holding (`send`), and `Held` ------------------


async def read_exactly(sock: socket.socket, count: int) -> bytes:
    got = bytearray()
    async with asyncio.timeout(10):
        while len(got) < count:
            try:
                more = sock.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            assert more, f"the peer closed after {len(got)} of {count} bytes"
            got += more
    return bytes(got)


async def sends_only_what_the_peer_did_not_take(listener: socket.socket) -> None:
    writer, accepted = await connected(listener)
    transport = writer.transport
    assert transport is not None
    fd = transport.get_extra_info("socket").fileno()
    size = 8 * 1024 * 1024  # more than the kernel's buffers take from a peer that reads nothing
    buffer = bytearray(b"a" * size)
    try:
        send(transport, fd, memoryview(buffer))
        held = transport.get_write_buffer_size()
        assert 0 < held < size  # the socket took some at once; the transport holds the rest
        # The caller reuses its buffer at once (the next read lands in it): what the peer
        # gets is what was sent, so the transport kept a copy, not the caller's buffer.
        buffer[:] = b"z" * size
        second = bytearray(b"b" * 1000)
        send(transport, fd, memoryview(second))  # the transport holds bytes already: all of it copied, after them
        second[:] = b"y" * 1000
        assert transport.get_write_buffer_size() == held + 1000
        assert await read_exactly(accepted, size + 1000) == b"a" * size + b"b" * 1000
    finally:
        accepted.close()
        transport.abort()


@bounded_by(20)
async def test_send_leaves_the_transport_only_what_the_peer_did_not_take(peer: socket.socket) -> None:
    await sends_only_what_the_peer_did_not_take(peer)


@bounded_by(20)
async def test_send_leaves_a_uvloop_transport_only_what_the_peer_did_not_take(peer: socket.socket) -> None:
    # uvloop keeps a memoryview it is given as it is (the caller's buffer), and the whole
    # object of a partly sent write: the sidecar runs on it (its own loop, in a thread).
    uvloop = pytest.importorskip("uvloop")

    def on_uvloop() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(sends_only_what_the_peer_did_not_take(peer))

    await asyncio.to_thread(on_uvloop)


@bounded_by(20)
async def test_send_never_writes_to_the_socket_of_a_closing_transport(peer: socket.socket) -> None:
    # Once closing, the transport's socket may be closed already and its number another's:
    # here another descriptor (a pipe) stands for that other connection.
    writer, accepted = await connected(peer)
    transport = writer.transport
    assert transport is not None
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        transport.close()
        assert transport.is_closing()
        with contextlib.suppress(RuntimeError):  # (what the transport does with a late write is its own affair)
            send(transport, write_end, b"late")
        with pytest.raises(BlockingIOError):
            os.read(read_end, 100)
    finally:
        accepted.close()
        os.close(read_end)
        os.close(write_end)


async def test_held_counts_what_paused_writers_hold_until_they_resume_or_end() -> None:
    loop = asyncio.get_running_loop()
    before = HELD.bytes
    first, second = WriteFlow(loop), WriteFlow(loop)
    first.pause(1000)
    second.pause(500)
    assert HELD.bytes == before + 1500
    first.pause(1800)  # written to while paused: the count follows what it holds
    assert HELD.bytes == before + 2300
    first.resume()
    assert HELD.bytes == before + 500
    second.end()
    second.end()
    first.resume()
    assert HELD.bytes == before
    first.pause()  # nothing said about what it holds: nothing counted
    first.end()
    assert HELD.bytes == before


async def test_large_reads_are_allowed_only_while_paused_writers_hold_less_than_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(HELD, "limit", HELD.bytes + 1000)
    assert big_reads()
    flow = WriteFlow(asyncio.get_running_loop())
    flow.pause(1000)
    try:
        assert not big_reads()
    finally:
        flow.resume()
    assert big_reads()
