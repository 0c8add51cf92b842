"""Probe: does one client's answer reach another when the upstream sends bytes nobody asked for?

An upstream in threads of its own (real timing, unlike one event loop) answers each request,
marked by its target `/m/<marker>`, with that marker in `X-Marker`, then sends `stray`
bytes up to `--gap` seconds later, before it reads the next request on the connection:
a second answer (`second`), the GET's body after a HEAD answer (`head`), or a body after a
204 (`204`). Each stray is itself a whole answer marked like the request it followed.
`--requests` requests, `--concurrency` at a time, go through `proxy.http.upstream.Pool`; the
figure is how many got an answer marked for another request ("crossed").

    .venv/bin/python bench/stray_probe.py [--mode second|head|204] [--gap 0.002] [--requests 300] [--concurrency 10]

Issue 10's outside probe found 14-41 of 300 crossed; this one, on the code before the fix,
19-288 of 300 depending on the gap; after it, 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.http.upstream import Pool, UpstreamError


def _whole(marker: bytes) -> bytes:
    return b"HTTP/1.1 200 X\r\nX-Marker: %b\r\nContent-Length: %d\r\n\r\n%b" % (marker, len(marker), marker)


def _answers(mode: str, marker: bytes) -> tuple[bytes, bytes]:
    if mode == "head":
        return b"HTTP/1.1 200 X\r\nX-Marker: %b\r\nContent-Length: %d\r\n\r\n" % (marker, len(_whole(marker))), _whole(
            marker
        )
    if mode == "204":
        return b"HTTP/1.1 204 X\r\nX-Marker: %b\r\n\r\n" % marker, _whole(marker)
    return _whole(marker), _whole(marker)


def _serve(conn: socket.socket, mode: str, gap: float) -> None:
    buffer = b""
    with conn:
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                answer, stray = _answers(mode, head.split(b" ")[1].rpartition(b"/")[2])
                conn.sendall(answer)
                if gap:
                    time.sleep(random.uniform(0, gap))
                conn.sendall(stray)
        except OSError:
            return  # the pool closed the connection: expected once it distrusts the upstream


def _upstream(mode: str, gap: float) -> int:
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve, args=(conn, mode, gap), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


async def _probe(port: int, mode: str, total: int, concurrency: int) -> tuple[int, int]:
    pool = Pool()
    method = "HEAD" if mode == "head" else "GET"
    crossed = failed = 0
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        nonlocal crossed, failed
        marker = f"u{index}"
        async with slots:
            try:
                answer = await pool.request(
                    method,
                    "http",
                    "127.0.0.1",
                    port,
                    f"/m/{marker}",
                    [],
                    None,
                    content_length=None,
                    connect_timeout=2,
                    read_timeout=2,
                )
                async for _ in answer.iter_chunks():
                    pass
                answer.release()
            except (UpstreamError, TimeoutError):
                failed += 1
                return
            if dict(answer.headers).get("X-Marker") != marker:
                crossed += 1

    await asyncio.gather(*(one(i) for i in range(total)))
    await pool.close()
    return crossed, failed


def main() -> int:
    parser = argparse.ArgumentParser(description="answers crossing between requests, with a misbehaving upstream")
    parser.add_argument("--mode", choices=["second", "head", "204"], default="second")
    parser.add_argument("--gap", type=float, default=0.002, help="most seconds between the answer and the stray")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    port = _upstream(args.mode, args.gap)
    crossed, failed = asyncio.run(_probe(port, args.mode, args.requests, args.concurrency))
    print(f"{args.mode} gap={args.gap:g}s: {crossed} of {args.requests} crossed, {failed} failed")
    return 1 if crossed else 0


if __name__ == "__main__":
    raise SystemExit(main())
