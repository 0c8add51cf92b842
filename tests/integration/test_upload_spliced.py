"""Through the real proxy, on real loopback sockets, a Content-Length upload spliced (splice.py, http1's
`_Connection._try_splice`) against the same upload copied (`splice.ENABLED` False): the client's
answers, every byte the upstream received and the access log's statuses are the same, for bodies of
1 byte to 3 MiB written in pieces, requests pipelined after a body, a client leaving mid-body, an
upstream closing mid-body and a body over the limit. The spliced runs do splice (counted), no byte
past a body's Content-Length reaches the upstream as body (the upstream parses what it got), and
no fd outlives its splice (/proc/self/fd: no pipe in use, no dup left, once each run is over).
The waits too: a client that stops mid-body gets the body's timeout (408), an upstream that
reads nothing of a spliced body the upstream's (504), and `Expect: 100-continue` its 100 first.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
from typing import Any

import pytest

from proxy.http import splice
from proxy.telemetry.accesslog import AccessLog
from tests.conftest import AUDIENCE, ISSUER
from tests.support.raw import bounded_by, eventually

KiB = 1024
MiB = 1024 * KiB
CONFIG = f"""\
realm: api
upstream: {{url: "{{raw}}", timeout: 2s, connect_timeout: 1s, max_body: 4MB}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - {{name: public, match: {{path_prefix: /}}, auth: none}}
"""


def body_of(size: int, seed: int) -> bytes:
    # Bytes that look like requests too: a body is never read as one.
    unit = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n" + bytes([seed % 256]) * 13
    return (unit * (size // len(unit) + 1))[:size]


def upload(path: str, body: bytes, *fields: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: sidecar.test", f"Content-Length: {len(body)}", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Upstream:
    """A raw upstream that parses each request (head, Content-Length body), keeps every byte it
    received per connection, and answers with the body's length and digest; `/cut` requests
    are read for `CUT` body bytes and the connection closed, unanswered; of `/stall` requests,
    nothing past the head is read for 4 s."""

    CUT = 100 * KiB

    def __init__(self) -> None:
        self.received: list[tuple[bytes, bytes]] = []  # (head less its X-Request-Id, the body or what came of it)
        self.bodies: list[tuple[str, int]] = []
        self.got = 0  # body bytes received in all

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            kept = re.sub(rb"X-Request-Id: [^\r]*\r\n", b"", head)
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if path.startswith("/stall"):
                self.received.append((kept, b""))
                await asyncio.sleep(4)  # nothing of the body read: it waits in the sockets
                writer.close()
                return
            if path.startswith("/cut"):
                part = await reader.readexactly(min(self.CUT, length))
                self.received.append((kept, part))
                writer.close()
                return
            body = b""
            while len(body) < length:
                piece = await reader.read(length - len(body))
                if not piece:
                    self.received.append((kept, body))  # the connection ended mid-body
                    return
                body += piece
                self.got += len(piece)
            self.received.append((kept, body))
            self.bodies.append((path, len(body)))
            digest = hashlib.sha256(body).hexdigest().encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(digest), digest))
            await writer.drain()


async def read_answers(reader: asyncio.StreamReader) -> list[bytes]:
    """Every answer until the connection ends (Date lines cut out)."""
    answers = []
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return answers
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        kept = [line for line in head.split(b"\r\n") if not line.lower().startswith((b"date:", b"x-request-id:"))]
        answers.append(b"\r\n".join(kept) + body)


def fds() -> dict[str, int]:
    kinds: dict[str, int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        kind = target.split(":")[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


async def client_writes(s: Any, pieces: list[bytes], *, leave: bool = False, pause: float = 0.002) -> list[bytes]:
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        try:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(pause)
        except ConnectionError:
            pass  # answered and closed before the whole request was written: the answer is read
        if leave:
            return []
        return await asyncio.wait_for(read_answers(reader), 10)
    finally:
        writer.close()


SIZES = [1, 100, 4 * KiB + 1, 64 * KiB, 300 * KiB, MiB, 3 * MiB]


def split(data: bytes, head_len: int) -> list[bytes]:
    """The head with a little of the body, then the body in uneven pieces."""
    first = head_len + min(10, len(data) - head_len)
    pieces = [data[:first]]
    step = 70 * KiB + 3
    for at in range(first, len(data), step):
        pieces.append(data[at : at + step])
    return pieces


async def scenario(sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, *, spliced: bool) -> dict[str, Any]:
    monkeypatch.setattr(splice, "ENABLED", spliced)
    made: list[splice.Splice] = []
    real = splice.Splice

    def counting(*args: Any) -> splice.Splice:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(splice, "Splice", counting)
    upstream = Upstream()
    server = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{server.port}")
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    before = fds()
    answers: dict[str, list[bytes]] = {}

    # Uploads of each size, one connection each, the body in pieces, a request pipelined after it.
    for i, size in enumerate(SIZES):
        data = upload(f"/up/{size}", body_of(size, i))
        after = b"GET /after HTTP/1.1\r\nHost: sidecar.test\r\n\r\n"
        pieces = split(data, data.index(b"\r\n\r\n") + 4)
        pieces[-1] += after  # in the same write as the body's end
        answers[f"size {size}"] = await client_writes(s, [*pieces, upload("/next", b"xyz", "Connection: close")])
    # Several bodies pipelined in one write, then one that closes the connection, then bytes
    # that must never be read as a request.
    many = b"".join(upload(f"/many/{k}", body_of(k * 200 * KiB + 7, k)) for k in range(1, 4))
    answers["pipelined"] = await client_writes(
        s, [many + upload("/last", body_of(500 * KiB, 9), "Connection: close") + b"GET /never HTTP/1.1\r\n\r\n"]
    )
    # A client that leaves mid-body, once the upstream has all it sent.
    already = upstream.got
    half = upload("/leave", body_of(MiB, 5))[: 600 * KiB]
    await client_writes(s, [half[:200], half[200:]], leave=True)
    sent = len(half) - half.index(b"\r\n\r\n") - 4
    await eventually(lambda: upstream.got >= already + sent, 5)
    # An upstream that closes mid-body.
    answers["cut"] = await client_writes(s, split(upload("/cut", body_of(2 * MiB, 6)), 60))
    # A body over the limit.
    answers["over"] = await client_writes(s, [upload("/over", body_of(5 * MiB, 7))[: 200 * KiB]])

    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await s.runtime.pool.close()
    await server.stop()
    s.runtime.access_log.flush()
    statuses = [(line["path"], line["status"]) for line in map(json.loads, stream.getvalue().splitlines())]
    await eventually(lambda: all(not sp.active for sp in made), 5)
    after_fds = fds()
    return {
        "answers": answers,
        "received": sorted(upstream.received),
        "bodies": sorted(upstream.bodies),
        "statuses": sorted(statuses),
        "spliced": len(made),
        "fds": (before, after_fds),
    }


@bounded_by(90)
async def test_the_spliced_upload_gives_what_the_copied_one_gives(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await scenario(sidecar, raw_server, monkeypatch, spliced=False)
    with monkeypatch.context() as m:
        m.setattr(splice, "PIPES", splice.Pipes(cap=0))  # no pipe to be had: every body copied
        unpiped = await scenario(sidecar, raw_server, monkeypatch, spliced=True)
    spliced = await scenario(sidecar, raw_server, monkeypatch, spliced=True)
    assert copied["spliced"] == unpiped["spliced"] == 0
    for key in ("answers", "received", "bodies", "statuses"):
        assert unpiped[key] == copied[key]
    assert spliced["spliced"] >= 8  # the larger bodies, the pipelined ones, the client leaving, the cut
    assert spliced["answers"] == copied["answers"]
    assert spliced["received"] == copied["received"]
    assert spliced["bodies"] == copied["bodies"]
    assert spliced["statuses"] == copied["statuses"]
    # What the outcomes are, both ways.
    answers = copied["answers"]
    for size in SIZES:
        assert [a.split(b"\r\n")[0] for a in answers[f"size {size}"]] == [b"HTTP/1.1 200 OK"] * 3
    assert [a.split(b"\r\n")[0] for a in answers["pipelined"]] == [b"HTTP/1.1 200 OK"] * 4
    assert ("/cut", 502) in copied["statuses"]  # (the client, still writing, may get a reset before the answer)
    assert ("/over", 413) in copied["statuses"]
    assert ("/leave", 499) in copied["statuses"]
    assert ("/never", 200) not in copied["statuses"]
    # No fd outlives a splice: the pipes left are the pool's free ones, no dup is left.
    before, after = spliced["fds"]
    assert splice.PIPES.open == len(splice.PIPES._free)
    assert after.get("socket", 0) <= before.get("socket", 0)
    assert after.get("pipe", 0) - before.get("pipe", 0) <= 2 * splice.PIPES.open


STALL_CONFIG = CONFIG.replace("timeout: 2s", "timeout: 1s").replace("max_body: 4MB", "max_body: 64MB")


async def stalls(sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, *, spliced: bool) -> dict[str, Any]:
    monkeypatch.setattr(splice, "ENABLED", spliced)
    made: list[splice.Splice] = []
    real = splice.Splice

    def counting(*args: Any) -> splice.Splice:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(splice, "Splice", counting)
    upstream = Upstream()
    server = await raw_server(upstream)
    s = await sidecar(STALL_CONFIG, raw=f"http://127.0.0.1:{server.port}")
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    answers: dict[str, list[bytes]] = {}
    host, port = s.url.removeprefix("http://").split(":")

    # A client that stops mid-body: the body's per-read timeout (1 s).
    data = upload("/slow", body_of(MiB, 1))
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data[:100])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(data[100 : 500 * KiB])
    answers["slow client"] = await asyncio.wait_for(read_answers(reader), 10)
    writer.close()
    # An upstream that reads nothing of the body: the upstream's timeout (1 s) while it waits.
    reader, writer = await asyncio.open_connection(host, int(port))
    data = upload("/stall", body_of(40 * MiB, 2))
    writer.write(data[:200])
    await writer.drain()

    async def rest() -> None:
        try:
            writer.write(data[200:])
            await writer.drain()
        except ConnectionError:
            pass

    pushing = asyncio.ensure_future(rest())
    answers["stalled upstream"] = await asyncio.wait_for(read_answers(reader), 10)
    pushing.cancel()
    writer.close()
    # Expect: 100-continue, then the body.
    reader, writer = await asyncio.open_connection(host, int(port))
    body = body_of(2 * MiB, 3)
    head, _, _ = upload("/continue", body, "Expect: 100-continue", "Connection: close").partition(body)
    writer.write(head)
    interim = await reader.readuntil(b"\r\n\r\n")
    writer.write(body)
    answers["continue"] = [interim, *await asyncio.wait_for(read_answers(reader), 10)]
    writer.close()

    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await s.runtime.pool.close()
    s.runtime.access_log.flush()
    statuses = [(line["path"], line["status"]) for line in map(json.loads, stream.getvalue().splitlines())]
    await eventually(lambda: all(not sp.active for sp in made), 5)
    return {"answers": answers, "statuses": sorted(statuses), "spliced": len(made), "bodies": sorted(upstream.bodies)}


@bounded_by(90)
async def test_timeouts_and_waits_are_those_of_the_copied_upload(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await stalls(sidecar, raw_server, monkeypatch, spliced=False)
    spliced = await stalls(sidecar, raw_server, monkeypatch, spliced=True)
    assert copied["spliced"] == 0
    assert spliced["spliced"] == 3  # each body, the one the upstream never reads too (the pipe full: 504, not 408)
    assert spliced["answers"] == copied["answers"]
    assert spliced["statuses"] == copied["statuses"]
    assert spliced["bodies"] == copied["bodies"] == [("/continue", 2 * MiB)]
    assert [a[:12] for a in copied["answers"]["slow client"]] == [b"HTTP/1.1 408"]  # the body's timeout
    assert [a[:12] for a in copied["answers"]["stalled upstream"]] == [b"HTTP/1.1 504"]  # the upstream's
    assert splice.PIPES.open == len(splice.PIPES._free)


async def urgent(sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, *, spliced: bool) -> dict[str, Any]:
    """An upload with one byte sent as TCP urgent data in its body (recv(2) skips it: the body is
    the rest), then a request pipelined after it."""
    import socket
    import time

    monkeypatch.setattr(splice, "ENABLED", spliced)
    made: list[splice.Splice] = []
    real = splice.Splice

    def counting(*args: Any) -> splice.Splice:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(splice, "Splice", counting)
    upstream = Upstream()
    server = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{server.port}")
    host, port = s.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    body = body_of(300 * KiB, 3)
    data = upload("/urgent", body)
    at = data.index(b"\r\n\r\n") + 4 + 100 * KiB
    sock = socket.create_connection((host, int(port)))
    sock.setblocking(False)
    cpu = time.process_time()
    began = loop.time()
    try:
        await loop.sock_sendall(sock, data[:at])
        await asyncio.sleep(0.2)  # spliced by now
        sock.send(b"!", socket.MSG_OOB)  # not of the body: recv skips it
        await asyncio.sleep(0.05)
        await loop.sock_sendall(sock, data[at:] + upload("/next", b"xyz", "Connection: close"))
        reader, writer = await asyncio.open_connection(sock=sock)
        answers = await asyncio.wait_for(read_answers(reader), 10)
        writer.close()
    finally:
        sock.close()
    took, cpu = loop.time() - began, time.process_time() - cpu
    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await s.runtime.pool.close()
    await server.stop()
    return {"answers": answers, "bodies": sorted(upstream.bodies), "spliced": len(made), "took": took, "cpu": cpu}


@bounded_by(60)
async def test_urgent_data_in_a_spliced_body_is_what_it_is_copied(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # splice(2) stops at the urgent mark and says EAGAIN with the socket readable: the splice
    # must not wait there (spinning on its readable dup until the body's timeout, 408) while the
    # copied upload reads past it (recv skips the urgent byte) and is answered 200.
    copied = await urgent(sidecar, raw_server, monkeypatch, spliced=False)
    spliced = await urgent(sidecar, raw_server, monkeypatch, spliced=True)
    assert [a.split(b"\r\n")[0] for a in copied["answers"]] == [b"HTTP/1.1 200 OK"] * 2
    assert spliced["spliced"] >= 1
    assert spliced["answers"] == copied["answers"]
    assert spliced["bodies"] == copied["bodies"]
    assert spliced["took"] < 1.0 and spliced["cpu"] < 1.0, spliced


@bounded_by(60)
async def test_a_stalled_upstream_does_not_spin_the_proxy_on_a_pipe_full_of_small_fragments(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From a real network a body comes in ~1448-byte fragments, one pipe buffer each: a 256 KiB
    # pipe (64 buffers) is full at ~90 KiB. Here the client's writes are interleaved with writes
    # to another socket, so loopback cannot coalesce them either. The upstream reads nothing:
    # the splice waits for it (504 after its 1 s), it must not poll the client's readable dup.
    import socket

    steps = 0
    step = splice.Splice.step

    def counting(self: splice.Splice, *args: bool) -> None:
        nonlocal steps
        steps += 1
        step(self, *args)

    monkeypatch.setattr(splice.Splice, "step", counting)
    upstream = Upstream()
    server = await raw_server(upstream)
    s = await sidecar(STALL_CONFIG, raw=f"http://127.0.0.1:{server.port}")
    host, port = s.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen()
    other = socket.create_connection(sink.getsockname())
    other_end, _ = sink.accept()
    other_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client = socket.create_connection((host, int(port)))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for sock in (client, other, other_end):
        sock.setblocking(False)
    data = upload("/stall", body_of(40 * MiB, 2))

    async def push() -> None:
        try:
            await loop.sock_sendall(client, data[:200])
            for at in range(200, len(data), 1000):
                await loop.sock_sendall(client, data[at : at + 1000])
                await loop.sock_sendall(other, data[at : at + 1000])
                try:
                    other_end.recv(1 << 20)
                except BlockingIOError:
                    pass
        except OSError:
            pass

    pushing = asyncio.ensure_future(push())
    answer = b""
    while b"\r\n\r\n" not in answer:
        piece = await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
        if not piece:
            break
        answer += piece
    pushing.cancel()
    for sock in (client, other, other_end, sink):
        sock.close()
    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await s.runtime.pool.close()
    await server.stop()
    assert answer.startswith(b"HTTP/1.1 504")
    assert steps < 5000, f"{steps} steps for one stalled body"


async def answered_early(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, *, spliced: bool
) -> dict[str, Any]:
    """An upstream that answers 413 with `Connection: close` after 300 KiB of a 20 MiB body and
    reads nothing more (its socket left open: it will close it later)."""
    monkeypatch.setattr(splice, "ENABLED", spliced)
    made: list[splice.Splice] = []
    real = splice.Splice

    def counting(*args: Any) -> splice.Splice:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(splice, "Splice", counting)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(300 * KiB)
        writer.write(b"HTTP/1.1 413 Too Big\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
        await writer.drain()
        await asyncio.sleep(3)
        writer.close()

    server = await raw_server(handler)
    s = await sidecar(STALL_CONFIG, raw=f"http://127.0.0.1:{server.port}")
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = upload("/early", body_of(20 * MiB, 2))

    async def push() -> None:
        try:
            for at in range(0, len(data), 64 * KiB):
                writer.write(data[at : at + 64 * KiB])
                await writer.drain()
        except ConnectionError:
            pass

    pushing = asyncio.ensure_future(push())
    answers = await asyncio.wait_for(read_answers(reader), 10)
    pushing.cancel()
    writer.close()
    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await s.runtime.pool.close()
    await server.stop()
    await eventually(lambda: all(not sp.active for sp in made), 5)
    return {"answers": [a.split(b"\r\n")[0] for a in answers], "spliced": len(made)}


@bounded_by(60)
async def test_an_upstream_answering_early_and_closing_is_relayed_as_when_copied(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The upstream answers and is closing (RFC 9112 §9.5), reading nothing more: the body stops
    # and its answer goes to the client. Copied, the next read's write sees the answer and stops;
    # spliced, the pipe is full and nothing moves, so nothing sees it: the body's timeout (408).
    copied = await answered_early(sidecar, raw_server, monkeypatch, spliced=False)
    spliced = await answered_early(sidecar, raw_server, monkeypatch, spliced=True)
    assert copied["answers"] == [b"HTTP/1.1 413 Too Big"]
    assert spliced["spliced"] >= 1
    assert spliced["answers"] == copied["answers"]
