"""A review of the spliced answer (splice.py; upstream.py's `_Connection._try_splice`; http1's
`Request.splice_*`), through the real proxy on loopback, each case spliced and copied
(`splice.ENABLED` False) and compared: answers cut short every way (the client resetting,
closing, half-closing; the upstream closing, resetting, sending bytes past its answer later)
leave no fd, no pipe in use or non-empty in the pool, and no upstream connection carrying
another request; answers to HEAD and 204/304 answers with a Content-Length are never spliced; an
urgent byte from the upstream mid-body; an upstream trickling one-byte segments, a client with a
tiny receive window and a pipe full of small fragments with a client reading nothing, none
spinning the proxy; an upstream echoing a large upload as it reads it; a drain and a shutdown
while a splice runs.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import json
import os
import socket
import struct
import termios
import time
from typing import Any

import pytest

from proxy.http import splice
from proxy.http.splice import Splice
from proxy.telemetry.accesslog import AccessLog
from tests.integration.test_answer_spliced import CONFIG, KiB, MiB, body_of, counted, fds, get, read_answers
from tests.support.raw import bounded_by, eventually

STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"


def linger0(writer_or_sock: Any) -> None:
    """Closing this socket resets the connection (RST), as a client or server that crashed."""
    sock = writer_or_sock.get_extra_info("socket") if hasattr(writer_or_sock, "get_extra_info") else writer_or_sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Upstream:
    """A raw upstream: `/size/N` N body bytes in uneven writes; `/cut/N` a third of them, then
    it closes; `/rst/N` a third, then it resets; `/late/N` all, then (30 ms later) an answer no
    one asked for; `/head/N` a HEAD's head with `Content-Length: N`; `/headbody/N` that and N
    bytes anyway; `/304/N`, `/204/N` those statuses with `Content-Length: N` and no body;
    `/urgent/N` the body with one byte sent as TCP urgent data (not of the body) after 300 KiB;
    `/trickle/N` 10 bytes, then 1-byte segments for 1.2 s, then the rest; `/fragments/N` the body
    in 1000-byte writes loopback cannot coalesce; `/echo/N` the request's N-byte body, each
    piece written back as it is read. It keeps which connection answered each request."""

    def __init__(self) -> None:
        self.served: list[tuple[str, int]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                self.served.append((path, n))
                kind, size = path.split("/")[1], int(path.split("/")[2])
                body = body_of(size, size)
                status = {"304": b"304 Not Modified", "204": b"204 No Content"}.get(kind, b"200 OK")
                writer.write(b"HTTP/1.1 %b\r\nContent-Length: %d\r\nX-Kind: %b\r\n\r\n" % (status, size, kind.encode()))
                if kind in ("head", "304", "204"):
                    await writer.drain()
                    continue
                if kind == "echo":
                    left = size
                    while left:
                        piece = await reader.read(min(left, 64 * KiB))
                        if not piece:
                            return
                        left -= len(piece)
                        writer.write(piece)
                        await writer.drain()
                    continue
                if kind == "urgent":
                    writer.write(body[: 300 * KiB])
                    await writer.drain()
                    await asyncio.sleep(0.2)
                    with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                        raw.send(b"!", socket.MSG_OOB)  # recv(2) skips it: not of the body
                    await asyncio.sleep(0.05)
                    writer.write(body[300 * KiB :])
                    await writer.drain()
                    continue
                if kind == "trickle":
                    writer.write(body[:10])
                    await writer.drain()
                    at, until = 10, time.monotonic() + 1.2
                    while time.monotonic() < until:
                        writer.write(body[at : at + 1])
                        await writer.drain()
                        at += 1
                        await asyncio.sleep(0.002)
                    writer.write(body[at:])
                    await writer.drain()
                    continue
                if kind == "fragments":
                    await fragmented(writer, body)
                    continue
                if kind in ("cut", "rst"):
                    writer.write(body[: size // 3])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if kind == "rst":
                        linger0(writer)
                    writer.close()
                    return
                first = min(10, len(body))
                writer.write(body[:first])
                await writer.drain()
                for at in range(first, len(body), 70 * KiB + 3):
                    writer.write(body[at : at + 70 * KiB + 3])
                    await writer.drain()
                if kind == "late":
                    await asyncio.sleep(0.03)
                    writer.write(STRAY)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return


async def fragmented(writer: asyncio.StreamWriter, body: bytes) -> None:
    """`body` in 1000-byte writes, each followed by a write to another socket: loopback sends
    each as a segment of its own (one pipe buffer each when spliced), as a real network would."""
    loop = asyncio.get_running_loop()
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen()
    other = socket.create_connection(sink.getsockname())
    other_end, _ = sink.accept()
    for sock in (other, other_end):
        sock.setblocking(False)
    try:
        for at in range(0, len(body), 1000):
            writer.write(body[at : at + 1000])
            await writer.drain()
            await loop.sock_sendall(other, body[at : at + 1000])
            try:
                other_end.recv(1 << 20)
            except BlockingIOError:
                pass
    finally:
        for sock in (other, other_end, sink):
            sock.close()


async def connect(s: Any, *, rcvbuf: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = s.url.removeprefix("http://").split(":")
    if not rcvbuf:
        return await asyncio.open_connection(host, int(port))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await asyncio.open_connection(sock=sock, limit=1024)


async def exchange(s: Any, data: bytes, how: str = "read") -> list[tuple[Any, ...]]:
    """`data` sent on a new connection; then every answer read (`read`), or 1 MiB of the first
    body read and then the connection reset (`reset`) or closed (`close`), or its sending side
    shut (`half`) and what comes read."""
    reader, writer = await connect(s)
    try:
        writer.write(data)
        await writer.drain()
        if how == "read":
            return await asyncio.wait_for(read_answers(reader), 20)
        got = await asyncio.wait_for(read_answers(reader, leave_after=MiB), 20)
        if how == "reset":
            linger0(writer)
        elif how == "half":
            writer.write_eof()
            rest = 0
            while piece := await asyncio.wait_for(reader.read(MiB), 10):
                rest += len(piece)
            got.append(("half", rest < 32 * MiB))
        return got
    finally:
        writer.close()


def pipes_empty() -> bool:
    """Every pipe the pool keeps for the next body holds nothing (nothing of one body reaches another)."""
    for r, _ in splice.PIPES._free:
        if struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0"))[0]:
            return False
    return True


async def run(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, spliced: bool, cases: Any
) -> dict[str, Any]:
    """`cases(s)`: the exchanges (name -> awaitable of answers); the answers, the access log's
    lines (less time, request id and latency), the upstream's requests, and what is left."""
    made = counted(monkeypatch, spliced=spliced)
    upstream = Upstream()
    server = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{server.port}")
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    before = fds()
    answers: dict[str, Any] = {}
    for name, make in cases(s):
        answers[name] = await make
    await eventually(lambda: s.runtime.metrics.in_flight == 0, 10)
    await eventually(lambda: all(not sp.active for sp in made), 5)
    left = {"open": splice.PIPES.open, "free": len(splice.PIPES._free), "empty": pipes_empty()}
    await s.runtime.pool.close()
    await server.stop()
    s.runtime.access_log.flush()
    lines = sorted(
        json.dumps({k: v for k, v in line.items() if k not in ("time", "request_id", "latency_ms")}, sort_keys=True)
        for line in map(json.loads, stream.getvalue().splitlines())
    )
    await asyncio.sleep(0.05)
    return {
        "answers": answers,
        "lines": lines,
        "served": upstream.served,
        "spliced": len(made),
        "pipes": left,
        "fds": (before, fds()),
    }


def nothing_left(result: dict[str, Any]) -> None:
    before, after = result["fds"]
    assert after.get("socket", 0) <= before.get("socket", 0), result["fds"]
    assert after.get("pipe", 0) - before.get("pipe", 0) <= 2 * result["pipes"]["open"], result["fds"]
    assert result["pipes"]["open"] == result["pipes"]["free"], result["pipes"]
    assert result["pipes"]["empty"]


async def later(s: Any, data: bytes) -> list[tuple[Any, ...]]:
    await asyncio.sleep(0.2)
    return await exchange(s, data)


def cut_cases(s: Any) -> Any:
    # (The clients leave a body larger than loopback's socket buffers hold, so that the answer
    # is under way when they do.)
    for round_ in range(3):
        yield f"cut {round_}", exchange(s, get(f"/cut/{3 * MiB}") + get("/size/17"))
        yield f"rst {round_}", exchange(s, get(f"/rst/{3 * MiB}") + get("/size/17"))
        yield f"client reset {round_}", exchange(s, get(f"/size/{32 * MiB}"), "reset")
        yield f"client close {round_}", exchange(s, get(f"/size/{32 * MiB}"), "close")
        yield f"client half-close {round_}", exchange(s, get(f"/size/{32 * MiB}"), "half")
        yield f"late {round_}", exchange(s, get(f"/late/{MiB}", "Connection: close"))
        yield f"after late {round_}", later(s, get("/size/19", "Connection: close"))
        yield f"whole {round_}", exchange(s, get(f"/size/{MiB + round_}", "Connection: close"))
    yield "at once", many(s, 24)


async def many(s: Any, count: int) -> list[Any]:
    """`count` 2 MiB answers at once: more than the pool's 16 pipes."""
    return list(
        await asyncio.gather(*(exchange(s, get(f"/size/{2 * MiB + n}", "Connection: close")) for n in range(count)))
    )


def outcome(answers: list[tuple[Any, ...]]) -> list[Any]:
    """What a client saw, less how many bytes of an answer cut short came (timing decides)."""
    return [a if a[0] not in ("cut", "left") else a[:2] + a[3:] for a in answers]


@bounded_by(150)
async def test_answers_cut_short_every_way_leave_nothing_behind(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await run(sidecar, raw_server, monkeypatch, False, cut_cases)
    spliced = await run(sidecar, raw_server, monkeypatch, True, cut_cases)
    assert copied["spliced"] == 0
    assert spliced["spliced"] >= 15
    assert spliced["answers"].pop("at once") == copied["answers"].pop("at once")
    assert {k: outcome(v) for k, v in spliced["answers"].items()} == {
        k: outcome(v) for k, v in copied["answers"].items()
    }
    assert spliced["lines"] == copied["lines"]
    for run_ in (copied, spliced):
        nothing_left(run_)
        # An upstream connection that carried an answer not read to its exact end (cut by
        # either side, or followed by bytes no one asked for) carried nothing after it.
        served = run_["served"]
        for at, (path, n) in enumerate(served):
            if path.startswith(("/cut/", "/rst/", "/late/", f"/size/{32 * MiB}")):
                assert all(m != n for _, m in served[at + 1 :]), (path, served)


async def bodiless(s: Any, data: bytes) -> list[tuple[Any, ...]]:
    """`data` sent; the first answer's head (it has no body, whatever its Content-Length), then
    every answer after it."""
    reader, writer = await connect(s)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        kept = b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith((b"Date:", b"X-Request-Id:")))
        return [(kept,), *await asyncio.wait_for(read_answers(reader), 20)]
    finally:
        writer.close()


def bodiless_cases(s: Any) -> Any:
    after = get(f"/size/{300 * KiB}") + get("/size/5", "Connection: close")
    yield "head", bodiless(s, get(f"/head/{MiB}").replace(b"GET", b"HEAD", 1) + after)
    yield "head with a body", bodiless(s, get(f"/headbody/{MiB}").replace(b"GET", b"HEAD", 1) + after)
    yield "304", bodiless(s, get(f"/304/{MiB}") + after)
    yield "204", bodiless(s, get(f"/204/{MiB}") + after)


@bounded_by(90)
async def test_bodiless_answers_with_a_content_length_are_never_spliced(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await run(sidecar, raw_server, monkeypatch, False, bodiless_cases)
    spliced = await run(sidecar, raw_server, monkeypatch, True, bodiless_cases)
    assert spliced["answers"] == copied["answers"]
    assert spliced["lines"] == copied["lines"]
    # Only the 300 KiB answers after them were spliced (at most one a case).
    assert spliced["spliced"] <= 5
    for name, answers in copied["answers"].items():
        assert [len(a) for a in answers] == [1, 3, 3], name
        assert [a[1] for a in answers[1:]] == [300 * KiB, 5], name
    nothing_left(spliced)


def urgent_cases(s: Any) -> Any:
    yield "urgent", exchange(s, get(f"/urgent/{MiB}") + get("/size/5", "Connection: close"))


@bounded_by(60)
async def test_an_urgent_byte_from_the_upstream_is_what_it_is_copied(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await run(sidecar, raw_server, monkeypatch, False, urgent_cases)
    cpu = time.process_time()
    spliced = await run(sidecar, raw_server, monkeypatch, True, urgent_cases)
    cpu = time.process_time() - cpu
    assert [a[1] for a in copied["answers"]["urgent"]] == [MiB, 5]
    assert spliced["answers"] == copied["answers"]
    assert spliced["lines"] == copied["lines"]
    assert spliced["spliced"] >= 2  # before the urgent byte and after it
    assert cpu < 1.5, cpu
    nothing_left(spliced)


def steps_counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    steps = [0]
    step = Splice.step

    def counting(self: Splice, *args: bool) -> None:
        steps[0] += 1
        step(self, *args)

    monkeypatch.setattr(Splice, "step", counting)
    return steps


async def slow_reader(s: Any, data: bytes) -> list[tuple[Any, ...]]:
    """A client with a 4 KiB receive window that reads 4 KiB every 2 ms for a second, then all."""
    reader, writer = await connect(s, rcvbuf=4096)
    try:
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        body = b""
        until = time.monotonic() + 1.0
        while len(body) < length:
            slow = time.monotonic() < until
            piece = await asyncio.wait_for(reader.read(min(length - len(body), 4096 if slow else 64 * KiB)), 10)
            if not piece:
                break
            body += piece
            if slow:
                await asyncio.sleep(0.002)
        rest = await asyncio.wait_for(read_answers(reader), 10)
        return [(len(body), hashlib.sha256(body).hexdigest()), *rest]
    finally:
        writer.close()


async def stalled_reader(s: Any, data: bytes) -> list[tuple[Any, ...]]:
    """A client that reads nothing until after the upstream's timeout (1 s), then what came."""
    reader, writer = await connect(s)
    try:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(2.5)
        return [a[:2] for a in await asyncio.wait_for(read_answers(reader), 10)]
    finally:
        writer.close()


def slow_cases(s: Any) -> Any:
    yield "trickle", exchange(s, get(f"/trickle/{MiB}") + get("/size/5", "Connection: close"))
    yield "tiny window", slow_reader(s, get(f"/size/{2 * MiB}") + get("/size/5", "Connection: close"))
    yield "fragments to a stalled client", stalled_reader(s, get(f"/fragments/{8 * MiB}"))


@bounded_by(90)
async def test_slow_peers_do_not_spin_the_proxy(sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    copied = await run(sidecar, raw_server, monkeypatch, False, slow_cases)
    steps = steps_counted(monkeypatch)
    spliced = await run(sidecar, raw_server, monkeypatch, True, slow_cases)
    assert spliced["spliced"] >= 3
    assert spliced["answers"] == copied["answers"]
    assert spliced["lines"] == copied["lines"]
    assert [a[1] for a in copied["answers"]["trickle"]] == [MiB, 5]
    assert copied["answers"]["tiny window"][0] == (2 * MiB, hashlib.sha256(body_of(2 * MiB, 2 * MiB)).hexdigest())
    assert copied["answers"]["fragments to a stalled client"][0][0] == "cut"
    # The trickle is ~600 segments, each a step or two; the tiny window a few hundred writes;
    # the stalled client's pipe, full of fragments, waits for it to take something. A spin on
    # a readable or writable dup would be hundreds of thousands.
    assert steps[0] < 10_000, steps[0]
    nothing_left(spliced)


async def echo(s: Any, size: int) -> list[tuple[Any, ...]]:
    """A POST of `size` bytes the upstream echoes as it reads, sent while the answer is read."""
    reader, writer = await connect(s)
    body = body_of(size, 9)
    head = (
        f"POST /echo/{size} HTTP/1.1\r\nHost: sidecar.test\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    ).encode()

    async def send() -> None:
        writer.write(head)
        for at in range(0, size, 100 * KiB):
            writer.write(body[at : at + 100 * KiB])
            await writer.drain()

    sending = asyncio.ensure_future(send())
    try:
        answers = await asyncio.wait_for(read_answers(reader), 20)
        await sending
        return [(*a[:1], a[1], a[2] == hashlib.sha256(body).hexdigest()) for a in answers]
    finally:
        sending.cancel()
        writer.close()


def echo_cases(s: Any) -> Any:
    yield "echo", echo(s, 6 * MiB)
    yield "after", exchange(s, get(f"/size/{MiB}", "Connection: close"))


@bounded_by(90)
async def test_an_upstream_echoing_a_large_upload_as_it_reads_it(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await run(sidecar, raw_server, monkeypatch, False, echo_cases)
    spliced = await run(sidecar, raw_server, monkeypatch, True, echo_cases)
    assert copied["answers"]["echo"][0][1:] == (6 * MiB, True)
    assert spliced["answers"] == copied["answers"]
    assert spliced["lines"] == copied["lines"]
    assert spliced["spliced"] >= 2
    nothing_left(spliced)


async def drained(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, spliced: bool, *, stop: float | None
) -> dict[str, Any]:
    """A 16 MiB answer read slowly, and another pipelined after it; while the first is under way
    the server starts draining (`stop` None) or shuts down, giving connections `stop` seconds."""
    made = counted(monkeypatch, spliced=spliced)
    upstream = Upstream()
    raw = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{raw.port}")
    server = s.proxy.server()
    await server.listen("127.0.0.1", 0)
    host, port = server.sockets[0]
    before = fds()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(get(f"/size/{16 * MiB}") + get(f"/size/{MiB}"))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    body = await reader.readexactly(1 * MiB)
    if stop is None:
        server.start_drain()
        ending = None
    else:
        ending = asyncio.ensure_future(server.shutdown(stop))
    await asyncio.sleep(0.3)
    answers = [(head.split(b"\r\n")[0], len(body))]
    try:
        rest = await asyncio.wait_for(reader.readexactly(15 * MiB), 10)
        answers[0] = (answers[0][0], len(body) + len(rest), hashlib.sha256(body + rest).hexdigest())
        for answer in await asyncio.wait_for(read_answers(reader), 10):
            answers.append(answer)
    except (asyncio.IncompleteReadError, ConnectionError):
        answers.append(("cut",))
    writer.close()
    if ending is not None:
        await ending
    else:
        await server.shutdown(1)
    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await eventually(lambda: all(not sp.active for sp in made), 5)
    result = {
        "answers": answers,
        "spliced": len(made),
        "pipes": {"open": splice.PIPES.open, "free": len(splice.PIPES._free), "empty": pipes_empty()},
    }
    await s.runtime.pool.close()
    await raw.stop()
    await asyncio.sleep(0.05)
    result["fds"] = (before, fds())
    return result


@bounded_by(120)
async def test_a_drain_or_a_shutdown_while_a_splice_runs(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for stop in (None, 0.2):
        copied = await drained(sidecar, raw_server, monkeypatch, False, stop=stop)
        spliced = await drained(sidecar, raw_server, monkeypatch, True, stop=stop)
        assert spliced["spliced"] >= 1
        assert spliced["answers"] == copied["answers"], stop
        nothing_left(spliced)
        if stop is None:
            # Draining: both answers whole, the last one saying `Connection: close`.
            first, second = copied["answers"]
            assert first == (b"HTTP/1.1 200 OK", 16 * MiB, hashlib.sha256(body_of(16 * MiB, 16 * MiB)).hexdigest())
            assert second[1] == MiB and b"\r\nConnection: close\r\n" in second[0]
        else:
            # Shutting down with 0.2 s to go (the client reading nothing for 0.3 s): the answer
            # under way is cut at the deadline.
            assert copied["answers"][-1] == ("cut",)
