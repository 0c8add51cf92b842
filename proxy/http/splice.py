"""A relayed Content-Length body moved by splice(2): socket -> pipe -> socket, never copied to user space.

Owns: the pool of pipes (`PIPES`: at most `_CAP` pipes of `PIPE_SIZE`, made on demand, an empty
one kept for the next body, any other closed), and `Splice`, which moves the rest of one
Content-Length body (`left` bytes, never one more: each splice from the source asks for at most
what is left, so what follows the body stays in its socket) from a source socket through a pipe
into a sink socket, from loop callbacks, and tells its owner what moved. Both directions use it:
an upload (the client's socket into a plain-TCP upstream's) and an answer (a plain-TCP
upstream's socket into the client's).
Does not own: when a body may be spliced, what the bytes mean, limits and timeouts (for an
upload http1.py's `_Connection._try_splice`, `Request.relay_body`, and upstream.py's `_Upload`,
which counts it; for an answer upstream.py's `_Connection._try_splice`, `Response.relay`, and
http1.py's `Request`, the client's side of it).

Why: the kernel's two copies of a relayed body (`_copy_to_iter`, `_copy_from_iter`) are a quarter
of a relayed MiB's CPU; splicing takes both away (bench/FIGURES.md, "splice(2) for uploads: a
trial", "The upload spliced" and "The response spliced"), but only with a large pipe: a 64 KiB
pipe costs more than copying.

The sockets: uvloop refuses `add_reader`/`add_writer` on a transport's own fd, so the source's
transport has its reading paused (its fd is then not polled: the body stays in the socket) and
each socket is `os.dup`ed for the body's time only: the dups are what is registered with the loop
and what is spliced (a transport's fd number may be closed and reused; a dup's cannot while we
hold it). `close` unregisters and closes both dups at once: a dup keeps its socket open (a peer
would never see the FIN), so every way a splice ends, and the loss of either connection, closes it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Callable
from typing import Protocol

__all__ = ["ANSWER_MIN", "ENABLED", "PIPES", "PIPE_SIZE", "Pipes", "Splice", "Target", "begin"]

ENABLED = True
"""The one switch: False, and every body is copied (the tests run both ways)."""
PIPE_SIZE = 256 * 1024
"""A pipe's size: 8 splices a MiB (a 64 KiB pipe's 32 cost more than copying: bench/FIGURES.md)."""
ANSWER_MIN = 128 * 1024
"""The least an answer's body may have left for it to be spliced (smaller ones are copied):
bench/FIGURES.md, "The response spliced"."""
_CAP = 16
"""Most pipes a process holds: an unprivileged user's pipes may hold 64 MiB in all
(`pipe-user-pages-soft`; past it every new pipe of that user gets 8 KiB), shared by `workers: N`."""
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
_SIOCATMARK = 0x8905  # (Linux) whether a socket's next byte is the urgent mark
# A splice's failure that means the peer went away (the transport's own read will say how).
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN)
# One that means this kernel will not splice these sockets: no more splices in this process.
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _refused(error: OSError) -> None:
    global ENABLED
    if error.errno in _UNSUPPORTED:
        ENABLED = False


class Pipes:
    """Pipes of `size` bytes: at most `cap` exist at once; an empty one is kept for reuse."""

    __slots__ = ("_free", "cap", "open", "size")

    def __init__(self, cap: int = _CAP, size: int = PIPE_SIZE) -> None:
        self.cap = cap
        self.size = size
        self.open = 0  # pipes made and not closed (in use or free)
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int] | None:
        """A pipe (read end, write end) of `size` bytes, or None: the cap is reached, or the
        kernel would not make it that large (the caller copies the body instead)."""
        if self._free:
            return self._free.pop()
        if self.open >= self.cap or not _FLAGS:
            return None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
            if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) >= self.size:
                self.open += 1
                return r, w
        except OSError:
            pass  # EPERM past the user's pipe pages
        os.close(r)
        os.close(w)
        return None

    def give(self, pipe: tuple[int, int], empty: bool) -> None:
        """A pipe back: kept if `empty` (nothing of one body may reach another), else closed."""
        if empty and len(self._free) < self.cap:
            self._free.append(pipe)
            return
        self.open -= 1
        os.close(pipe[0])
        os.close(pipe[1])


PIPES = Pipes()


def _forget() -> None:
    """In a forked child (ops/workers.py forks `workers: N`): a new pool, the parent's free pipes
    closed, so that no pipe is ever shared by two processes' bodies."""
    global PIPES
    for r, w in PIPES._free:
        os.close(r)
        os.close(w)
    PIPES = Pipes(PIPES.cap, PIPES.size)


os.register_at_fork(after_in_child=_forget)


class Splice:
    """The rest of one body, `left` bytes, from `source_fd` to `sink_fd` (dup'd here): the
    client's socket to an upstream's (an upload), or an upstream's to the client's (an answer).

    `took(n)`: n bytes left the source's socket (into the pipe). `gave(n)`: n bytes went to the
    sink; returns True when nothing more may be sent (the splice stops, what the pipe holds
    is dropped). `blocked()`: the sink takes nothing for now; `gave` follows when it does.
    `ended(how)`: the splice is over, its fds closed: "done" (every byte went on), "source"
    (the source's socket is at its end or failed, or at urgent data: its transport's own read
    will say how; what the pipe held went on first), "sink" (the sink's peer went away: its
    transport's read or write will say how), "sink-error" (splicing into it failed otherwise:
    what the pipe holds is lost, the sink's connection must be aborted), "stopped" (`gave` said
    stop). Not called for `close`.
    A failure that says this kernel does not splice these sockets turns `ENABLED` off.
    """

    __slots__ = (
        "_blocked",
        "_full",
        "_in_pipe",
        "_loop",
        "_pipe",
        "_reading",
        "_sink",
        "_source",
        "_writing",
        "blocked",
        "ended",
        "gave",
        "left",
        "took",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source_fd: int,
        sink_fd: int,
        left: int,
        pipe: tuple[int, int],
        took: Callable[[int], None],
        gave: Callable[[int], bool],
        blocked: Callable[[], None],
        ended: Callable[[str], None],
    ) -> None:
        self._loop = loop
        self._pipe: tuple[int, int] | None = pipe
        self.left = left
        self._in_pipe = 0
        self.took = took
        self.gave = gave
        self.blocked = blocked
        self.ended = ended
        self._reading = self._writing = self._blocked = False
        # The pipe said EAGAIN while holding bytes: full. A pipe holds 64 buffers, one per
        # fragment of the socket's data, so it may be full long before `size` bytes (a real
        # network's ~1448-byte fragments: ~90 KiB). The source is not polled again until the
        # sink takes some (its dup is readable meanwhile: polled, it would spin the loop).
        self._full = False
        self._source = os.dup(source_fd)
        try:
            self._sink = os.dup(sink_fd)
        except OSError:
            os.close(self._source)
            raise

    def step(self, readable: bool = False) -> None:
        """Move what moves without blocking; then wait for the side that would block.
        `readable`: called as the source's dup's reader (the loop says it has bytes, or its end)."""
        pipe = self._pipe
        if pipe is None:
            return None  # closed (a callback of the same loop turn)
        r, w = pipe
        size = PIPES.size
        while True:
            moved = False
            left = self.left
            room = size - self._in_pipe
            if left and room and not self._full:
                woke, readable = readable, False  # (only the first splice after the loop said readable)
                try:
                    n = os.splice(self._source, w, left if left < room else room, flags=_FLAGS)
                except BlockingIOError:
                    # The socket has nothing, or the pipe is full: which, EAGAIN does not say.
                    # Holding bytes, it waits for the sink first (`_full`).
                    self._full = self._in_pipe > 0
                    if woke and not self._full and _at_mark(self._source):
                        # splice(2) stops at urgent data (EAGAIN, the socket still readable:
                        # polled, it would spin); recv(2) skips the urgent byte: the
                        # transport's reads go on with the body (the pipe is empty).
                        return self._end("source")
                except OSError as error:
                    _refused(error)
                    return self._end("source", flush=True)
                else:
                    if not n:
                        return self._end("source", flush=True)  # the source's end of stream
                    self.left = left - n
                    self._in_pipe += n
                    moved = True
                    self.took(n)
                    if self._pipe is None:
                        return None
            if self._in_pipe:
                try:
                    n = os.splice(r, self._sink, self._in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as error:
                    _refused(error)
                    return self._end("sink" if error.errno in _GONE else "sink-error")
                else:
                    self._in_pipe -= n
                    moved = True
                    self._blocked = self._full = False
                    if self.gave(n):
                        return self._end("stopped")
                    if self._pipe is None:
                        return None
            if not moved:
                break
        if not self.left and not self._in_pipe:
            return self._end("done")
        reading = bool(self.left) and self._in_pipe < size and not self._full
        writing = bool(self._in_pipe)
        loop = self._loop
        if reading != self._reading:
            self._reading = reading
            if reading:
                loop.add_reader(self._source, self.step, True)
            else:
                loop.remove_reader(self._source)
        if writing != self._writing:
            self._writing = writing
            if writing:
                loop.add_writer(self._sink, self.step)
            else:
                loop.remove_writer(self._sink)
        if writing and not self._blocked:
            self._blocked = True
            self.blocked()
        return None

    def _end(self, how: str, *, flush: bool = False) -> None:
        if flush and self._in_pipe and self._pipe is not None:
            # The source ended: what it sent before goes on, as a copy would have sent it.
            try:
                n = os.splice(self._pipe[0], self._sink, self._in_pipe, flags=_FLAGS)
            except OSError:
                pass
            else:
                self._in_pipe -= n
                self.gave(n)
        ended = self.ended
        self.close()
        ended(how)

    def close(self) -> None:
        """Unregister and close the dups, give the pipe back (kept only if empty). Idempotent."""
        pipe = self._pipe
        if pipe is None:
            return
        self._pipe = None
        loop = self._loop
        if self._reading:
            self._reading = False
            loop.remove_reader(self._source)
        if self._writing:
            self._writing = False
            loop.remove_writer(self._sink)
        os.close(self._source)
        os.close(self._sink)
        PIPES.give(pipe, not self._in_pipe)
        self._in_pipe = 0
        # (The owner's callbacks refer to the connections: let go of them.)
        self.took = self.blocked = _nothing
        self.gave = _stop
        self.ended = _nothing

    @property
    def active(self) -> bool:
        return self._pipe is not None


def _at_mark(fd: int) -> bool:
    try:
        return bool(int.from_bytes(fcntl.ioctl(fd, _SIOCATMARK, b"\0\0\0\0"), "little"))
    except OSError:
        return False


def _nothing(*_: object) -> None:
    return None


def _stop(_: int) -> bool:
    return True


class Target(Protocol):
    """What a body is spliced into: http1's `Request` (an answer) or upstream.py's `_Upload` (a request body)."""

    def splice_fd(self) -> int:
        """The socket to splice into, or -1 when it may not be spliced into now."""
        ...

    def spliced(self, size: int) -> bool:
        """`size` bytes went into it; True when nothing more may be sent (`Splice`'s `gave`)."""
        ...


def begin(
    loop: asyncio.AbstractEventLoop,
    source_fd: int,
    target: Target,
    left: int,
    took: Callable[[int], None],
    blocked: Callable[[], None],
    ended: Callable[[str], None],
) -> Splice | None:
    """A `Splice` of `left` bytes from `source_fd` into `target`'s socket, through a pipe of
    `PIPES` (not yet stepped); None, with nothing taken, when the target gives no socket, no
    pipe is free or the kernel refuses. The start both directions share (http1.py's
    `_Connection._try_splice` for uploads, upstream.py's for answers)."""
    fd = target.splice_fd()
    if fd < 0:
        return None
    pipe = PIPES.take()
    if pipe is None:
        return None
    try:
        return Splice(loop, source_fd, fd, left, pipe, took, target.spliced, blocked, ended)
    except OSError:
        PIPES.give(pipe, True)
        return None
