"""A request to a public route without CORS, forwarded before, is forwarded from its head with no
`Exchange` made (app.py's `_Public`), its common answer relayed and recorded from what the
first answer of its status prepared (`ForwardPlan.answered`). What the client, the upstream, the
access log and the metrics see is exactly what the `Request` way gives (the server's hook
declining, so that `_entry` takes every request): for answers of many statuses on one target
(each run of one status recorded from the forward's record of the last), an upstream that fails (a 502), no access log,
and a reload while an answer is awaited (recorded under the config the request came in on)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.ops.reload import reload
from proxy.request import app
from proxy.telemetry.accesslog import AccessLog
from tests.integration.test_forward_from_head import _undated
from tests.integration.test_forward_now import connect, read_answer, request, serving, start
from tests.support.raw import bounded_by, eventually

STATUSES = [200] * 3 + [404] * 3 + [201] * 3 + [500, 500, 503, 503, 503, 418, 418, 418, 200, 404, 404, 202, 202, 200]
"""Answers to one target, one after another: statuses coming back after others, each but
the last a few times running (the upstream connection takes an answer with the head of the one
before it as the common answer, `again_whole`; a head that changed the general way)."""


def answer_of(status: int) -> bytes:
    body = b"s%d" % status
    return b"HTTP/1.1 %d Whatever\r\nX-Up: 1\r\nContent-Length: %d\r\n\r\n%b" % (status, len(body), body)


async def run(
    sidecar: Any,
    raw_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    per_request: Any,
    script: Any,
    *,
    hook: bool,
    logged: bool = True,
) -> tuple[list[bytes], list[bytes], list[dict[str, Any]], dict[Any, float], int]:
    """Serve `script(s, reader, writer)` in front of an upstream answering `per_request`, with the
    hook taking requests on, or declining every one (`_entry` takes it): the client's answers
    (Date cut off), the heads the upstream got, the access-log lines (time and latency cut off),
    requests_total of every route, and how many requests `_Public` forwarded."""
    heads: list[bytes] = []
    public: list[int] = []
    real_head = app.Proxy._head

    def quick(proxy: Any, *args: Any) -> Any:
        if not hook:
            return False
        answered = real_head(proxy, *args)
        if isinstance(answered, app._Public):
            public.append(1)
        return answered

    monkeypatch.setattr(app.Proxy, "_head", quick)  # (the server is made with it: `Proxy.server`)

    def each(n: int, index: int, head: bytes) -> Any:
        heads.append(head)
        return per_request(n, index, head)

    s, _, _ = await start(sidecar, raw_server, serving(each))
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream) if logged else None
    reader, writer = await connect(s)
    try:
        answers = await script(s, reader, writer)
    finally:
        writer.close()
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    lines = []
    if logged:
        s.runtime.access_log.flush()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        for line in lines:
            del line["time"], line["latency_ms"]
    totals = {
        (name, *key): n for name in ("public", "open") for key, n in s.runtime.metrics.route(name).totals().items() if n
    }
    monkeypatch.setattr(app.Proxy, "_head", real_head)
    return [_undated(answer) for answer in answers], heads, lines, totals, len(public)


def sequential(paths: list[str]) -> Any:
    async def script(s: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        answers = []
        for path in paths:
            writer.write(request(path))
            answers.append(await read_answer(reader))
        return answers

    return script


@pytest.mark.parametrize("logged", [True, False])
@bounded_by(30)
async def test_answers_of_many_statuses_are_relayed_and_recorded_as_the_request_way_does(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch, logged: bool
) -> None:
    counter = iter(range(10_000))

    def each(n: int, index: int, head: bytes) -> bytes:
        return answer_of(STATUSES[next(counter) % len(STATUSES)])

    script = sequential(["/many"] * len(STATUSES))
    ours = await run(sidecar, raw_server, monkeypatch, each, script, hook=True, logged=logged)
    counter = iter(range(10_000))
    theirs = await run(sidecar, raw_server, monkeypatch, each, script, hook=False, logged=logged)
    # The first prepares the target; `_Public` forwards the rest, on the idle connection.
    assert ours[4] == len(STATUSES) - 1 and theirs[4] == 0
    assert ours[:4] == theirs[:4]
    answers, heads, lines, totals, _ = ours
    assert [int(answer.split(b" ")[1]) for answer in answers] == STATUSES
    assert heads == [heads[0]] * len(STATUSES)
    assert [line["status"] for line in lines] == (STATUSES if logged else [])
    assert sum(totals.values()) == len(STATUSES)


@bounded_by(30)
async def test_every_path_of_a_public_route_is_recorded_as_the_request_way_does(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More paths than an answered series keeps its line's middle part for (`_MIDDLES`): each
    # forward keeps its own, so that every path is recorded the quick way.
    paths = [f"/p{i}?q={i}" for i in range(7)] + ["/%C3%A9t%C3%A9", "/a/./b//c"]
    recorded: list[bool] = []

    async def checked(s: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        answers = []
        for index, path in enumerate(paths):
            for _ in range(3):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: sidecar.test\r\nX-Request-Id: rid-{index}\r\n\r\n".encode())
                answers.append(await read_answer(reader))
        recorded.extend(forward.answered is not None for forward in s.runtime.snapshot.forwards._values.values())
        return answers

    ours = await run(sidecar, raw_server, monkeypatch, lambda n, i, h: answer_of(200), checked, hook=True)
    theirs = await run(sidecar, raw_server, monkeypatch, lambda n, i, h: answer_of(200), checked, hook=False)
    assert ours[4] == 2 * len(paths) and theirs[4] == 0
    assert ours[:4] == theirs[:4]
    assert len(recorded) == 2 * len(paths) and all(recorded[: len(paths)])  # (ours; theirs took none)
    assert [line["path"] for line in ours[2]] == [line["path"] for line in theirs[2]]


@bounded_by(30)
async def test_an_upstream_that_fails_is_answered_as_the_request_way_answers_it(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /fail: the upstream closes without answering, on the reused connection and on the retry's
    # new one (a 502); /ok between them leaves an idle connection for the next /fail.
    def each(n: int, index: int, head: bytes) -> bytes | None:
        return None if b" /fail " in head else answer_of(200)

    script = sequential(["/ok", "/fail", "/ok", "/fail", "/ok", "/fail", "/ok"])
    ours = await run(sidecar, raw_server, monkeypatch, each, script, hook=True)
    theirs = await run(sidecar, raw_server, monkeypatch, each, script, hook=False)
    assert ours[4] == 2 and theirs[4] == 0  # (each /fail after the first: an /ok after a /fail had no idle connection)
    assert ours[:4] == theirs[:4]
    assert [int(answer.split(b" ")[1]) for answer in ours[0]] == [200, 502] * 3 + [200]
    assert [line["status"] for line in ours[2]] == [200, 502] * 3 + [200]


@bounded_by(30)
async def test_a_reload_while_an_answer_is_awaited_records_it_under_the_config_it_came_in_on(
    sidecar: Any, raw_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()

    async def each(n: int, index: int, head: bytes) -> bytes:
        if b" /held " in head:
            await release.wait()
        return answer_of(200)

    async def script(s: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        answers = []
        for path in ("/held", "/held"):  # the first prepares the target (not held: released below)
            release.set()
            writer.write(request(path))
            answers.append(await read_answer(reader))
        release.clear()
        writer.write(request("/held"))
        await asyncio.sleep(0.2)  # (sent upstream, its answer held)
        # The route renamed: an answer recorded under the new config would count as "open".
        config = Path(s.runtime.config_path)
        config.write_text(config.read_text().replace("name: public", "name: open"))
        assert await reload(s.runtime)
        release.set()
        answers.append(await read_answer(reader))
        writer.write(request("/held"))  # (under the new config)
        answers.append(await read_answer(reader))
        return answers

    ours = await run(sidecar, raw_server, monkeypatch, each, script, hook=True)
    theirs = await run(sidecar, raw_server, monkeypatch, each, script, hook=False)
    assert ours[4] == 2 and theirs[4] == 0
    assert ours[:4] == theirs[:4]
    assert [line["route"] for line in ours[2]] == ["public", "public", "public", "open"]
