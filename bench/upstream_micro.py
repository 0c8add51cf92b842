"""Micro-benchmark of the upstream client alone: `proxy.http.upstream.Pool` against aiohttp's `ClientSession`.

An aiohttp upstream runs in its own process (so its CPU is not counted) and answers a small
GET; the client process sends the same requests with each client, with the headers a proxied
request carries, and reads each answer whole. Reported per client: requests/s (wall clock)
and µs of client-process CPU per request, all and user-mode only (`os.times`), the median of
three interleaved rounds.

    .venv/bin/python bench/upstream_micro.py [--requests 20000] [--concurrency 1] [--uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.http.upstream import Pool

HEADERS = [
    ("Accept", "application/json"),
    ("User-Agent", "bench-client/1.0"),
    ("X-User-Id", "user-12345"),
    ("X-User-Scopes", "orders:read orders:write"),
    ("X-Request-Id", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ("X-Forwarded-For", "10.1.2.3"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "api.example.test"),
]
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})  # as forward.py
BODY = b'{"orders":[1,2,3],"ok":true}'


def new_session() -> aiohttp.ClientSession:
    """aiohttp's client as the proxy configured it when it used one: pooled keep-alive, no cookie jar."""
    connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, enable_cleanup_closed=False)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )


def _serve(port: int, use_uvloop: bool) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get("/orders", hello)
    if use_uvloop:
        import uvloop

        uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _wait_listening(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


async def _measure(one: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> tuple[float, float, float]:
    """(requests/s, µs CPU, µs user CPU) per request for `requests` calls of `one` over `concurrency` workers.

    User CPU is the Python side (the client's own code and the event loop); the rest of the
    CPU is the kernel's socket and epoll work, which every client pays alike.
    """
    per_worker = requests // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await one()

    done = per_worker * concurrency
    before, wall = os.times(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    after, wall = os.times(), time.perf_counter() - wall
    user = after.user - before.user
    cpu = user + after.system - before.system
    return done / wall, cpu / done * 1e6, user / done * 1e6


async def _run(port: int, requests: int, concurrency: int) -> dict[str, dict[str, float]]:
    pool = Pool()

    async def with_pool() -> None:
        response = await pool.request(
            "GET",
            "http",
            "127.0.0.1",
            port,
            "/orders",
            HEADERS,
            None,
            content_length=None,
            connect_timeout=5.0,
            read_timeout=30.0,
        )
        body = await response.read(64 * 1024)
        if body is None:
            body = b"".join([chunk async for chunk in response.iter_chunks()])
        response.release()
        assert body == BODY

    session = new_session()
    url = URL(f"http://127.0.0.1:{port}/orders")
    timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=30.0)

    async def with_aiohttp() -> None:
        response = await session.request(
            "GET",
            url,
            headers=CIMultiDict(HEADERS),
            allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO,
            timeout=timeout,
            compress=None,
        )
        async with response:
            body = await response.read()
        assert body == BODY

    clients = {"upstream.Pool": with_pool, "aiohttp.ClientSession": with_aiohttp}
    rounds: dict[str, list[tuple[float, float, float]]] = {name: [] for name in clients}
    try:
        for one in clients.values():
            await _measure(one, min(2000, requests), concurrency)  # warm up: connections, caches
        for _ in range(3):  # interleaved, so drift in the machine's speed hits both alike
            for name, one in clients.items():
                rounds[name].append(await _measure(one, requests, concurrency))
    finally:
        await pool.close()
        await session.close()
    return {
        name: {
            "requests_per_s": statistics.median(r[0] for r in runs),
            "cpu_us_per_request": statistics.median(r[1] for r in runs),
            "user_cpu_us_per_request": statistics.median(r[2] for r in runs),
        }
        for name, runs in rounds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--uvloop", action="store_true", help="run client and upstream on uvloop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, args.uvloop), daemon=True)
    server.start()
    try:
        if args.uvloop:
            import uvloop

            uvloop.install()
        asyncio.run(_wait_listening(port))
        results = asyncio.run(_run(port, args.requests, args.concurrency))
    finally:
        server.terminate()
        server.join(5)
    loop = "uvloop" if args.uvloop else "asyncio"
    if args.json:
        print(
            json.dumps({"loop": loop, "requests": args.requests, "concurrency": args.concurrency, "results": results})
        )
        return
    print(f"upstream client, {args.requests} GETs x3, concurrency {args.concurrency}, {loop}")
    for name, numbers in results.items():
        print(
            f"  {name:<22} {numbers['requests_per_s']:>9,.0f} req/s  {numbers['cpu_us_per_request']:>6.1f} µs CPU"
            f"  ({numbers['user_cpu_us_per_request']:.1f} µs user) per request"
        )


if __name__ == "__main__":
    main()
