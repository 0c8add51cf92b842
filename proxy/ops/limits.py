"""The process's file-descriptor budget: the `RLIMIT_NOFILE` raise at start and the default `max_connections`.

Owns: raising the soft limit on open files to the hard limit (containers start with a soft
limit of 1024 and a hard one far above it; asking costs nothing), and the default number of
client connections the proxy port accepts, derived from that limit so that at the limit the
admin port (`/healthz`, `/readyz`, `/metrics`), the upstream connections and key fetches
still find descriptors; how running out of them at accept is reported; and the standard
descriptors held open for libuv (`hold_standard_descriptors`). Does not own: refusing connections over the limit (http1.py) or
reading the config (config/builder.py).
"""

from __future__ import annotations

import asyncio
import logging
import os

try:
    import resource
except ImportError:  # not on Windows; the sidecar runs on Linux and macOS
    resource = None  # type: ignore[assignment]

from ..base.oplog import event
from ..http.causes import cause

__all__ = [
    "FD_RESERVE",
    "default_max_connections",
    "hold_standard_descriptors",
    "quiet_accept_errors",
    "raise_fd_limit",
]

log = logging.getLogger("jwt_sidecar")

FD_RESERVE = 128
"""Descriptors kept out of the client connections' share: the listeners, the admin port's
own connections, key fetches, the idle upstream connections the pool keeps (at most 64 per
upstream), the config file and the standard streams."""

_LINUX_CEILING = 1 << 20  # the kernel's default fs.nr_open, for a hard limit of "unlimited"


def hold_standard_descriptors() -> None:
    """Put /dev/null on descriptor 0, 1 or 2 when the process started with it closed.

    uvloop's libuv must never be handed one of them for a socket or a pipe of its own: it
    aborts the process when it closes one (`uv__close` asserts fd > 2), where a start with
    stdout closed must end in one line (startup.py's `check_stdout`, which reads `sys.stdout`,
    None whatever this does). Called before a uvloop loop is made.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: `fd` itself, or below
            if null != fd:
                os.dup2(null, fd, inheritable=False)
                os.close(null)


def raise_fd_limit() -> int:
    """Raise the soft `RLIMIT_NOFILE` to the hard limit; return the soft limit now in force."""
    if resource is None:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, _LINUX_CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:  # e.g. macOS caps the soft limit at OPEN_MAX
            event(
                log,
                logging.WARNING,
                "fd_limit_low",
                "could not raise the open-file limit from %(open_files)d to %(target)d: %(cause)s",
                open_files=soft,
                target=target,
                cause=cause(error),
            )
    return soft if soft != resource.RLIM_INFINITY else _LINUX_CEILING


def default_max_connections(nofile: int) -> int:
    """Client connections the proxy port accepts when `max_connections` is not set.

    `(nofile - FD_RESERVE) // 2`: every proxied client connection may hold one upstream
    connection at the same time (a request in flight, or a WebSocket tunnel), so each costs
    up to two descriptors; the reserve stays for everything else. At least 1.
    """
    return max(1, (nofile - FD_RESERVE) // 2)


class _AcceptErrors:
    """The loop's exception handler: out of descriptors at accept, one line per 10 s.

    asyncio's loop, on EMFILE/ENFILE, stops accepting for a second, but first goes on trying
    up to `backlog` times in the same turn, each failure an ERROR with a traceback: about a
    thousand log entries a second, a second of CPU in three (measured by
    tests/integration/test_limits.py), for as long as the process has no descriptor to
    spare. Here each is one cheap call, and one line per 10 s says what is happening.
    (uvloop's libuv accepts and closes what waits, with a descriptor it keeps in reserve,
    and reports nothing.)"""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last = -every
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        now = loop.time()
        if now - self.last < self.every:
            self.suppressed += 1
            return
        error = context.get("exception")
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        why = cause(error) if isinstance(error, BaseException) else "out of system resources"
        event(
            log,
            logging.WARNING,
            "accept_failed",
            "cannot accept connections: %(cause)s; retrying every second%(more)s",
            cause=why,
            more=more,
            more_since_last=self.suppressed,
        )
        self.last, self.suppressed = now, 0


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Report running out of descriptors at accept once per 10 s instead of every second."""
    loop.set_exception_handler(_AcceptErrors())
