"""A real `redis-server` on a free loopback port, in a temporary folder: started once per test run.

No fake: the revocation store is tested against the server it meets in production. When the
binary is missing (a fresh CI machine), it is installed with apt when we are root (Debian's
`redis-server` package); otherwise the fixture fails, naming the package. It never skips.
`restart()` stops and starts the same server on the same port (a Redis restart mid-traffic);
`stop()` leaves it down until `start()`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

PACKAGE = "redis-server"


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE],
        ):
            subprocess.run(command, check=False, env=env, timeout=600, capture_output=True)
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError(
        f"the tests need a real Redis: install Debian's `{PACKAGE}` package "
        f"(apt-get install -y --no-install-recommends {PACKAGE}), or run the tests as root, which installs it"
    )


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the test run dies without its teardown (killed).

    The kernel sends it when the *thread* that started the server ends, not the process: set
    only for a start from the main thread (`start`). A restart from `asyncio.to_thread` would
    die with that worker thread, at the end of the test's event loop, and the next test found
    the server gone (seen once the restart test ran twice in a row, once per loop)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.binary = redis_server_binary()
        self.folder = folder
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                # Persisted as in production: a restart keeps the list (and re-sync shows it).
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--protected-mode",
                "yes",
                "--logfile",
                str(self.folder / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                self.process = None
                raise RuntimeError(f"redis-server exited with {status}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 20s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def start_on_a_free_port(self, attempts: int = 5) -> None:
        """The first start: a port found free can be taken by another process before
        redis-server binds it (parallel test runs); then try another, not fail the run."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError as error:
                self.stop()
                if "Address already in use" not in str(error) or attempt == attempts - 1:
                    raise
                self.port = _free_port()

    def flush(self) -> None:
        """Empty every database (between tests), over the wire as a client would."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"FLUSHALL\r\n")
            assert conn.recv(64).startswith(b"+OK")
