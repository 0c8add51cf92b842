"""A request to a target forwarded before is taken on by the server's `Quick` hook, from its head,
with no `Request` made (app.py's `Proxy._head`, http1.py's `Ahead`): what the client, the upstream, the
access log and the metrics see is exactly what the `Request` way gives (the hook declining, so
that `_entry` takes the request), for every kind of answer: whole, to a HEAD, 204 and 304 (written
by a `Request` made then), streamed (a task from there), a timeout (a 504 written by a `Request`),
no idle upstream connection (the forward goes on as a task), a refusal, and pipelined requests
(answered in their order, those behind waiting)."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from proxy.http.http1 import Later
from proxy.request import app
from proxy.telemetry.accesslog import AccessLog
from tests.integration.test_answer_splice_review import linger0
from tests.integration.test_forward_now import connect, read_answer, request, serving, start
from tests.support.raw import bounded_by, eventually

BIG = 100 * 1024  # past forward.py's SMALL_BODY: streamed by a task
CASES = {
    "whole": ("GET", b"HTTP/1.1 200 OK\r\nX-Up: 1\r\nContent-Length: 2\r\n\r\nok"),
    "head": ("HEAD", b"HTTP/1.1 200 OK\r\nX-Up: 1\r\nContent-Length: 2\r\n\r\n"),
    "204": ("GET", b"HTTP/1.1 204 No Content\r\nX-Up: 1\r\n\r\n"),
    "304": ("GET", b"HTTP/1.1 304 Not Modified\r\nX-Up: 1\r\nContent-Length: 9\r\n\r\n"),
    "404": (
        "DELETE",
        b"HTTP/1.1 404 Not Found\r\nKeep-Alive: timeout=5\r\nX-Request-Id: theirs\r\nContent-Length: 1\r\n\r\nx",
    ),
    "streamed": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (BIG, b"b" * BIG)),
    "chunked": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
}


async def run(
    sidecar: Any,
    raw_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    per_request: Any,
    script: Any,
    *,
    hook: bool,
    timeout: str = "2s",
) -> tuple[list[bytes], list[bytes], list[dict[str, Any]], dict[Any, float], int]:
    """Serve `script(reader, writer)` (what the client sends and reads: its answers) in front of an
    upstream answering `per_request`; with the hook taking requests on, or declining every one
    (`Proxy._head` says False: `_entry` takes it). The client's answers (Date cut off), the heads the
    upstream got, the access-log lines (time and latency cut off), requests_total, and how
    many requests the hook took on (1 each; 1000 each for one it then made a `Request`)."""
    heads: list[bytes] = []
    taken: list[int] = []
    real = app.Proxy._head

    def quick(proxy: Any, *args: Any) -> Any:  # (the public route here: no 401s to answer)
        if not hook:
            return False
        answered = real(proxy, *args)
        if isinstance(answered, Later):
            taken.append(1)
        elif answered is True:
            taken.append(1000)  # (taken on, then gone on as a `Request`: counted apart)
        return answered

    monkeypatch.setattr(app.Proxy, "_head", quick)  # (the server is made with it: `Proxy.server`)

    def each(n: int, index: int, head: bytes) -> Any:
        heads.append(head)
        return per_request(n, index, head)

    s, _, _ = await start(sidecar, raw_server, serving(each), timeout=timeout)
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    reader, writer = await connect(s)
    try:
        answers = await script(reader, writer)
    finally:
        writer.close()
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    s.runtime.access_log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        del line["time"], line["latency_ms"]
    totals = dict(s.runtime.metrics.route("public").totals())
    monkeypatch.setattr(app.Proxy, "_head", real)
    return [_undated(answer) for answer in answers], heads, lines, totals, sum(taken)


def _undated(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"Date: ")) + b"\r\n\r\n" + body


def sequential(method: str, path: str, times: int, *, bodiless: bool = False) -> Any:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        answers = []
        for _ in range(times):
            writer.write(request(path, method))
            if method == "HEAD" or bodiless:
                answers.append(await reader.readuntil(b"\r\n\r\n"))
            else:
                answers.append(await read_answer(reader))
        return answers

    return script


@pytest.mark.parametrize("case", list(CASES))
@bounded_by(30)
async def test_a_request_taken_on_from_its_head_is_answered_as_the_request_way_answers_it(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    method, answer = CASES[case]
    script = sequential(method, f"/{case}", 4, bodiless=case == "304")
    ours = await run(sidecar, raw_server, monkeypatch, lambda n, i, h: answer, script, hook=True)
    theirs = await run(sidecar, raw_server, monkeypatch, lambda n, i, h: answer, script, hook=False)
    # The first prepares the target; the hook takes the rest: forwarded on the idle connection,
    # or (no upstream connection kept after a HEAD or a 304) gone on as a `Request`.
    assert ours[4] == (3000 if case in ("head", "304") else 3) and theirs[4] == 0
    assert ours[:4] == theirs[:4]
    answers, heads, lines, _, _ = ours
    assert answers == [answers[0]] * 4 and heads == [heads[0]] * 4 and lines == [lines[0]] * 4
    assert b"X-Request-Id: rid-%b\r\n" % case.encode() in answers[0] and b"theirs" not in answers[0]


@bounded_by(30)
async def test_pipelined_requests_behind_one_taken_on_are_answered_in_their_order(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def each(n: int, index: int, head: bytes) -> bytes:
        path = head.split(b" ")[1]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        answers = []
        for path in ("/p0", "/p1", "/p2"):  # each target prepared
            writer.write(request(path))
            answers.append(await read_answer(reader))
        # then pipelined: a target taken on, one never seen (the `Request` way), a HEAD, again
        writer.write(request("/p0") + request("/new") + request("/p1") + request("/p2", "HEAD") + request("/p2"))
        for _ in range(3):
            answers.append(await read_answer(reader))
        answers.append(await reader.readuntil(b"\r\n\r\n"))
        answers.append(await read_answer(reader))
        return answers

    ours = await run(sidecar, raw_server, monkeypatch, each, script, hook=True)
    theirs = await run(sidecar, raw_server, monkeypatch, each, script, hook=False)
    assert ours[4] >= 1 and theirs[4] == 0
    assert ours[:4] == theirs[:4]
    bodies = [answer.split(b"\r\n\r\n")[1] for answer in ours[0]]
    assert bodies == [b"/p0", b"/p1", b"/p2", b"/p0", b"/new", b"/p1", b"", b"/p2"]


@bounded_by(30)
async def test_a_timeout_and_no_idle_connection_are_answered_as_the_request_way_answers_them(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first request on each upstream connection is answered; the second waits past the
    # upstream's timeout (a 504, the connection dropped), so the third finds no idle connection.
    async def each(n: int, index: int, head: bytes) -> bytes:
        if index > 1:
            await asyncio.sleep(5)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    script = sequential("GET", "/slow", 4)
    ours = await run(sidecar, raw_server, monkeypatch, each, script, hook=True, timeout="0.3s")
    theirs = await run(sidecar, raw_server, monkeypatch, each, script, hook=False, timeout="0.3s")
    assert ours[4] >= 1 and theirs[4] == 0
    assert ours[:4] == theirs[:4]
    statuses = [int(answer.split(b" ")[1]) for answer in ours[0]]
    assert statuses == [200, 504, 200, 504]


@bounded_by(30)
async def test_a_client_gone_before_its_answer_is_recorded_as_the_request_way_records_it(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()

    async def each(n: int, index: int, head: bytes) -> bytes:
        if index > 1:
            await release.wait()
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        writer.write(request("/gone"))
        answers = [await read_answer(reader)]
        writer.write(request("/gone"))
        await asyncio.sleep(0.2)
        # The client leaves before the second answer, with a reset: a FIN alone may be a
        # half-close, whose request is still answered (test_connection_close.py).
        linger0(writer)
        return answers

    ours = await run(sidecar, raw_server, monkeypatch, each, script, hook=True)
    release.set()
    release.clear()
    theirs = await run(sidecar, raw_server, monkeypatch, each, script, hook=False)
    release.set()
    assert ours[4] == 1 and theirs[4] == 0
    assert ours[:4] == theirs[:4]
    assert [line["status"] for line in ours[2]] == [200, 499]
