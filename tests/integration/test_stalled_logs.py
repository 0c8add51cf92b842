"""A stdout or stderr whose reader stops reading never stalls the proxy (base/outlet.py).

The real `jwt-sidecar run`, its stdout (the access log) or stderr (the operator log) a pipe
that this test holds and does not read, shrunk to one page and filled to the brim once the
sidecar is ready: every later write to it would block. Requests keep being answered and
/readyz stays up; what was held is written, whole lines in order, once the pipe is read
again; and a drain with the pipe never read again ends in bounded time. Before outlet.py the
first access-log batch (0.1 s after the first request) blocked the event loop for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TestKey, jwks_of, refused_port
from tests.integration.conftest import BASE_CONFIG
from tests.support.process import Run, running

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux; named in fcntl from Python 3.10 on some builds only)


@contextlib.contextmanager
def stalled_pipe() -> Iterator[tuple[int, int, int]]:
    """(read end, write end for the child, a non-blocking write end of our own to fill it)."""
    read, write = os.pipe()
    fcntl.fcntl(write, F_SETPIPE_SZ, 4096)
    # Our own open file description of the same pipe: O_NONBLOCK here leaves the child's alone.
    filler = os.open(f"/proc/self/fd/{write}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        yield read, write, filler
    finally:
        for fd in (read, write, filler):
            with contextlib.suppress(OSError):
                os.close(fd)


def fill(fd: int) -> None:
    """Write "filler" lines until the pipe takes no more (then any blocking write would wait)."""
    for piece in (b"filler\n" * 64, b"\n"):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(fd, piece)


class Reader:
    """Reads a pipe in a thread from `start()` on, into `data`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return
                self.data += chunk

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def lines(self) -> list[str]:
        return [line for line in self.data.decode("utf-8", "replace").splitlines() if line and line != "filler"]


def config(jwks_server: Any, rsa_key: TestKey, extra: str = "") -> str:
    jwks_server.document = jwks_of(rsa_key)
    # No token on a protected route: a 401 and its access-log line, the upstream never asked.
    text = BASE_CONFIG.replace("{upstream}", f"http://127.0.0.1:{refused_port()}").replace("{jwks}", jwks_server.url())
    return text + "drain_timeout: 2s\n" + extra


async def hammer(run: Run, requests: int, *, connections: int = 8, within: float = 60.0) -> list[int]:
    """`requests` GETs without a token over `connections` keep-alive connections; their statuses.
    Each must be answered within 5 s, all of them within `within` s."""
    statuses: list[int] = []
    timeout = aiohttp.ClientTimeout(total=5)

    async def one_connection(count: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for _ in range(count):
                async with session.get(run.url + "/orders/1") as response:
                    await response.read()
                    statuses.append(response.status)

    per = requests // connections
    await asyncio.wait_for(asyncio.gather(*(one_connection(per) for _ in range(connections))), within)
    return statuses


async def admin_get(run: Run, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(run.admin_url + path) as response:
            return response.status, await response.text()


def dropped(metrics: str, log: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'jwt_sidecar_log_lines_dropped_total{{log="{log}"'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no log_lines_dropped_total for {log}:\n{metrics}")


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stdout_nobody_reads_never_stalls_requests_and_its_lines_follow_when_read(
    jwks_server: Any, rsa_key: TestKey, tmp_path: Path, workers: int
) -> None:
    with stalled_pipe() as (read, write, filler):
        text = config(jwks_server, rsa_key, f"workers: {workers}\n" if workers > 1 else "")
        async with running(tmp_path, text, stdout=write) as run:
            os.close(write)  # the sidecar's copy is the only writer left (besides `filler`)
            fill(filler)
            # ~2,000 access-log lines, ~500 KB, into a pipe that takes not one more byte.
            statuses = await hammer(run, 2000)
            assert statuses == [401] * 2000
            assert (await admin_get(run, "/readyz"))[0] == 200
            status, metrics = await admin_get(run, "/metrics")
            assert status == 200
            assert dropped(metrics, "access") == 0, "500 KB is held, under the 4 MiB bound"
            # Read again: every line held is written, whole.
            reader = Reader(read)
            reader.start()
            try:
                deadline = time.monotonic() + 30
                while len(reader.lines()) < 2000 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                lines = [json.loads(line) for line in reader.lines()]  # each one whole JSON
                assert [line["status"] for line in lines] == [401] * 2000
                assert len({line["request_id"] for line in lines}) == 2000
                assert await run.stop(signal.SIGTERM, timeout=20) == 0
            finally:
                reader.stop()
            assert "Traceback" not in run.stderr()


async def test_the_drain_with_a_stdout_never_read_again_ends_in_bounded_time(
    jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    with stalled_pipe() as (_read, write, filler):
        async with running(tmp_path, config(jwks_server, rsa_key), stdout=write) as run:
            os.close(write)
            fill(filler)
            assert await hammer(run, 400) == [401] * 400
            await asyncio.sleep(0.3)  # the batch is handed to the writer, which blocks
            started = time.monotonic()
            assert await run.stop(signal.SIGTERM, timeout=20) == 0
            # drain_timeout 2 s (nothing in flight: at once) + the held lines' 2 s + the exit's
            assert time.monotonic() - started < 10
            assert '"event":"stopped"' in run.stderr() or "stopped" in run.stderr()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stderr_nobody_reads_never_stalls_requests(
    jwks_server: Any, rsa_key: TestKey, tmp_path: Path, workers: int
) -> None:
    # With workers: 2 the forked worker's operator log too (its handler's Outlet came with the fork).
    with stalled_pipe() as (read, write, filler):
        text = config(jwks_server, rsa_key, "log_format: json\n" + (f"workers: {workers}\n" if workers > 1 else ""))
        async with running(tmp_path, text, stdout=False, stderr=write) as run:
            os.close(write)
            fill(filler)
            # Each SIGHUP reloads and logs a line (reload_applied) from the event loop.
            for _ in range(3):
                run.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.2)
            assert await hammer(run, 400) == [401] * 400
            assert (await admin_get(run, "/readyz"))[0] == 200
            reader = Reader(read)
            reader.start()
            try:
                deadline = time.monotonic() + 20
                while '"reload_applied"' not in reader.data.decode() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert '"event":"reload_applied"' in reader.data.decode(), "held, then written"
                assert await run.stop(signal.SIGTERM, timeout=20) == 0
            finally:
                reader.stop()
            records = [json.loads(line) for line in reader.lines()]
            assert records[-1]["event"] == "stopped"
            if workers > 1:  # every worker's reload line and its last line were held and written
                reloaded = {r.get("worker") for r in records if r["event"] == "reload_applied"}
                assert reloaded == {0, 1}
                assert {r.get("worker") for r in records if r["event"] == "stopped"} == {0, 1}
