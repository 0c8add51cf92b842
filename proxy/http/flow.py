"""Flow control for the wire code: a task waits on its peer, and a protocol callback wakes it.

Owns: `Wakeup`, the one way a task here waits for a protocol callback (body bytes came, the
answer arrived, the peer took what was written), one waiter at a time, at most a timeout;
`Deadlines`, one timer for the timeouts of many such waits (the upstream pool's);
and `WriteFlow`, one connection's write side under asyncio's flow control: the transport's
`pause_writing` and `resume_writing` recorded, `drain` waiting while its buffer is over the
high-water mark, and `end` releasing a waiting writer when there is no more point in
writing (the connection was lost, or the peer answered and is closing); `HELD`, what the
write buffers of paused transports hold, process-wide, which decides whether a body may be
read in large reads (`big_reads`); and `send`, a relayed write that leaves a transport
holding only what the peer has not taken (never the caller's buffer). The client-facing
server (http1.py), the upstream client (upstream.py) and forward.py's WebSocket tunnel all
wait through these.
Does not own: the marks (each protocol sets its transport's), when to pause or resume
reading (each protocol decides that from its own buffers), or what a timeout or a lost
connection means to the caller (a `TimeoutError` and a False from `drain` are all it says).

Why not `asyncio.Event` with `asyncio.wait_for`: `wait_for` makes a task per wait, and a
timeout raised into the waiter would hold, through its traceback, the frame that holds the
waiter, a reference cycle (with the connection in it) that only a full garbage collection
frees (tests/integration/test_memory.py runs with the collector off). A timeout here is a
result, and the future and its timer are let go on every way out of a wait.
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["HELD", "Deadlines", "Held", "Wakeup", "WriteFlow", "big_reads", "send"]

# A timer may run a hair before its time (uvloop counts in whole milliseconds): a wait due
# within this much of now has timed out, rather than the timer being set again for a
# fraction of a millisecond (`_TunnelLimits` in forward.py allows the same).
_EARLY = 0.001


def _expire(waiter: asyncio.Future[bool | None]) -> None:
    # True means the wait timed out: a result, not an exception set on the waiter (see above).
    if not waiter.done():
        waiter.set_result(True)


class Wakeup:
    """One task waits (`wait`) until a protocol callback calls `wake`, or a timeout passes.

    A wake with no one waiting is not remembered: the waiter looks at the state it waits on
    (bytes buffered, writing paused) before each wait, and again after it.
    """

    __slots__ = ("_deadlines", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines | None = None) -> None:
        """`deadlines`: the shared timer that times this one's waits out (None: a timer per wait)."""
        self._loop = loop
        self._waiter: asyncio.Future[bool | None] | None = None
        self._deadlines = deadlines

    @property
    def waiting(self) -> bool:
        """Whether a task waits now."""
        return self._waiter is not None

    def wake(self) -> None:
        """The task waiting, if any, goes on (at its next turn of the loop)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None = None) -> bool:
        """Until the next `wake`: False; or until `timeout` seconds have passed first: True.
        None: no limit. A cancelled wait raises `CancelledError` and leaves nothing behind."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        deadlines = self._deadlines
        timer = None
        if timeout is not None:
            if deadlines is None:
                timer = loop.call_later(timeout, _expire, waiter)
            else:
                deadlines.add(self, loop.time() + timeout)
        try:
            timed_out = await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            elif deadlines is not None:
                deadlines.waits.pop(self, None)
        return timed_out is True

    def arm(self, timeout: float | None) -> asyncio.Future[bool | None]:
        """`wait` in two halves, for a hot caller that awaits the future itself (no coroutine
        per wait): the future to await (its result True: timed out; `timeout` None: no
        limit), then `disarm` in a `finally`, whatever happened. Only with `deadlines`."""
        deadlines = self._deadlines
        assert deadlines is not None
        waiter = self._waiter = self._loop.create_future()
        if timeout is not None:
            deadlines.add(self, self._loop.time() + timeout)
        return waiter

    def extend(self, timeout: float) -> None:
        """The wait under way (begun by `arm`), if any, times out `timeout` seconds from now
        instead: progress was made that did not need the waiter woken."""
        if self._waiter is not None:
            deadlines = self._deadlines
            assert deadlines is not None
            deadlines.waits[self] = self._loop.time() + timeout

    def disarm(self) -> None:
        """The end of a wait begun by `arm`."""
        self._waiter = None
        deadlines = self._deadlines
        assert deadlines is not None
        deadlines.waits.pop(self, None)

    def _expire(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            _expire(waiter)


class Deadlines:
    """The timeouts of many `Wakeup`s on one timer, set for the soonest one due: a wait costs
    a dict entry rather than a timer of its own made and cancelled (bench/FIGURES.md, "The
    upstream client's per-answer work"). The timer runs, finds what is due, and is set
    again for the soonest of the rest; with one timeout for all, about once per timeout.
    """

    __slots__ = ("_loop", "_timer", "_when", "waits")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0
        self.waits: dict[Wakeup, float] = {}
        """Each waiting `Wakeup` and when its wait times out (loop time)."""

    def add(self, wakeup: Wakeup, due: float) -> None:
        """Time out `wakeup`'s wait at `due` (loop time); it takes itself off when the wait ends."""
        self.waits[wakeup] = due
        if self._timer is None or due < self._when:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._when = due
        self._timer = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time() + _EARLY
        waits = self.waits
        due_now = [wakeup for wakeup, due in waits.items() if due <= now]
        for wakeup in due_now:
            del waits[wakeup]
            wakeup._expire()
        if waits:
            self._arm(min(waits.values()))

    def close(self) -> None:
        """Cancel the timer (the waits left, if any, are then bounded by nothing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Held:
    """Bytes the write buffers of paused transports hold (counted when writing pauses, let go
    when it resumes or ends), process-wide (one event loop thread per process).

    A body relayed in large reads (fewer system calls per byte: bench/FIGURES.md, "Bodies:
    fewer, larger reads") leaves up to one read in the write buffer of a peer that does not
    take it; large reads are allowed only while this is under `limit`, so a thousand slow
    peers hold at most `limit` more than they would with small reads."""

    __slots__ = ("bytes", "limit")

    def __init__(self, limit: int) -> None:
        self.bytes = 0
        self.limit = limit


HELD = Held(8 * 1024 * 1024)


def big_reads() -> bool:
    """Whether a relayed body may be read in large reads now (`Held`)."""
    return HELD.bytes < HELD.limit


def send(transport: asyncio.Transport, fd: int, data: bytes | memoryview) -> None:
    """Write `data` (a relayed body's piece; a memoryview of a read buffer the caller reuses)
    to `transport`, whose socket is `fd` (-1: none to write to ourselves, such as TLS): when
    the transport holds nothing yet, written to the socket at once, and only what the socket
    did not take is handed to the transport, as bytes of its own. The transport then holds
    exactly what the peer has not taken (uvloop keeps the whole object of a partly sent
    write, and keeps a memoryview as it is: the caller's buffer) and `Held` counts it."""
    # (Not to a closing transport: its socket may be closed already, and its number another's.)
    if fd >= 0 and not transport.get_write_buffer_size() and not transport.is_closing():
        try:
            sent = os.write(fd, data)
        except OSError:
            sent = 0  # would block, or failed: the transport's own write says what happened
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data if type(data) is bytes else bytes(data))


class WriteFlow:
    """A connection's write side: whether asyncio has paused writing, and waiting until it resumes.

    The protocol's `pause_writing` and `resume_writing` call `pause` and `resume`; its
    `connection_lost` calls `end`, and so may anything else after which a writer must stop
    waiting for the peer to take bytes.
    """

    __slots__ = ("_held", "_wakeup", "ended", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines | None = None) -> None:
        """`deadlines`: the shared timer for `drain`'s timeouts (None: a timer per wait)."""
        self.paused = False
        """The transport's write buffer is over its high-water mark: a writer should wait (`drain`)."""
        self.ended = False
        """`end` was called: waiting for the peer to take bytes is pointless from now on."""
        self._wakeup = Wakeup(loop, deadlines)
        self._held = 0  # what `pause` counted in `HELD`

    def pause(self, held: int = 0) -> None:
        """asyncio's `pause_writing`: the transport's write buffer is over its high-water mark;
        `held`: the bytes it holds (its `get_write_buffer_size()`), counted in `HELD` until
        writing resumes or ends. Called again with what it holds after each write made while
        paused (a read's further pieces), the count follows."""
        self.paused = True
        HELD.bytes += held - self._held
        self._held = held

    def resume(self) -> None:
        """asyncio's `resume_writing`: the buffer is down to its low-water mark; a waiting writer goes on."""
        self.paused = False
        if self._held:
            HELD.bytes -= self._held
            self._held = 0
        self._wakeup.wake()

    def end(self) -> None:
        """No more waiting for the peer (the connection was lost, or the peer answered and is
        closing): a waiting writer returns now, and every later `drain` at once."""
        self.ended = True
        if self._held:
            HELD.bytes -= self._held
            self._held = 0
        self._wakeup.wake()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait while writing is paused: True when the writer may go on, False once `end` was called.

        Raises `TimeoutError` when the peer takes nothing for `timeout` seconds (None: no limit).
        """
        wakeup = self._wakeup
        while self.paused and not self.ended:
            if await wakeup.wait(timeout):
                raise TimeoutError(f"the peer took nothing for {timeout:g}s")
        return not self.ended
