"""The access log's writes to a pipe, three ways (bench/FIGURES.md, "Writing the logs"):

- `blocking`: as before base/outlet.py, `write` + `flush` on a BufferedWriter in the loop;
- `thread`: `Outlet` (a writer thread fed whole batches through a SimpleQueue);
- `nonblocking`: a prototype of the other design, `os.write` on an O_NONBLOCK descriptor from
  the loop, the rest held and written from `loop.add_writer` (possible here because the pipe is
  this bench's own: in the sidecar, stdout's open file description is shared);
- `none`: the batch built and thrown away (the floor of the three).

Each writes `--lines` access-log lines through `AccessLog.line`, the loop yielding every 16
lines (as requests would), into a pipe that `cat > /dev/null` reads, and prints the loop
thread's CPU per line, the process's (all threads), and the wall time. `--stalled`: nobody
reads the pipe (64 KiB); the longest a single `line` or flush call held the loop.
    .venv/bin/python bench/log_writes.py [--lines 200000] [--stalled]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from proxy.base.outlet import Outlet  # noqa: E402
from proxy.telemetry.accesslog import AccessLog  # noqa: E402


class _NonBlocking(Outlet):
    """The add_writer design: write at once, hold what the pipe did not take, drain on writable."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        os.set_blocking(fd, False)
        self._rest = bytearray()
        self._loop = asyncio.get_event_loop()

    def send(self, data: bytes, lines: int) -> bool:
        if self._rest:
            if len(self._rest) + len(data) > self.limit:
                self.dropped += lines
                return False
            self._rest += data
            return True
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            self._rest += data[written:]
            self._loop.add_writer(self.fd, self._writable)
        return True

    def _writable(self) -> None:
        try:
            written = os.write(self.fd, self._rest)
        except BlockingIOError:
            return
        del self._rest[:written]
        if not self._rest:
            self._loop.remove_writer(self.fd)

    @property
    def held(self) -> int:
        return len(self._rest)


class _None(Outlet):
    def send(self, data: bytes, lines: int) -> bool:
        return True


async def _run(design: str, lines: int, stalled: bool) -> dict[str, float]:
    read, write = os.pipe()
    reader = None if stalled else subprocess.Popen(["cat"], stdin=read, stdout=subprocess.DEVNULL)
    sink: object
    if design == "blocking":
        sink = os.fdopen(os.dup(write), "wb")
    elif design == "thread":
        sink = Outlet(write)
        sink.detach()
    elif design == "nonblocking":
        sink = _NonBlocking(write)
    else:
        sink = _None(write)
    log = AccessLog(sink)  # type: ignore[arg-type]
    if isinstance(sink, Outlet):
        sink.on_drop = None  # (counted; no operator-log line per batch in this bench)
    worst = 0.0
    cpu, wall, process = time.thread_time(), time.perf_counter(), time.process_time()
    for n in range(lines):
        started = time.perf_counter()
        log.line(
            "0123456789abcdef",
            "127.0.0.1",
            "GET",
            "/orders/1",
            "api",
            "main",
            401,
            "denied",
            "token_missing",
            None,
            0.21,
        )
        worst = max(worst, time.perf_counter() - started)
        if n % 16 == 15:
            await asyncio.sleep(0)
        if stalled and time.perf_counter() - wall > 5:
            break
    log.flush()
    loop_cpu = time.thread_time() - cpu
    if isinstance(sink, Outlet):
        deadline = time.monotonic() + (0 if stalled else 30)
        while sink.held and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
    elapsed, all_cpu = time.perf_counter() - wall, time.process_time() - process
    if isinstance(sink, _NonBlocking):
        asyncio.get_running_loop().remove_writer(write)
    if design == "blocking":
        sink.close()  # type: ignore[attr-defined]
    if reader is not None:
        os.close(write)
        reader.wait()
    os.close(read)
    return {
        "loop_us": loop_cpu / lines * 1e6,
        "all_us": all_cpu / lines * 1e6,
        "wall_s": elapsed,
        "worst_ms": worst * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--stalled", action="store_true")
    parser.add_argument("--designs", default="none,blocking,thread,nonblocking")
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    for design in args.designs.split(","):
        if args.stalled and design == "blocking":
            print("blocking: stalled forever (the loop waits in write)")
            continue
        result = runner(_run(design, args.lines, args.stalled))
        print(
            f"{design:12} loop {result['loop_us']:.3f} us/line, all threads {result['all_us']:.3f} us/line, "
            f"wall {result['wall_s']:.2f} s, longest call {result['worst_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
