"""Through the real proxy: request bodies counted rather than parsed (`http1._Counted`) keep every
boundary llhttp keeps. Large Content-Length uploads pipelined with what follows them, in one
write, reach the upstream as exactly those requests with exactly those body sizes, whatever
the bodies hold; after a body that closes its connection, nothing more is read as a request.
(`tests/unit/http/test_http1_counted.py` compares the counted way with llhttp's byte for byte.)
"""

from __future__ import annotations

from typing import Any

from tests.integration.test_http1_attacks import SMUGGLED, statuses
from tests.integration.test_security import send_raw, upstream_paths
from tests.support.raw import bounded_by

bounded = bounded_by(15.0)
KiB = 1024


def upload(path: str, body: bytes, *fields: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: sidecar.test", f"Content-Length: {len(body)}", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@bounded
async def test_pipelined_uploads_reach_the_upstream_as_sent(sidecar: Any) -> None:
    s = await sidecar()
    first = SMUGGLED * (700 * KiB // len(SMUGGLED))  # requests' bytes, as a body: never one
    second = bytes(range(256)) * (300 * KiB // 256)
    raw = await send_raw(
        s,
        upload("/public/a", first)
        + upload("/public/b", second)
        + b"GET /public/after HTTP/1.1\r\nHost: sidecar.test\r\nConnection: close\r\n\r\n",
        timeout=10.0,
    )
    assert statuses(raw) == [200, 200, 200]
    assert upstream_paths(s) == ["/public/a", "/public/b", "/public/after"]
    assert [seen.body_size for seen in s.upstream.seen] == [len(first), len(second), 0]


@bounded
async def test_nothing_after_a_body_that_closes_its_connection_is_a_request(sidecar: Any) -> None:
    s = await sidecar()
    body = SMUGGLED * (400 * KiB // len(SMUGGLED))
    raw = await send_raw(
        s, upload("/public/a", body, "Connection: close") + b"\r\n" + SMUGGLED + SMUGGLED, timeout=10.0
    )
    assert statuses(raw) == [200]
    assert upstream_paths(s) == ["/public/a"]
    assert s.upstream.last().body_size == len(body)
