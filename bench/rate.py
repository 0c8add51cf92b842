"""A fixed-rate HTTP/1.1 load generator: N requests a second for D seconds, per-request latency.

wrk sends as fast as it can; this sends on a fixed schedule (open loop), so the latency it
reports is what one request costs at a low, steady load. Request i is due at start + i/rate;
its latency is measured from that due time, so a slow answer that delays later sends is
counted against them too (no coordinated omission). Idle keep-alive connections are reused;
when all are busy a new one is opened.

    python bench/rate.py --url http://127.0.0.1:8080/api/x --rate 200 --duration 5 \
        -H "Authorization: Bearer $TOKEN"

prints one JSON object: counts by status, errors, and latency percentiles in milliseconds.
Bounded: it stops sending after --duration and waits at most --timeout for stragglers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def roundtrip(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        chunked = False
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and value.lower() == "close":
                close = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length is not None:
            await self.reader.readexactly(length)
        else:
            await self.reader.read()
            close = True
        if close:
            raise ConnectionResetError("server closed the connection")
        return status

    def close(self) -> None:
        self.writer.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run(
    url: str, rate: float, duration: float, headers: list[str], timeout: float, warmup: int, samples: bool = False
) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", *headers]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    idle: list[Conn] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    timeline: list[tuple[float, float]] = []

    async def one(due: float | None) -> None:
        conn = idle.pop() if idle else Conn(*await asyncio.open_connection(host, port))
        try:
            status = await asyncio.wait_for(conn.roundtrip(request), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as error:
            conn.close()
            if due is not None:
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
            return
        idle.append(conn)
        if due is not None:
            latencies.append(time.perf_counter() - due)
            if samples:
                timeline.append((due, latencies[-1]))
            statuses[status] = statuses.get(status, 0) + 1

    # Warm-up: open a few connections and send a few requests, not recorded.
    for _ in range(warmup):
        await asyncio.gather(*(one(None) for _ in range(4)))

    total = int(rate * duration)
    tasks = []
    start = time.perf_counter() + 0.01
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    sent_for = time.perf_counter() - start
    _done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        errors["unfinished"] = len(pending)
    for conn in idle:
        conn.close()

    ms = sorted(x * 1000 for x in latencies)
    result = {
        "url": url,
        "rate": rate,
        "duration": duration,
        "sent": total,
        "sent_for_s": round(sent_for, 3),
        "requests": len(ms),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
        "latency_ms": {
            "p50": percentile(ms, 50),
            "p90": percentile(ms, 90),
            "p99": percentile(ms, 99),
            "p99.9": percentile(ms, 99.9),
            "max": ms[-1] if ms else float("nan"),
            "mean": sum(ms) / len(ms) if ms else float("nan"),
        },
    }
    if samples:
        # (due time on the monotonic clock, latency ms), in due order: for finding what a slow
        # request coincided with (a timer, a collection) in another process's log.
        result["samples"] = sorted((round(due, 6), round(lat * 1000, 4)) for due, lat in timeline)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sending (default 5)")
    parser.add_argument("-H", "--header", action="append", default=[], help="extra request header, 'Name: value'")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds (default 5)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up rounds of 4 requests, not recorded")
    parser.add_argument(
        "--samples", action="store_true", help="add every request's (due time, latency ms) to the output"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(args.url, args.rate, args.duration, args.header, args.timeout, args.warmup, args.samples))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
