"""Review (s8): the server's `Quick` hook (app.py's `Proxy._head`) failing after it took a request
on with an `Ahead` and wrote that request's answer must never make the server answer the same
request a second time.

`_Connection.on_headers_complete` catches what the hook raises and, unless `_send_now` ran
(`_idle_since`), clears the queue and goes the `Request` way: `_entry` runs again for the same
request. When the hook took the request on (`take`), made it the `Request` it stands for
(`Ahead.full`) and wrote a refusal through it (`_handed_over` -> `_failed`) before failing
(here: in `_record`, the step between the refusal and `Ahead.hand_over`), that is a second
answer to one request on a keep-alive connection: the client pairs it with its next request
(a response desync). The fault is injected (no client-reachable raise was found between the
refusal and `hand_over`): what is tested is the fallback's contract, one answer per request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from proxy.request import app
from tests.conftest import TestKey, mint
from tests.integration.test_forward_plan import request, session, start
from tests.support.raw import bounded_by


async def answers_within(s: Any, raw: bytes, wait: float = 0.5) -> list[bytes]:
    """Every status line the client gets for `raw` within `wait` seconds (then it closes)."""
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    got = b""
    try:
        writer.write(raw)
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while (left := end - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        writer.close()
    statuses = []
    while got:  # (answers framed by Content-Length: every answer here has one)
        head, _, rest = got.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        statuses.append(lines[0])
        length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
        got = rest[length:]
    return statuses


@bounded_by(60)
async def test_a_hook_failing_after_its_refusal_was_written_does_not_answer_twice(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, heads, _ = await start(sidecar, raw_server, tmp_path)
    token = mint({"sub": "alice"}, key=rsa_key)
    ok = request("GET", "/api/a", f"Authorization: Bearer {token}\r\n")
    assert await session(s, [ok, ok]) == [200, 200]  # the target prepared: the hook takes it on
    assert ("GET", "/api/a") in s.runtime.snapshot.forwards

    real = app._record
    armed = [True]

    def failing_once(ex: Any) -> None:
        real(ex)
        if armed[0]:
            armed[0] = False
            raise RuntimeError("injected: recording failed after the answer was written")

    monkeypatch.setattr(app, "_record", failing_once)
    bad = request("GET", "/api/a", f"Authorization: Bearer {token}x\r\n")  # a bad signature: 401
    sent = len(heads)
    statuses = await answers_within(s, bad + ok)  # pipelined: the 401'd request, then a good one
    assert not armed[0], "the injected failure did not happen: the hook did not take the request on"
    # One answer per request, in order: the 401, then the 200 (or, failing closed, nothing more
    # than a refusal standing for the second). Never a second answer to the first request.
    assert statuses[:1] == [b"HTTP/1.1 401 Unauthorized"], statuses
    assert statuses.count(b"HTTP/1.1 401 Unauthorized") == 1, statuses
    assert len(statuses) <= 2, statuses
    assert len(heads) - sent <= 1
