"""Start-up failures that are the operator's to fix, each said in one line of our own words.

Owns: binding the listening sockets before anything else starts, so a port in use, a port
below 1024 without the privilege for it, or an address this machine does not have ends the
start before a key is fetched or a log line claims the proxy served; checks of the other
things a start needs from the machine (a writable `PROMETHEUS_MULTIPROC_DIR` when one is set,
a temporary directory for `workers`, a stdout for the access log); and `StartupError`, whose
text is the whole line `jwt-sidecar run` and `demo` print after `jwt-sidecar: error: ` before
exiting 1. Does not own: serving on the sockets (server.py, http1.py, admin.py), mistakes in
the config file (config/builder.py's `ConfigError`), or printing (cli.py).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from dataclasses import dataclass, field

from ..config.settings import Listen, Settings
from ..http.upstream import connect_host

__all__ = [
    "Sockets",
    "StartupError",
    "bind",
    "bind_for",
    "check_multiproc_dir",
    "check_stdout",
    "metrics_directory",
    "why",
]

BACKLOG = 1024
_WILDCARDS = ("0.0.0.0", "::", "")


class StartupError(Exception):
    """The machine does not give the start what it needs; `str()` is one line for the operator.
    `errno`: the OSError's, when one caused it (the demo moves a port only when it is in use)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass
class Sockets:
    """Bound, listening sockets: the proxy port's, and the admin port's (none in a worker)."""

    listen: list[socket.socket] = field(default_factory=list)
    admin: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in (*self.listen, *self.admin):
            sock.close()


def why(error: OSError) -> str:
    """What an OSError means, in plain words (never `[Errno N]`)."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


def _cannot(address: Listen, role: str, reason: str, code: int | None = None) -> StartupError:
    return StartupError(f"cannot listen on {address} ({role}): {reason}", code)


def bind(address: Listen, role: str, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind and listen on every address `address.host` names, as asyncio's `create_server`
    would (SO_REUSEADDR, IPV6_V6ONLY, SO_REUSEPORT when asked); raise `StartupError` naming
    the address, the port, `role` (the config key or option that chose it) and the cause.

    Listening here, not only binding: two sockets with SO_REUSEADDR may both bind one port
    while neither listens, so only `listen()` proves the port is ours. A connection that
    arrives before the server runs waits in the backlog and is served once it does."""
    try:
        infos = socket.getaddrinfo(
            connect_host(address.host) or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        raise _cannot(address, role, f"the host name {address.host!r} does not resolve to an address") from None
    sockets: list[socket.socket] = []
    ip = address.host
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):  # de-duplicated, in order
            ip = str(sockaddr[0])  # a str for IPv4 and IPv6, the only families asked for
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise _cannot(address, role, _bind_failure(error, address, ip), error.errno) from None
    return sockets


def _bind_failure(error: OSError, address: Listen, ip: str) -> str:
    """Why `ip` (one of the addresses `address.host` names) could not be bound, in words."""
    if error.errno == errno.EADDRINUSE:
        return "address already in use (another process listens there; stop it or choose another port)"
    if error.errno in (errno.EACCES, errno.EPERM):
        if address.port < 1024:
            return (
                f"permission denied: port {address.port} is below 1024, which needs root or the "
                "CAP_NET_BIND_SERVICE capability; choose a port of 1024 or more"
            )
        return "permission denied"
    named = address.host if ip == address.host else f"{address.host} ({ip})"  # localhost (::1)
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{named} is not an address of this machine"
    if error.errno == errno.EAFNOSUPPORT:
        return f"this machine has no IPv6 for {named}" if ":" in ip else "address family not supported"
    return why(error)


def bind_for(settings: Settings, *, proxy_reuse_port: bool = False, admin: bool = True) -> Sockets:
    """The proxy port's sockets (`listen`), then the admin port's (`admin`), or a `StartupError`."""
    bound = Sockets(listen=bind(settings.listen, "listen", reuse_port=proxy_reuse_port))
    if admin:
        try:
            bound.admin = bind(settings.admin, "admin")
        except StartupError as error:
            bound.close()
            if settings.admin.port == settings.listen.port and error.errno == errno.EADDRINUSE:
                # `localhost:8080` and `127.0.0.1:8080` look different to the config check.
                raise _cannot(
                    settings.admin,
                    "admin",
                    f"address already in use by `listen` ({settings.listen}) "
                    "of this same config; give admin a port of its own",
                    error.errno,
                ) from None
            raise
    return bound


def check_multiproc_dir() -> None:
    """prometheus-client keeps every metric in files under `PROMETHEUS_MULTIPROC_DIR` when that is
    set (`workers` sets it for its workers): one left set to a missing or read-only directory
    would otherwise fail at the first metric, with a traceback."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    import tempfile  # (here: `tempfile` brings `shutil`, `bz2` and `lzma`, ~0.6 MiB a process, for `workers` alone)

    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise StartupError(
            f"PROMETHEUS_MULTIPROC_DIR is {directory}, where metrics cannot be written: "
            f"{why(error)}; unset it (workers set their own) or make it a writable directory"
        ) from None


def metrics_directory() -> str:
    """A new directory for the multiprocess metrics of `workers`, in the temporary directory."""
    import tempfile  # (as in `check_multiproc_dir`)

    try:
        return tempfile.mkdtemp(prefix="jwt-sidecar-metrics-")
    except OSError as error:
        raise StartupError(
            f"`workers` needs a writable temporary directory for its metrics ({why(error)}); "
            "mount a writable /tmp (an emptyDir in Kubernetes) or set TMPDIR to one"
        ) from None


def check_stdout(settings: Settings) -> None:
    if settings.access_log and sys.stdout is None:
        raise StartupError(
            "stdout is closed and the access log is written there; give the process a stdout or set access_log: false"
        )
