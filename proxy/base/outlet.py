"""stdout and stderr written without ever waiting for their reader.

Owns: `Outlet`, the bytes bound for one file descriptor of this process (`stdout()`, fd 1: the
access log; `stderr()`, fd 2: the operator log), and when and by whom they are written. Once
the process serves (`Outlet.detach`, called by server.py in each process of `workers: N`, after
any fork), `send` hands a batch to a writer thread of the outlet's own, started at the first
batch, and returns at once: a reader that stops reading (a container's log collector stalled,
`jwt-sidecar run | less` paused) fills the pipe and blocks that thread, never the event loop.
What the thread has not written yet is held, up to `limit` (4 MiB); a batch that would pass it
is dropped and counted (`dropped`, exported as `jwt_sidecar_log_lines_dropped_total`), and
`on_drop` is told (the access log writes one operator-log line, throttled by logthrottle.py).
What is held is written, in order, as soon as the reader reads again; `drain(timeout)` waits a
bounded time for it at the end of the drain. A descriptor that is closed or broken (EPIPE)
loses its lines, counted, as before: it must never take the proxy down. Before `detach`
(start-up, and worker 0 before it forks: the fork guard refuses to fork with a thread running)
`send` writes at once, as before. Does not own: what the lines say (accesslog.py, oplog.py)
or when they are batched (accesslog.py batches per 0.1 s or 256 lines).

Why a thread and not non-blocking writes with the loop's `add_writer` (bench/FIGURES.md,
"Writing the logs"): O_NONBLOCK is a flag of the open file description, which stdout shares
with the parent shell (a terminal left non-blocking breaks the shell's next programs), with
stderr when they are one pipe (`2>&1`: Python's own writes to stderr would then fail with
EAGAIN) and with the forked workers; reopening /proc/self/fd/1 for a private description works
for pipes only (not for journald's socket, and a regular file reopened loses its offset). The
thread costs the loop one `SimpleQueue.put` per batch (not per line): per request (a) 152,895 →
152,585 instructions, (c) 46,903 → ~46,700, and the loop's CPU per line is that of a blocking
write to a pipe that is read; the thread's own ~0.4 µs a line runs beside the loop.
"""

from __future__ import annotations

import atexit
import os
import select
import stat
import threading
import time
import weakref
from collections.abc import Callable
from queue import Empty, SimpleQueue

__all__ = ["LIMIT", "Outlet", "drain_all", "stderr", "stdout"]

LIMIT = 4 * 1024 * 1024
"""Bytes an outlet holds for a reader that does not read, at most (~16k access-log lines)."""


class Outlet:
    """Bytes for file descriptor `fd`, written by a thread of their own once `detach`ed."""

    def __init__(self, fd: int, *, limit: int = LIMIT) -> None:
        self.fd = fd
        self.limit = limit
        self.on_drop: Callable[[int], None] | None = None
        """Told the lines dropped, each time a batch is dropped for `limit` (in the sender's thread)."""
        self._forked()
        _OUTLETS.add(self)

    def _forked(self) -> None:
        """As new (also in a forked child, for every outlet: its parent's thread, queue and counts
        are not its own; the operator log's handler keeps the same object)."""
        self.dropped = 0
        """Lines (newlines) that were never written: held beyond `limit`, or the descriptor broken."""
        self._queue: SimpleQueue[bytes | None] = SimpleQueue()
        self._sent = 0  # bytes handed to the thread: changed by senders only
        self._done = 0  # bytes the thread has written (or lost): changed by the thread only
        self._lost = 0  # lines the thread lost to a broken descriptor
        self._detached = False
        self._pipe: bool | None = None  # whether `fd` is a pipe (found by the thread, once)
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> int:
        """Bytes handed over and not yet written."""
        return self._sent - self._done

    def detach(self) -> None:
        """From now on `send` returns at once, a thread writing (started at the first batch)."""
        self._detached = True

    def send(self, data: bytes, lines: int) -> bool:
        """Write `data` (`lines` lines) without waiting for the reader; False if it was dropped."""
        if not self._detached:
            self._write(data)
            return True
        if self._sent - self._done + len(data) > self.limit:
            self.dropped += lines
            if self.on_drop is not None:
                self.on_drop(lines)
            return False
        self._sent += len(data)
        self._queue.put(data)
        if self._thread is None:
            self._start()
        return True

    def drain(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for what is held to be written; the bytes still held."""
        deadline = time.monotonic() + timeout
        while self.held > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.held

    def close(self, timeout: float = 5.0) -> None:
        """End the thread once what is queued is written (or lost), waiting up to `timeout`
        seconds; `send` writes at once afterwards. For tests and benches: the process's own
        outlets live as long as it does."""
        self._detached = False
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _start(self) -> None:
        # A daemon: a reader that never reads again must not hold the process's exit up.
        self._thread = threading.Thread(target=self._run, name=f"outlet-{self.fd}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        queue = self._queue
        while True:
            pieces = [queue.get()]
            try:  # everything queued meanwhile, in one write
                while True:
                    pieces.append(queue.get_nowait())
            except Empty:
                pass
            last = None in pieces  # `close`: this is the end
            data = b"".join(piece for piece in pieces if piece is not None)
            if data and not self._write(data):
                self._lost += data.count(b"\n")
            self._done += len(data)
            if last:
                return

    def lost(self) -> int:
        """Every line never written: dropped at `limit` plus lost to a broken descriptor."""
        return self.dropped + self._lost

    def _write(self, data: bytes) -> bool:
        """All of `data` to the descriptor, waiting as long as it takes; False if it is broken.

        To a pipe, in pieces of at most PIPE_BUF bytes that end a line: the kernel writes such a
        piece whole, so another writer of the same pipe (the other workers, stderr with `2>&1`)
        never lands inside one of our lines, even when the pipe is full (a bigger write is cut
        wherever the pipe had room, and waits, while the others write)."""
        try:
            if self._pipe is None:
                self._pipe = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
            if not self._pipe or len(data) <= select.PIPE_BUF:
                self._all(data)
                return True
            start, end = 0, len(data)
            while start < end:
                cut = data.rfind(b"\n", start, start + select.PIPE_BUF) + 1
                if cut <= start:  # one line longer than PIPE_BUF: whole, as it comes
                    cut = data.find(b"\n", start) + 1 or end
                self._all(memoryview(data)[start:cut])
                start = cut
        except (OSError, ValueError):
            return False  # closed or broken: never take the proxy down
        return True

    def _all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:  # someone else made the description non-blocking
                time.sleep(0.01)
            except InterruptedError:
                continue


_OUTLETS: weakref.WeakSet[Outlet] = weakref.WeakSet()
_STANDARD: dict[int, Outlet] = {}


def _after_fork() -> None:
    for outlet in list(_OUTLETS):
        outlet._forked()


os.register_at_fork(after_in_child=_after_fork)


def _outlet(fd: int) -> Outlet:
    found = _STANDARD.get(fd)
    if found is None:
        found = _STANDARD[fd] = Outlet(fd)
    return found


def drain_all(timeout: float) -> int:
    """`drain` every outlet of this process within `timeout` seconds in all; the bytes still held.
    At the end of the drain (server.py), before a forked worker's `os._exit` and at exit."""
    deadline = time.monotonic() + timeout
    return sum(outlet.drain(max(0.0, deadline - time.monotonic())) for outlet in list(_OUTLETS))


atexit.register(drain_all, 2.0)  # what was logged after the drain (worker 0's last lines)


def stdout() -> Outlet:
    """This process's outlet for file descriptor 1 (the access log)."""
    return _outlet(1)


def stderr() -> Outlet:
    """This process's outlet for file descriptor 2 (the operator log)."""
    return _outlet(2)
