"""python-floor: a bare HTTP/1.1 proxy in Python, to measure the floor, not a product.

IT DOES NOT VERIFY TOKENS. It only looks for an Authorization header: a request without one
gets a fixed, pre-built 401 (paths under /public/ are forwarded anyway); every other request
is forwarded as received (method, path, headers minus Connection/Keep-Alive, nothing else
added or removed: the token goes to the upstream too) over a pool of keep-alive upstream
connections, and the answer is relayed. No JWT, no claims, no header hygiene, no logs, no
metrics, no timeouts, no limits, no HEAD: only uvloop, asyncio.Protocol and httptools both
ways, with flow control. What it costs is the cost of HTTP in and out of one Python process
on this machine, which bounds what any Python proxy (jwt-sidecar included) can reach here.

One tuning any Python process could apply: glibc's malloc is told (mallopt) to keep large
blocks on its heap. By default it moves its mmap and trim thresholds as blocks come and go,
and then often gives memory back to the kernel between two 1 MiB bodies and page-faults it in
again for the next one: half or more of the CPU of a 1 MiB relay, or none, depending on what
the process allocated before. `--no-mallopt` leaves glibc's defaults.

    python bench/floor.py --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000   # GET /readyz: 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes

import httptools
import uvloop

HOP = (b"connection", b"keep-alive")
NO_BODY = (204, 304)
BODY_401 = b'{"error":"invalid_token","error_description":"missing bearer token"}'
RESP_401 = (
    b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="bench"\r\n'
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY_401), BODY_401)
)
RESP_READY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
RESP_502 = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Req:
    __slots__ = ("answered", "chunked", "client", "done", "fixed", "head", "keep_alive", "pending", "up")

    def __init__(self, client: Client) -> None:
        self.client, self.fixed, self.chunked, self.up, self.done, self.answered = (
            client,
            None,
            False,
            None,
            False,
            False,
        )
        self.pending: list[bytes] | None = []

    def send(self, data: bytes) -> None:  # a piece of the request body, to the upstream or held
        if self.up is not None:
            self.up.transport.write(data)
        elif self.pending is not None:
            self.pending.append(data)


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.idle = host, port, []

    def acquire(self, req: Req) -> None:
        while self.idle:
            up = self.idle.pop()
            if not up.transport.is_closing():
                return up.start(req)
        asyncio.get_running_loop().create_task(self.connect(req))
        return None

    async def connect(self, req: Req) -> None:
        try:
            _, up = await asyncio.get_running_loop().create_connection(lambda: Upstream(self), self.host, self.port)
        except OSError:
            return req.client.fail(req)
        if req.client.transport.is_closing():
            return self.idle.append(up)  # the client left while we connected
        up.start(req)
        return None


class Upstream(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool, self.req, self.paused_client, self.read_paused = pool, None, None, False
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self, req: Req) -> None:
        self.req, req.up = req, self
        self.transport.write(b"".join([req.head, *req.pending]))
        req.pending = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.reason, self.head, self.buffer, self.length, self.close_delimited = b"", [], None, False, False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in HOP:
            return
        if low == b"transfer-encoding":
            self.buffer = []  # chunked (or other): read it all, answer with a Content-Length
            return
        self.length = self.length or low == b"content-length"
        self.head.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        self.status = status = self.parser.get_status_code()
        if self.buffer is None and not self.length and status >= 200 and status not in NO_BODY:
            self.buffer, self.close_delimited = [], True  # no framing: the body ends when the upstream closes
        self.head.insert(0, b"HTTP/1.1 %d %s\r\n" % (status, self.reason))
        if self.buffer is None:  # Content-Length (or no body): relay as it comes
            self.req.client.write(b"".join([*self.head, b"\r\n"]))
            self.req.answered = True

    def on_body(self, data: bytes) -> None:
        if self.buffer is None:
            self.req.client.write(data)
        else:
            self.buffer.append(data)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return  # 100 Continue and friends: relayed, the answer follows
        if self.buffer is not None:
            body = b"".join(self.buffer)
            self.req.client.write(b"".join([*self.head, b"Content-Length: %d\r\n\r\n" % len(body), body]))
        req, self.req, req.up = self.req, None, None
        if self.read_paused:
            self.resume_reading()
        if self.paused_client is None and req.done and self.parser.should_keep_alive():
            self.pool.idle.append(self)
        else:
            self.transport.close()  # an answer before the whole request was sent, or the upstream said close
        req.client.finished(req)

    def connection_lost(self, exc: Exception | None) -> None:
        req, self.req = self.req, None
        if req is not None:
            if self.close_delimited:  # the close ended the body: answer with what came
                self.req = req
                return self.on_message_complete()
            req.up = None
            req.client.fail(req)
        if self.paused_client is not None:
            self.resume_writing()
        return None

    def pause_writing(self) -> None:  # a 1 MiB upload faster than the upstream reads it
        if self.req is not None:
            self.paused_client = self.req.client
            self.paused_client.transport.pause_reading()

    def resume_writing(self) -> None:
        client, self.paused_client = self.paused_client, None
        if client is not None and not client.transport.is_closing():
            client.transport.resume_reading()

    def pause_reading(self) -> None:  # a 1 MiB answer faster than the client reads it
        self.read_paused = True
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.read_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()


class Client(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool, self.queue, self.req = pool, collections.deque(), None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.req, self.url, self.auth, self.parts = Req(self), b"", False, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in HOP:
            return
        if low == b"authorization":
            self.auth = True
        elif low == b"transfer-encoding" and b"chunked" in value.lower():
            self.req.chunked = True
        self.parts.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        req, url = self.req, self.url
        req.keep_alive = self.parser.should_keep_alive()
        if url == b"/readyz":
            req.fixed = RESP_READY
        elif not self.auth and not url.startswith(b"/public/"):
            req.fixed = RESP_401
        else:
            req.head = b"".join([b"%s %s HTTP/1.1\r\n" % (self.parser.get_method(), url), *self.parts, b"\r\n"])
        self.queue.append(req)
        if len(self.queue) == 1:
            self.dispatch()

    def on_body(self, data: bytes) -> None:
        if self.req.fixed is None:
            self.req.send(b"%x\r\n%s\r\n" % (len(data), data) if self.req.chunked else data)

    def on_message_complete(self) -> None:
        if self.req.fixed is None and self.req.chunked:
            self.req.send(b"0\r\n\r\n")
        self.req.done = True

    def dispatch(self) -> None:  # the request at the head of the queue (the others wait: pipelining)
        req = self.queue[0]
        if req.fixed is None:
            self.pool.acquire(req)
        else:
            self.write(req.fixed)
            self.finished(req)

    def finished(self, req: Req) -> None:
        if self.transport.is_closing():
            return
        self.queue.popleft()
        if not req.keep_alive:
            self.transport.close()
        elif self.queue:
            self.dispatch()

    def fail(self, req: Req) -> None:
        if req.answered:
            self.transport.close()
        else:
            req.keep_alive = False
            self.write(RESP_502)
            self.finished(req)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for req in self.queue:  # abandon what is in flight: its upstream connection cannot be reused
            up, req.up = req.up, None
            if up is not None:
                up.req = None
                up.transport.close()
        self.queue.clear()

    def pause_writing(self) -> None:
        if self.queue and self.queue[0].up is not None:
            self.queue[0].up.pause_reading()

    def resume_writing(self) -> None:
        if self.queue and self.queue[0].up is not None:
            self.queue[0].up.resume_reading()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    pool = Pool(*upstream)
    server = await asyncio.get_running_loop().create_server(lambda: Client(pool), *listen, backlog=4096)
    print(f"python-floor: {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]} (no token verification)", flush=True)
    await server.serve_forever()


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=address, required=True)
    p.add_argument("--upstream", type=address, required=True)
    p.add_argument("--no-mallopt", action="store_true", help="leave glibc's malloc thresholds alone")
    args = p.parse_args()
    libc = ctypes.CDLL(None)
    if not args.no_mallopt and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD: fixed (no longer moving), 16 MiB
        libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD: keep up to 16 MiB free on the heap
    uvloop.run(serve(args.listen, args.upstream))
