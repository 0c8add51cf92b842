"""Micro-benchmark of one sidecar process's own work per request, without the client's sockets.

The whole request path runs as it ships: our HTTP/1.1 server's connection protocol
(`http1._Connection`, parser included), `app.Proxy.handle`, the pipeline, metrics and the
access log (to /dev/null), and for allowed requests the pooled upstream client over real
loopback sockets to a minimal upstream in another process (its CPU is not counted). Only
the client's socket is replaced: request bytes go straight into `data_received` and the
answer is taken from `write`, so the figure is the sidecar's CPU per request minus the two
client-side syscalls, and it moves far less than wrk's req/s on a shared 2-core VM.

Workloads as bench/run's: (a) one valid RS256 token, (b) distinct tokens through a
100-entry cache, (c) no token (401), (d) a public route; and two with CORS, served by a second
proxy whose only difference is a `cors` policy on the token route (so a-d never pay for it):
(e) workload a from an allowed `Origin`, (f) a CORS preflight (204); and, only when asked for
alone (`--only g`), (g) = (a) with a revocation list of 100,000 rules that does not name the token;
and bodies, on the public route, only when asked for (`--only h`, `--only i`): (h) a 1 MiB
answer, (i) a 1 MiB upload (its body fed in reads of the size the event loop would read: what http1 offers, and
no faster than the proxy reads: the driver honours `pause_reading`). Reported: µs of process CPU
(`time.process_time`, user+system) per request, the least and the median of interleaved
rounds. The VM's noise only ever adds time, so the least is the steadier figure for
comparing two versions of the code.

    .venv/bin/python bench/pipeline_micro.py [--requests 2000] [--concurrency 8] [--rounds 15] [--json]

For figures that do not move at all, count instructions instead (`bench/instructions` runs
one round of a workload under callgrind, counting the round alone).
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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt
import yaml
from cryptography.hazmat.primitives import serialization

from proxy.base.outlet import Outlet
from proxy.config.builder import parse
from proxy.http.http1 import _READ_SIZE, _Connection
from proxy.request.app import Proxy
from proxy.telemetry.accesslog import AccessLog
from proxy.tools.keygen import generate

ISSUER = "https://issuer.bench.local/"
AUDIENCE = "bench-api"
# What nginx's `return 200` answers in bench/run: five fields and a short body.
_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


_MIB = 1024 * 1024
# Workload (h)'s answer: nginx's head, 1 MiB of body.
_BIG_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % _MIB
) + b"x" * _MIB
_READ = _READ_SIZE  # what one read of the event loop takes from a client's socket (http1's, but see `_drive`)
_LOOP_READ = 256 * 1024  # what uvloop's reads take for a protocol that is not buffered (the floor's)


def _upstream(sock: socket.socket) -> None:
    """A minimal keep-alive upstream: every request gets `_ANSWER` once its head and its
    Content-Length body are in; a request for /public/big, `_BIG_ANSWER`."""

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport, self.buffer, self.body_left, self.big = transport, b"", 0, False

        def data_received(self, data: bytes) -> None:
            if self.body_left:  # a request body (workload i): read and dropped
                taken = min(self.body_left, len(data))
                self.body_left -= taken
                data = data[taken:]
                if self.body_left:
                    return
                self.transport.write(_BIG_ANSWER if self.big else _ANSWER)  # type: ignore[attr-defined]
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                self.big = head.startswith(b"GET /public/big ")
                marker = head.lower().find(b"\r\ncontent-length: ")
                length = int(head[marker + 18 :].split(b"\r\n", 1)[0]) if marker >= 0 else 0
                taken = min(length, len(self.buffer))
                self.buffer = self.buffer[taken:]
                self.body_left = length - taken
                if self.body_left:
                    return
                self.transport.write(_BIG_ANSWER if self.big else _ANSWER)  # type: ignore[attr-defined]

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Upstream, sock=sock)
        await server.serve_forever()

    asyncio.run(serve())


class _Client(asyncio.Transport):
    """The client's side of one connection: takes our answers, and wakes whoever waits for
    one: at its first write, or with `large` (workloads h and i) once it is all here (a body's
    bytes are counted, not kept). The first costs next to nothing: a-g count the proxy."""

    def __init__(self, *, large: bool = False) -> None:
        super().__init__()
        self.large = large
        self.waiter: asyncio.Future[bytes] | None = None
        self.closed = False
        self.paused = False  # the proxy paused reading: the driver feeds no more until resumed
        self.resumed: asyncio.Future[None] | None = None
        self._first = b""  # the answer's first write
        self._left = -1  # bytes of the answer still to come (-1: none begun)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:  # type: ignore[override]
        if not self.large:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(bytes(data))
            return
        if self._left < 0:  # an answer begins: its head is in this write (ours and the floor's)
            self._first = bytes(data[:512])
            end = self._first.find(b"\r\n\r\n") + 4
            marker = self._first.lower().find(b"\r\ncontent-length: ", 0, end)
            length = int(self._first[marker + 18 :].split(b"\r\n", 1)[0]) if marker >= 0 else 0
            self._left = end + length
        self._left -= len(data)
        if self._left <= 0:
            self._left = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self._first)

    def writelines(self, pieces) -> None:  # type: ignore[no-untyped-def, override]
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    def get_write_buffer_size(self) -> int:
        return 0


def _revocation_file(folder: Path, count: int) -> Path:
    """A revocation list of `count` rules (four in five by jti, one in five by sub, as
    bench/revocation_micro.py's), none of which names the workloads' tokens; JSON: fast to load."""
    from proxy.auth.revocation import make_rule, render_rules

    expires = time.time() + 86400
    rules = [
        make_rule(jti=f"revoked-{i}", expires=expires) if i % 5 else make_rule(sub=f"gone-{i}", expires=expires)
        for i in range(count)
    ]
    path = folder / "revoked.json"
    path.write_text(render_rules(rules, json_form=True))
    return path


def _settings(upstream_port: int, jwks_file: Path, *, cors: bool = False, revoked: Path | None = None):  # noqa: ANN202
    doc: dict = {
        "listen": "127.0.0.1:8080",
        "admin": "127.0.0.1:9901",
        "realm": "bench",
        "upstream": {
            "url": f"http://127.0.0.1:{upstream_port}",
            "connect_timeout": "2s",
            "timeout": "30s",
            "max_body": "10MB",
        },
        "access_log": True,
        "providers": {
            "main": {
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "algorithms": ["RS256"],
                "leeway": "30s",
                "required_claims": ["exp"],
                "jwks_file": str(jwks_file),
                "headers": {"claims": {"sub": "X-User-Id", "email": "X-User-Email"}, "forward_token": False},
            }
        },
        "routes": [
            {"name": "public", "match": {"path_prefix": "/public/"}, "auth": "none"},
            {"name": "api", "match": {"path_prefix": "/"}, "auth": {"provider": "main"}},
        ],
        "token_cache": {"enabled": True, "max_entries": 100, "max_ttl": "5m"},
    }
    if cors:  # workloads e and f: a browser app's origin, as the README's CORS example
        doc["routes"][1]["cors"] = {
            "allow_origins": ["https://app.example.com"],
            "allow_methods": ["GET", "POST", "PUT", "DELETE"],
            "expose_headers": ["X-Request-Id"],
            "max_age": "10m",
        }
    if revoked is not None:  # workload (g) only: every route with a token checks the list
        doc["revocation"] = {"file": str(revoked)}
    return parse(yaml.safe_dump(doc))


def _request(path: str, token: str | None, extra: str = "", method: str = "GET") -> bytes:
    # wrk's request, plus the token: the same few fields every load generator sends.
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n{auth}{extra}\r\n".encode()


_ORIGIN = "Origin: https://app.example.com\r\n"
_PREFLIGHT = _ORIGIN + "Access-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: authorization\r\n"


async def _drive(proxy: Proxy | _Floor, requests: list[bytes], total: int, concurrency: int) -> float:
    """CPU µs per request over `total` requests on `concurrency` connections."""
    server = proxy.server()
    next_index = 0
    floor = isinstance(proxy, _Floor)
    # A request larger than one read is fed a read at a time, each as large as the event loop's
    # read would be: what `get_buffer` offers (http1's reads grow while a body is relayed), or
    # uvloop's own size for the floor. Pieces are cut once, and reused.
    large = any(len(data) > _READ for data in requests)
    pieces: dict[tuple[int, int, int], bytes] = {}

    def piece(data: bytes, at: int, size: int) -> bytes:
        key = (id(data), at, size)
        cut = pieces.get(key)
        if cut is None:
            cut = pieces[key] = data[at : at + size]
        return cut

    async def one_connection() -> None:
        nonlocal next_index
        conn = server() if isinstance(proxy, _Floor) else _Connection(server)
        client = _Client(large=large or requests[0].startswith(b"GET /public/big "))
        conn.connection_made(client)
        loop = asyncio.get_running_loop()
        while next_index < total:
            data = requests[next_index % len(requests)]
            next_index += 1
            client.waiter = loop.create_future()
            if len(data) <= _READ:
                conn.data_received(data)
            else:
                at = 0
                while at < len(data):
                    while client.paused:
                        client.resumed = loop.create_future()
                        await client.resumed
                    cut = piece(data, at, _LOOP_READ if floor else len(conn.get_buffer(-1)))
                    conn.data_received(cut)
                    at += len(cut)
            answer = await client.waiter
            if not answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 401 ", b"HTTP/1.1 204 ")):
                raise SystemExit(f"unexpected answer: {answer[:200]!r}")
        conn.connection_lost(None)

    before = time.process_time()
    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    return (time.process_time() - before) / total * 1e6


class _Floor:
    """bench/floor.py's bare proxy driven the same way as ours, so `bench/instructions floor-a`
    counts the floor's work per request exactly as it counts ours (same client, same upstream)."""

    def __init__(self, upstream_port: int) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import floor

        self._floor = floor
        self._pool = floor.Pool("127.0.0.1", upstream_port)

    def server(self):  # noqa: ANN201
        return lambda: self._floor.Client(self._pool)


def _from_pem(pem: bytes):  # noqa: ANN202
    """A GeneratedKey-like holder for a stored RS256 key (kid fixed)."""
    from jwt.algorithms import RSAAlgorithm

    private = serialization.load_pem_private_key(pem, None)
    jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid="bench-rs256", alg="RS256", use="sig")
    return argparse.Namespace(private_pem=pem, public_jwk=jwk, kid="bench-rs256")


def _workloads(key, count: int, only: str | None) -> dict[str, list[bytes]]:  # noqa: ANN001
    signing = serialization.load_pem_private_key(key.private_pem, None)
    now = int(time.time())

    def token(i: int) -> str:
        return jwt.encode(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": f"user-{i}",
                "iat": now,
                "exp": now + 3600,
                "jti": f"j{i}",
                "email": f"user-{i}@example.com",
            },
            signing,
            algorithm="RS256",
            headers={"kid": key.kid},
        )

    makers = {
        "a_one_token": lambda: [_request("/whoami", token(0))],
        "b_distinct_tokens": lambda: [_request("/whoami", token(i)) for i in range(count)],
        "c_no_token": lambda: [_request("/whoami", None)],
        "d_public": lambda: [_request("/public/whoami", None)],
        "e_cors_origin": lambda: [_request("/whoami", token(0), _ORIGIN)],
        "f_cors_preflight": lambda: [_request("/whoami", None, _PREFLIGHT, "OPTIONS")],
        # (a) on a config whose revocation list holds 100,000 rules (`--only g` alone: the
        # other workloads measure a config without revocation).
        "g_revocation_100k": lambda: [_request("/whoami", token(0))],
        # Bodies (`--only h`, `--only i` alone), on the public route: the relay, not the token.
        "h_answer_1mib": lambda: [_request("/public/big", None)],
        "i_upload_1mib": lambda: [
            _request("/public/upload", None, f"Content-Length: {_MIB}\r\n", "POST") + b"x" * _MIB
        ],
    }
    # Only the workloads asked for: signing thousands of unused tokens would swamp a count.
    return {name: make() for name, make in makers.items() if (name.startswith(only) if only else name[0] not in "ghi")}


def _run(args: argparse.Namespace) -> dict[str, list[float]]:
    if args.key:  # the same key on every run: callgrind counts then differ only by the code
        path = Path(args.key)
        if not path.exists():
            path.write_bytes(generate("RS256", "bench-rs256").private_pem)
        key = _from_pem(path.read_bytes())
    else:
        key = generate("RS256", "bench-rs256")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    with tempfile.TemporaryDirectory() as tmp:
        jwks_file = Path(tmp) / "jwks.json"
        jwks_file.write_text(json.dumps({"keys": [dict(key.public_jwk)]}))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        child = multiprocessing.Process(target=_upstream, args=(sock,), daemon=True)
        child.start()
        # As the running process writes stdout (base/outlet.py): a writer thread, here to /dev/null.
        sink = Outlet(os.open(os.devnull, os.O_WRONLY))
        sink.detach()
        revoked = _revocation_file(Path(tmp), 100_000) if (args.only or "").startswith("g") else None
        proxy = Proxy(_settings(sock.getsockname()[1], jwks_file, revoked=revoked), access_log=AccessLog(sink))
        loop.run_until_complete(proxy.start())
        workloads = _workloads(key, 500, args.only)  # (b): 500 tokens cycled through 100 entries
        proxies: dict[str, Proxy | _Floor] = dict.fromkeys(workloads, proxy)
        if args.floor:  # the same workloads through bench/floor.py's bare proxy
            proxies = dict.fromkeys(workloads, _Floor(sock.getsockname()[1]))
        if any(name.startswith(("e", "f")) for name in workloads):
            with_cors = Proxy(_settings(sock.getsockname()[1], jwks_file, cors=True), access_log=AccessLog(sink))
            loop.run_until_complete(with_cors.start())
            proxies.update((name, with_cors) for name in workloads if name.startswith(("e", "f")))
        try:
            for name, requests in workloads.items():  # warm-up: caches, pool, code paths
                loop.run_until_complete(_drive(proxies[name], requests, args.warmup, args.concurrency))
            results: dict[str, list[float]] = {name: [] for name in workloads}
            for _ in range(args.rounds):
                for name, requests in workloads.items():
                    # sys.call_tracing only wraps the call in a C function that nothing else
                    # uses, so that `callgrind --toggle-collect=_PyEval_CallTracing` counts
                    # the rounds alone (bench/instructions).
                    figure = sys.call_tracing(
                        loop.run_until_complete, (_drive(proxies[name], requests, args.requests, args.concurrency),)
                    )
                    results[name].append(figure)
            return results
        finally:
            for each in {p for p in proxies.values() if isinstance(p, Proxy)} | {proxy}:
                loop.run_until_complete(each.close())
            loop.close()
            child.terminate()
            sink.drain(5)
            os.close(sink.fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sidecar CPU µs per request, in process, per workload")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=1000, help="requests per workload before the rounds")
    parser.add_argument(
        "--only", help="run only the workloads whose name starts with this (a .. f; g, h, i only this way)"
    )
    parser.add_argument("--key", help="a PEM file to keep the RS256 key in across runs (made on first use)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--floor", action="store_true", help="drive bench/floor.py's bare proxy instead of ours")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results = _run(args)
    if args.json:
        print(json.dumps(results))
    else:
        for name, figures in results.items():
            print(f"{name:<18} least {min(figures):6.1f}  median {statistics.median(figures):6.1f} µs CPU/request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
