"""Through the real proxy, on real loopback sockets, large Content-Length answers spliced from the
upstream's socket into the client's (splice.py, upstream.py's `_Connection._try_splice`) against
the same answers copied (`splice.ENABLED` False) and with no pipe to be had: the client's bytes,
the access log's statuses and the upstream connections used are the same, for bodies around
`splice.ANSWER_MIN` up to 10 MiB written in pieces, requests pipelined after a spliced answer on
the same client connection, an upstream connection reused after a spliced answer, an upstream
closing mid-body, a client closing mid-body and an upstream sending more than its Content-Length.
The spliced runs do splice (counted), and no fd outlives its splice (/proc/self/fd: no pipe in
use, no dup left, once each run is over). The waits too: an upstream that stops mid-body and a
client that stops reading mid-body are cut after the upstream's timeout, as when copied.
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
upstream: {{url: "{{raw}}", timeout: 1s, connect_timeout: 1s}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - {{name: public, match: {{path_prefix: /}}, auth: none}}
"""
MIN = splice.ANSWER_MIN
# Around the least spliced (what is left after the read that brought the head decides), and large.
SIZES = [64 * KiB + 1, MIN - 1, MIN + 1, MIN + 16 * KiB + 1, 200 * KiB, MiB, 10 * MiB]
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"


def body_of(size: int, seed: int) -> bytes:
    # Bytes that look like answers too: a body is never read as one.
    unit = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc" + bytes([seed % 256]) * 11
    return (unit * (size // len(unit) + 1))[:size]


class Upstream:
    """A raw upstream answering `/size/N` with N body bytes in uneven writes; `/extra/N` the same
    and more bytes in the write of its end; `/cut/N` a third of them, then it closes; `/stall/N`
    200 KiB of them, then nothing for 3 s. It keeps which connection answered each request."""

    def __init__(self) -> None:
        self.served: list[tuple[str, int]] = []  # (path, its connection's number)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                self.served.append((path, n))
                kind, size = path.split("/")[1], int(path.split("/")[2])
                body = body_of(size, size)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Kind: %b\r\n\r\n" % (size, kind.encode()))
                if kind == "cut":
                    body = body[: size // 3]
                elif kind == "stall":
                    writer.write(body[: 200 * KiB])
                    await writer.drain()
                    await asyncio.sleep(3)
                    writer.close()
                    return
                first = min(10, len(body))
                writer.write(body[:first])
                await writer.drain()
                step = 70 * KiB + 3
                for at in range(first, len(body), step):
                    piece = body[at : at + step]
                    if kind == "extra" and at + step >= len(body):
                        piece += STRAY  # past the Content-Length, in the same write
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
                if kind == "cut":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return


def get(path: str, *fields: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: sidecar.test", *fields]) + "\r\n\r\n").encode()


async def read_answers(reader: asyncio.StreamReader, *, leave_after: int = 0) -> list[tuple[Any, ...]]:
    """Every answer until the connection ends, as (head less Date and X-Request-Id, body length,
    digest); an answer cut short as ("cut", head, bytes got, whether they are the body's start).
    `leave_after`: stop reading once this many body bytes came (the caller then closes)."""
    answers: list[tuple[Any, ...]] = []
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return answers
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        kept = b"\r\n".join(
            line for line in head.split(b"\r\n") if not line.lower().startswith((b"date:", b"x-request-id:"))
        )
        body = b""
        while len(body) < length:
            try:
                piece = await reader.read(min(length - len(body), 64 * KiB))
            except ConnectionError:
                piece = b""
            if not piece:
                break
            body += piece
            if leave_after and len(body) >= leave_after:
                answers.append(("left", kept))
                return answers
        if len(body) < length:
            answers.append(("cut", kept, len(body), body == body_of(length, length)[: len(body)]))
            return answers
        answers.append((kept, len(body), hashlib.sha256(body).hexdigest()))


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


async def exchange(s: Any, data: bytes, *, leave_after: int = 0, read: bool = True) -> list[tuple[Any, ...]]:
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        if not read:
            await asyncio.sleep(2.5)  # reading nothing: past the upstream's timeout (1 s)
            return await asyncio.wait_for(read_answers(reader), 10)
        return await asyncio.wait_for(read_answers(reader, leave_after=leave_after), 20)
    finally:
        writer.close()


def counted(monkeypatch: pytest.MonkeyPatch, *, spliced: bool) -> list[splice.Splice]:
    monkeypatch.setattr(splice, "ENABLED", spliced)
    made: list[splice.Splice] = []
    real = splice.Splice

    def counting(*args: Any) -> splice.Splice:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(splice, "Splice", counting)
    return made


async def scenario(sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, *, spliced: bool) -> dict[str, Any]:
    made = counted(monkeypatch, spliced=spliced)
    upstream = Upstream()
    server = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{server.port}")
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    before = fds()
    answers: dict[str, list[tuple[Any, ...]]] = {}

    # Each size on a connection of its own, a request pipelined after it in the same write.
    for size in SIZES:
        answers[f"size {size}"] = await exchange(s, get(f"/size/{size}") + get("/size/100", "Connection: close"))
    # Several large answers pipelined on one connection, a small one last.
    answers["pipelined"] = await exchange(
        s,
        get(f"/size/{MiB}") + get(f"/size/{300 * KiB}") + get(f"/size/{2 * MiB}") + get("/size/7", "Connection: close"),
    )
    # The upstream connection that carried a spliced answer is reused (once idle past the
    # pool's probation) for the next request.
    await asyncio.sleep(0.2)
    answers["reused"] = await exchange(s, get(f"/size/{MiB + 5}", "Connection: close"))
    await asyncio.sleep(0.2)
    answers["reused"] += await exchange(s, get("/size/11", "Connection: close"))
    # An upstream that sends more than its Content-Length: the client gets the answer and the
    # request after it; the upstream connection is never reused.
    answers["extra"] = await exchange(s, get(f"/extra/{600 * KiB}") + get("/size/13", "Connection: close"))
    # An upstream closing mid-body: the client's connection is cut after what came.
    answers["cut"] = await exchange(s, get(f"/cut/{3 * MiB}") + get("/size/17"))
    # A client closing mid-body: the upstream's connection is dropped.
    answers["left"] = await exchange(s, get(f"/size/{10 * MiB + 1}"), leave_after=300 * KiB)

    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await s.runtime.pool.close()
    await server.stop()
    s.runtime.access_log.flush()
    statuses = [(line["path"], line["status"]) for line in map(json.loads, stream.getvalue().splitlines())]
    await eventually(lambda: all(not sp.active for sp in made), 5)
    after = fds()
    # Which upstream connection carried what: how many are made depends on timing (the pool's
    # probation of a new origin), so what is compared is what matters.
    served = dict(upstream.served)
    used_before = {
        n
        for path, n in upstream.served[: upstream.served.index((f"/extra/{600 * KiB}", served[f"/extra/{600 * KiB}"]))]
    }
    connections = {
        # the spliced answer's connection carried the next request
        "reused": served[f"/size/{MiB + 5}"] == served["/size/11"],
        # never reused after the bytes past its answer, nor any other (its origin distrusted)
        "extra": served["/size/13"] not in used_before | {served[f"/extra/{600 * KiB}"]},
    }
    return {
        "answers": answers,
        "statuses": sorted(statuses),
        "connections": connections,
        "spliced": len(made),
        "fds": (before, after),
    }


@bounded_by(150)
async def test_the_spliced_answer_gives_what_the_copied_one_gives(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await scenario(sidecar, raw_server, monkeypatch, spliced=False)
    with monkeypatch.context() as m:
        m.setattr(splice, "PIPES", splice.Pipes(cap=0))  # no pipe to be had: every answer copied
        unpiped = await scenario(sidecar, raw_server, monkeypatch, spliced=True)
    spliced = await scenario(sidecar, raw_server, monkeypatch, spliced=True)
    assert copied["spliced"] == unpiped["spliced"] == 0
    for run in (unpiped, spliced):
        assert run["answers"] == copied["answers"]
        assert run["statuses"] == copied["statuses"]
        assert run["connections"] == copied["connections"] == {"reused": True, "extra": True}
    # The answers over the least spliced were (not the smaller ones: at least 1 MiB, 10 MiB,
    # 3 pipelined, the reused, the extra, the cut and the one the client left).
    assert spliced["spliced"] >= 9
    # What the outcomes are, both ways.
    answers = copied["answers"]
    for size in SIZES:
        got = answers[f"size {size}"]
        assert [(a[1], a[0].split(b"\r\n")[0]) for a in got] == [(size, b"HTTP/1.1 200 OK"), (100, b"HTTP/1.1 200 OK")]
        assert got[0][2] == hashlib.sha256(body_of(size, size)).hexdigest()
    assert [a[1] for a in answers["pipelined"]] == [MiB, 300 * KiB, 2 * MiB, 7]
    assert [a[1] for a in answers["extra"]] == [600 * KiB, 13]
    cut = answers["cut"]
    assert len(cut) == 1 and cut[0][0] == "cut" and cut[0][3]  # the body's start, then the end
    assert answers["left"][0][0] == "left"
    assert ("/extra/614400", 200) in copied["statuses"]
    # No fd outlives a splice: the pipes left are the pool's free ones, no dup is left.
    before, after = spliced["fds"]
    assert splice.PIPES.open == len(splice.PIPES._free)
    assert after.get("socket", 0) <= before.get("socket", 0)
    assert after.get("pipe", 0) - before.get("pipe", 0) <= 2 * splice.PIPES.open


async def stalls(sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, *, spliced: bool) -> dict[str, Any]:
    made = counted(monkeypatch, spliced=spliced)
    upstream = Upstream()
    server = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{server.port}")
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    before = fds()
    answers = {
        # The upstream stops mid-body: its timeout (1 s), then the client's connection is cut.
        "stalled upstream": await exchange(s, get(f"/stall/{MiB}")),
        # The client reads nothing of a large answer: the same timeout while the sidecar waits
        # for it to take bytes, then its connection is cut (what it read after is what it got).
        "stalled client": [a[:2] for a in await exchange(s, get(f"/size/{64 * MiB}"), read=False)],
    }
    await eventually(lambda: s.runtime.metrics.in_flight == 0, 5)
    await s.runtime.pool.close()
    await server.stop()
    s.runtime.access_log.flush()
    statuses = [(line["path"], line["status"]) for line in map(json.loads, stream.getvalue().splitlines())]
    await eventually(lambda: all(not sp.active for sp in made), 5)
    return {"answers": answers, "statuses": sorted(statuses), "spliced": len(made), "fds": (before, fds())}


@bounded_by(60)
async def test_timeouts_are_those_of_the_copied_answer(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = await stalls(sidecar, raw_server, monkeypatch, spliced=False)
    spliced = await stalls(sidecar, raw_server, monkeypatch, spliced=True)
    assert copied["spliced"] == 0
    assert spliced["spliced"] == 2
    assert spliced["answers"] == copied["answers"]
    assert spliced["statuses"] == copied["statuses"]
    stalled = copied["answers"]["stalled upstream"]
    assert len(stalled) == 1 and stalled[0][0] == "cut" and stalled[0][2] == 200 * KiB and stalled[0][3]
    assert copied["answers"]["stalled client"][0][0] == "cut"
    before, after = spliced["fds"]
    assert splice.PIPES.open == len(splice.PIPES._free)
    assert after.get("socket", 0) <= before.get("socket", 0)
    assert re.fullmatch(r"HTTP/1\.1 200 OK", copied["answers"]["stalled client"][0][1].split(b"\r\n")[0].decode())
