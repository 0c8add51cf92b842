"""Flow control for the wire code: a task waits on its peer, and a protocol callback wakes it.

Owns: `Wakeup`, the one way a task here waits for a protocol callback (body bytes came, the
answer arrived, the peer took what was written), one waiter at a time, at most a timeout;
`Deadlines`, one timer for the timeouts of many such waits (the upstream pool's);
and `WriteFlow`, one connection's write side under asyncio's flow control: the transport's
`pause_writing` and `resume_writing` recorded, `drain` waiting while its buffer is over the
high-water mark, and `end` releasing a waiting writer when there is no more point in
writing (the connection was lost, or the peer answered and is closing). The client-facing
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

__all__ = ["Deadlines", "Wakeup", "WriteFlow"]

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


class WriteFlow:
    """A connection's write side: whether asyncio has paused writing, and waiting until it resumes.

    The protocol's `pause_writing` and `resume_writing` call `pause` and `resume`; its
    `connection_lost` calls `end`, and so may anything else after which a writer must stop
    waiting for the peer to take bytes.
    """

    __slots__ = ("_wakeup", "ended", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines | None = None) -> None:
        """`deadlines`: the shared timer for `drain`'s timeouts (None: a timer per wait)."""
        self.paused = False
        """The transport's write buffer is over its high-water mark: a writer should wait (`drain`)."""
        self.ended = False
        """`end` was called: waiting for the peer to take bytes is pointless from now on."""
        self._wakeup = Wakeup(loop, deadlines)

    def pause(self) -> None:
        """asyncio's `pause_writing`: the transport's write buffer is over its high-water mark."""
        self.paused = True

    def resume(self) -> None:
        """asyncio's `resume_writing`: the buffer is down to its low-water mark; a waiting writer goes on."""
        self.paused = False
        self._wakeup.wake()

    def end(self) -> None:
        """No more waiting for the peer (the connection was lost, or the peer answered and is
        closing): a waiting writer returns now, and every later `drain` at once."""
        self.ended = True
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
