"""accesslog.py: one JSON line per request, batched per event-loop turn, never fatal."""

from __future__ import annotations

import asyncio
import io
import json
import re

from proxy.accesslog import AccessLog


async def test_lines_of_one_loop_turn_are_written_together_as_json() -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    log.write(route="api", status=200, subject="alice")
    log.write(route="api", status=401, subject=None)
    assert stream.getvalue() == b"", "nothing is written until the loop turn ends"
    await asyncio.sleep(0)
    lines = stream.getvalue().decode().splitlines()
    assert [json.loads(line)["status"] for line in lines] == [200, 401]
    first = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first == {"time": first["time"], "route": "api", "status": 200, "subject": "alice"}


async def test_a_broken_stream_never_raises() -> None:
    stream = io.BytesIO()
    stream.close()
    log = AccessLog(stream)
    log.write(route="api")
    await asyncio.sleep(0)
    log.flush()


def test_without_a_loop_a_line_is_written_at_once() -> None:
    stream = io.BytesIO()
    AccessLog(stream).write(path="/x\n\"y")
    assert json.loads(stream.getvalue())["path"] == "/x\n\"y"
