"""Soak: the real sidecar under a mixed, bounded load for a long while, with reloads.

    python bench/soak.py                  # 600 s; --duration 60 for a quick one

Runs `jwt-sidecar run` (as `python -m proxy run`, a subprocess) between a local upstream and a
local JWKS server (another process), and drives it from a third process, so the load does not
share the sidecar's CPU. The load, `--concurrency` requests in flight at most, mixes valid
tokens (2,000 distinct ones against a 500-entry token cache, so it hits and misses), tokens
with a bad signature, expired tokens, no token, a public route, small uploads, a few large
(2 MiB) answers, slow clients that read one 16 KiB every 50 ms, and slow clients that
send a body 8 KiB every 100 ms. Every ~30 s (`--reload-every`) the config changes its
`leeway`: alternately signalled with SIGHUP and only written (the file watcher reloads it).
The sidecar's RSS is sampled every second.

At the end it prints requests by kind and status, 5xx answers split into the sidecar's own
and the upstream's (the upstream marks its answers and never sends a 5xx, so every 5xx is
ours), tracebacks in the sidecar's stderr, reloads seen, and RSS at start, after warm-up
(the first fifth of the run, at most 60 s) and at the end, with the slope after warm-up.
It exits 1 when RSS is not flat (end > warm-up x 1.10 + 8 MiB), on any 5xx of ours, any
traceback, any answer other than the one expected for its kind, or a sidecar that did not
exit 0 on SIGTERM.

Not part of the test suite (it is long by design). Every wait is bounded: requests time out
after 60 s, the load stops at the deadline, the sidecar gets 30 s to drain.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import jwt  # noqa: E402
from aiohttp import web  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from proxy.tools.keygen import generate  # noqa: E402

ISSUER = "https://issuer.soak.local/"
AUDIENCE = "soak-api"
KID = "soak-rs256"
LARGE = 2 * 1024 * 1024
UPLOAD = 64 * 1024
MARK = "X-Soak-Upstream"
"""Every answer of the upstream carries it, so a 5xx without it is the sidecar's own."""
REQUEST_TIMEOUT = 60.0
MIB = 1024 * 1024

# kind -> (weight, expected status)
KINDS: dict[str, tuple[float, int]] = {
    "valid": (50, 200),
    "valid_new_connection": (5, 200),
    "bad_signature": (10, 401),
    "expired": (10, 401),
    "missing": (10, 401),
    "public": (5, 200),
    "upload": (5, 200),
    "large": (1, 200),
}
SLOW_KINDS: dict[str, int] = {"slow_reader": 200, "slow_sender": 200}


# -- upstream and JWKS (their own process) --------------------------------------------------------


def serve_upstream(jwks: dict[str, Any], ports: Any, stop: Any) -> None:
    asyncio.run(_serve_upstream(jwks, ports, stop))


async def _serve_upstream(jwks: dict[str, Any], ports: Any, stop: Any) -> None:
    chunk = b"x" * 65536

    async def small(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "user": request.headers.get("X-User-Id")}, headers={MARK: "1"})

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={MARK: "1", "Content-Type": "application/octet-stream"})
        response.content_length = LARGE
        await response.prepare(request)
        for _ in range(LARGE // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        size = 0
        async for part in request.content.iter_any():
            size += len(part)
        return web.json_response({"received": size}, headers={MARK: "1"})

    async def keys(request: web.Request) -> web.Response:
        return web.json_response(jwks, headers={"Cache-Control": "max-age=60"})

    app = web.Application(client_max_size=4 * MIB)
    app.router.add_get("/jwks.json", keys)
    app.router.add_get("/large", large)
    app.router.add_post("/upload", upload)
    app.router.add_route("*", "/{tail:.*}", small)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ports.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    while not stop.is_set():
        await asyncio.sleep(0.2)
    await runner.cleanup()


# -- the load (its own process) ------------------------------------------------------------------


def run_load(
    url: str, tokens: dict[str, list[str]], concurrency: int, duration: float, seed: int, results: Any
) -> None:
    results.send(asyncio.run(_load(url, tokens, concurrency, duration, seed)))


async def _load(url: str, tokens: dict[str, list[str]], concurrency: int, duration: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    counts: Counter[tuple[str, int]] = Counter()
    ours_5xx: Counter[str] = Counter()
    upstream_5xx: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    unmarked: Counter[str] = Counter()
    deadline = time.monotonic() + duration
    host, port = url.removeprefix("http://").split(":")
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]

    def headers_for(kind: str) -> dict[str, str]:
        if kind in ("missing", "public"):
            return {}
        pool = {"bad_signature": "bad_signature", "expired": "expired"}.get(kind, "valid")
        return {"Authorization": "Bearer " + rng.choice(tokens[pool])}

    def record(kind: str, status: int, marked: bool) -> None:
        counts[(kind, status)] += 1
        if status == 200 and not marked:
            unmarked[kind] += 1  # then the mark cannot tell our 5xx from the upstream's
        if status >= 500:
            (upstream_5xx if marked else ours_5xx)[kind] += 1

    async def one(session: aiohttp.ClientSession, fresh: aiohttp.ClientSession, kind: str) -> None:
        path = {"public": "/public/x", "upload": "/upload", "large": "/large"}.get(kind, f"/api/{rng.randrange(100)}")
        use = fresh if kind == "valid_new_connection" else session
        method = "POST" if kind == "upload" else "GET"
        body = rng.randbytes(UPLOAD) if kind == "upload" else None
        async with use.request(method, url + path, headers=headers_for(kind), data=body) as response:
            await response.read()
            record(kind, response.status, MARK in response.headers)

    async def slow_reader(session: aiohttp.ClientSession) -> None:
        async with session.get(url + "/large", headers=headers_for("valid")) as response:
            while await response.content.read(16384):
                if time.monotonic() < deadline:  # past it, read the rest at once: the run is ending
                    await asyncio.sleep(0.05)
            record("slow_reader", response.status, MARK in response.headers)

    async def slow_sender() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                (
                    f"POST /upload HTTP/1.1\r\nHost: {host}\r\nAuthorization: {headers_for('valid')['Authorization']}"
                    f"\r\nContent-Length: {UPLOAD}\r\nConnection: close\r\n\r\n"
                ).encode()
            )
            for _ in range(UPLOAD // 8192):
                writer.write(rng.randbytes(8192))
                await writer.drain()
                await asyncio.sleep(0.1)
            answer = await reader.read()
        finally:
            writer.close()
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/1.1 ") else 0
        record("slow_sender", status, f"\r\n{MARK.lower()}:" in head.lower())

    async def worker(index: int, session: aiohttp.ClientSession, fresh: aiohttp.ClientSession) -> None:
        # A few workers are slow clients; the rest pick a kind by weight for every request.
        slow = ("slow_reader", "slow_sender")[index % 2] if index < max(2, concurrency // 8) else None
        while time.monotonic() < deadline:
            kind = slow or rng.choices(kinds, weights)[0]
            try:
                if kind == "slow_reader":
                    await asyncio.wait_for(slow_reader(session), REQUEST_TIMEOUT)
                elif kind == "slow_sender":
                    await asyncio.wait_for(slow_sender(), REQUEST_TIMEOUT)
                else:
                    await one(session, fresh, kind)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, IndexError) as error:
                errors[f"{kind}: {type(error).__name__}"] += 1
                await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=concurrency)
    fresh_connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(connector=fresh_connector, timeout=timeout) as fresh,
    ):
        await asyncio.gather(*(worker(i, session, fresh) for i in range(concurrency)))
    return {
        "counts": {f"{k}|{s}": n for (k, s), n in counts.items()},
        "ours_5xx": dict(ours_5xx),
        "upstream_5xx": dict(upstream_5xx),
        "errors": dict(errors),
        "unmarked": dict(unmarked),
    }


# -- tokens ---------------------------------------------------------------------------------------


def make_tokens(private_pem: bytes, count: int) -> dict[str, list[str]]:
    key = serialization.load_pem_private_key(private_pem, password=None)
    now = int(time.time())

    def sign(sub: str, iat: int, exp: int) -> str:
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": iat,
            "exp": exp,
            "jti": base64.urlsafe_b64encode(os.urandom(12)).decode(),
        }
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": KID})

    valid = [sign(f"user-{i:05d}", now, now + 4 * 3600) for i in range(count)]
    expired = [sign(f"user-{i:05d}", now - 7200, now - 3600) for i in range(50)]
    bad = []
    for token in valid[:50]:
        head, payload, sig = token.split(".")
        middle = len(sig) // 2
        flipped = "A" if sig[middle] != "A" else "B"
        bad.append(f"{head}.{payload}.{sig[:middle]}{flipped}{sig[middle + 1 :]}")
    return {"valid": valid, "expired": expired, "bad_signature": bad}


# -- the sidecar ----------------------------------------------------------------------------------


def config_text(listen: int, admin: int, upstream: int, leeway: int) -> str:
    return f"""\
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
realm: soak
access_log: true
upstream: {{url: "http://127.0.0.1:{upstream}", timeout: 30s, connect_timeout: 2s, max_body: 4MB}}
token_cache: {{max_entries: 500}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "http://127.0.0.1:{upstream}/jwks.json", cache_ttl: 60s, min_refresh_interval: 5s}}
    leeway: {leeway}s
routes:
  - name: public
    match: {{path_prefix: /public/}}
    auth: none
  - name: api
    match: {{path_prefix: /}}
    auth: {{provider: main}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_ready(admin: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the sidecar exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit("the sidecar never became ready")


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return 0.0
    xs, ys = [t for t, _ in samples], [r for _, r in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (default 32)")
    p.add_argument("--reload-every", type=float, default=30.0, help="seconds between config changes (default 30)")
    p.add_argument("--tokens", type=int, default=2000, help="distinct valid tokens (default 2000)")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="jwt-sidecar-soak-"))
    key = generate("RS256", KID)
    assert key.private_pem is not None and key.public_jwk is not None
    tokens = make_tokens(key.private_pem, args.tokens)

    stop_upstream = ctx.Event()
    port_rx, port_tx = ctx.Pipe(duplex=False)
    upstream = ctx.Process(
        target=serve_upstream, args=({"keys": [dict(key.public_jwk)]}, port_tx, stop_upstream), daemon=True
    )
    upstream.start()
    if not port_rx.poll(30):
        raise SystemExit("the upstream did not start")
    upstream_port = port_rx.recv()

    listen, admin = free_port(), free_port()
    config = work / "config.yaml"
    leeways = [30, 5, 60, 15]
    config.write_text(config_text(listen, admin, upstream_port, leeways[0]))
    stderr_path = work / "sidecar.stderr"
    with open(stderr_path, "wb") as stderr:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    exit_code: int | None = None
    samples: list[tuple[float, float]] = []
    reloads = 0
    try:
        wait_ready(admin, sidecar)
        results_rx, results_tx = ctx.Pipe(duplex=False)
        load = ctx.Process(
            target=run_load,
            args=(f"http://127.0.0.1:{listen}", tokens, args.concurrency, args.duration, args.seed, results_tx),
            daemon=True,
        )
        started = time.monotonic()
        load.start()
        next_reload = started + args.reload_every
        while time.monotonic() < started + args.duration + REQUEST_TIMEOUT and not results_rx.poll(0):
            now = time.monotonic()
            rss = rss_mib(sidecar.pid)
            if rss is None or sidecar.poll() is not None:
                break
            samples.append((now - started, rss))
            if now >= next_reload and now < started + args.duration:
                reloads += 1
                config.write_text(config_text(listen, admin, upstream_port, leeways[reloads % len(leeways)]))
                if reloads % 2:
                    sidecar.send_signal(signal.SIGHUP)  # else the file watcher sees the change
                next_reload += args.reload_every
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        results = results_rx.recv() if results_rx.poll(REQUEST_TIMEOUT) else None
        load.join(10)
        if sidecar.poll() is None:
            sidecar.send_signal(signal.SIGTERM)
            try:
                exit_code = sidecar.wait(30)
            except subprocess.TimeoutExpired:
                sidecar.kill()
                exit_code = sidecar.wait()
        else:
            exit_code = sidecar.returncode
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
        stop_upstream.set()
        upstream.join(10)
    return report(args, results, samples, stderr_path, exit_code, reloads)


def report(
    args: argparse.Namespace,
    results: dict[str, Any] | None,
    samples: list[tuple[float, float]],
    stderr_path: Path,
    exit_code: int | None,
    reloads: int,
) -> int:
    failures: list[str] = []
    log = stderr_path.read_text(errors="replace")
    print(f"soak: {args.duration:g} s, concurrency {args.concurrency}, config changed {reloads} times")
    if results is None:
        failures.append("the load process sent no results")
        results = {"counts": {}, "ours_5xx": {}, "upstream_5xx": {}, "errors": {}, "unmarked": {}}
    counts = Counter({tuple(k.split("|")): n for k, n in results["counts"].items()})
    total = sum(counts.values())
    by_status = Counter()
    for (_, status), n in counts.items():
        by_status[status] += n
    print(f"requests: {total:,} ({total / args.duration:,.0f}/s)")
    print("  by status: " + ", ".join(f"{s}: {n:,}" for s, n in sorted(by_status.items(), key=lambda i: int(i[0]))))
    expected = {**{k: s for k, (_, s) in KINDS.items()}, **SLOW_KINDS}
    for kind in expected:
        row = {s: n for (k, s), n in counts.items() if k == kind}
        wrong = {s: n for s, n in row.items() if int(s) != expected[kind]}
        print(
            f"  {kind:22s} "
            + ", ".join(f"{s}: {n:,}" for s, n in sorted(row.items()))
            + (f"   UNEXPECTED (want {expected[kind]})" if wrong else "")
        )
        if wrong:
            failures.append(f"{kind}: unexpected statuses {wrong}")
    ours, theirs = sum(results["ours_5xx"].values()), sum(results["upstream_5xx"].values())
    print(f"5xx: {ours} ours, {theirs} the upstream's")
    if ours:
        failures.append(f"{ours} 5xx answers of our own: {results['ours_5xx']}")
    if results["unmarked"]:
        failures.append(
            f"200s without the upstream's {MARK} header, so 5xx cannot be told apart: {results['unmarked']}"
        )
    if results["errors"]:
        print("client-side errors: " + ", ".join(f"{k}: {n}" for k, n in sorted(results["errors"].items())))
    tracebacks = log.count("Traceback (most recent call last)")
    print(f"tracebacks in the sidecar's stderr: {tracebacks}")
    if tracebacks:
        failures.append(f"{tracebacks} traceback(s); the first:\n" + log[log.index("Traceback") :][:3000])
    reloaded = sum(
        1 + int(m.group(1).replace(",", "")) if m.group(1) else 1
        for m in re.finditer(r"config reloaded from \S+(?: \(([\d,]+) similar suppressed\))?", log)
    )
    print(f"reloads logged by the sidecar: {reloaded} (config changed {reloads} times)")
    if reloads and not reloaded:
        failures.append("the sidecar logged no reload")
    print(f"sidecar exit status after SIGTERM: {exit_code}")
    if exit_code != 0:
        failures.append(f"the sidecar exited with {exit_code}")
    if samples:
        warmup = min(60.0, args.duration / 5)
        start_rss = samples[0][1]
        warm = next((r for t, r in samples if t >= warmup), samples[-1][1])
        end = statistics.median(r for _, r in samples[-5:])
        after = [(t, r) for t, r in samples if t >= warmup]
        limit = warm * 1.10 + 8
        print(
            f"RSS MiB: start {start_rss:.1f}, after warm-up ({warmup:g} s) {warm:.1f}, end {end:.1f}, "
            f"peak {max(r for _, r in samples):.1f}; slope after warm-up {slope_mib_per_min(after):+.2f} MiB/min; "
            f"flat means end <= {limit:.1f}"
        )
        if end > limit:
            failures.append(f"RSS not flat: {end:.1f} MiB at the end > {limit:.1f}")
    else:
        failures.append("no RSS samples")
    print(f"sidecar stderr: {stderr_path} ({len(log.splitlines())} lines)")
    if failures:
        print("FAIL:\n- " + "\n- ".join(failures))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
