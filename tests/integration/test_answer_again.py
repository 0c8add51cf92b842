"""An upstream answer whose head came before (upstream.py's `_Head`: taken again without llhttp,
forward.py's fields for it kept with it): the client gets, byte for byte, what the first such
answer (parsed by llhttp, its fields planned) gave it, hop-by-hop fields and the upstream's own
X-Request-Id dropped as ever; and the access-log lines and counts are those of any answer."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from proxy.telemetry.accesslog import AccessLog
from tests.integration.test_forward_now import connect, read_answer, request, serving, start
from tests.support.raw import bounded_by, eventually

ANSWERS = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
    # hop-by-hop fields, the upstream's own X-Request-Id: never relayed
    b"HTTP/1.1 404 Not Found\r\nKeep-Alive: timeout=5\r\nX-Request-Id: theirs\r\nTrailer: X\r\n"
    b"Content-Length: 4\r\n\r\nnope",
    # a Connection naming an end-to-end field (dropped too): the plan does not hold, field by field
    b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: s\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok",
    # no Date (ours is added), a % in a name, an empty body
    b"HTTP/1.1 201 Created\r\nX-%d: x\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("answer", ANSWERS)
@bounded_by(20)
async def test_the_same_answer_again_reaches_the_client_as_the_first_did(
    sidecar: Any, raw_server: Any, answer: bytes
) -> None:
    s, _, sent = await start(sidecar, raw_server, serving(lambda n, index, head: answer))
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    reader, writer = await connect(s)
    answers = []
    for _ in range(4):
        writer.write(request("/again"))
        answers.append(await read_answer(reader))
    writer.close()
    origin = next(iter(s.runtime.pool._origins.values()))
    assert origin.head is not None and origin.head.hits >= 2, "taken again without llhttp"
    assert len(sent) == 3
    first = answers[0]
    if b"\r\nDate: " not in answer:  # ours: the second may differ
        first = first.split(b"\r\nDate: ")[0]
        answers = [a.split(b"\r\nDate: ")[0] for a in answers]
    assert answers == [first] * 4
    assert b"\r\nX-Request-Id: rid-again\r\n" in first
    for dropped in (b"Keep-Alive", b"theirs", b"Trailer", b"X-Secret", b"Connection: X"):
        assert dropped not in first
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    s.runtime.access_log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 4
    for line in lines:
        del line["time"], line["latency_ms"]
    assert lines == [lines[0]] * 4
    assert lines[0]["status"] == int(answer[9:12]) and lines[0]["path"] == "/again"


@bounded_by(20)
async def test_forwarded_answers_are_one_series_in_metrics_whichever_way_they_were_recorded(
    sidecar: Any, raw_server: Any
) -> None:
    # The first request connects (a task: `_record` counts it), the rest go on the pooled
    # connection (no task: `_settled` counts them in a `Cell`): /metrics shows one series.
    s, _, sent = await start(sidecar, raw_server, serving(lambda n, index, head: ANSWERS[0]))
    reader, writer = await connect(s)
    for _ in range(5):
        writer.write(request("/again"))
        await read_answer(reader)
    writer.close()
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    assert len(sent) == 4
    body, _ = s.runtime.metrics.render()
    series = [
        line
        for line in body.decode().splitlines()
        if line.startswith("jwt_sidecar_requests_total{") and 'route="public"' in line
    ]
    assert len(series) == 1, series
    assert 'decision="allowed"' in series[0] and 'status="2xx"' in series[0] and 'method="GET"' in series[0]
    assert series[0].endswith(" 5.0")


@bounded_by(20)
async def test_each_path_is_logged_as_its_own_past_the_paths_kept_per_series(sidecar: Any, raw_server: Any) -> None:
    # app.py keeps the access line's middle (method .. subject, the path escaped) for a few
    # paths per answered series (`_MIDDLES`): past them, each line is still its own path's.
    s, _, _ = await start(sidecar, raw_server, serving(lambda n, index, head: ANSWERS[0]))
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream)
    reader, writer = await connect(s)
    paths = [f"/p{i}" for i in range(10)]
    sent = [path for _ in range(2) for path in paths]
    for path in sent:
        writer.write(request(path))
        assert (await read_answer(reader)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    await eventually(lambda: s.runtime.metrics.in_flight == 0)
    s.runtime.access_log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["path"] for line in lines] == sent
    assert [line["request_id"] for line in lines] == [f"rid-{path[1:]}" for path in sent]
    assert {line["status"] for line in lines} == {200} and {line["route"] for line in lines} == {"public"}
