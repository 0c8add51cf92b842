"""Through the real proxy: an upstream that sends bytes nobody asked for never gives one user's
answer to another (proxy/http/upstream.py: stray bytes, bodiless answers, the idle check at reuse).

The upstream (tests/support/strays.py) answers each request with the caller's identity, the
`X-User-Id` the proxy injected from the token, in `X-Marker` (and the body), then misbehaves
as the test says. Every client is a distinct user; each must get the answer made for it.
Every test is bounded by `LIMIT`; every socket read by `send_raw`'s timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import TestKey, mint
from tests.integration.conftest import BASE_CONFIG, Sidecar
from tests.integration.test_security import first_response, send_raw
from tests.support import strays
from tests.support.raw import Handler, bounded_by
from tests.support.strays import STRAYS

LIMIT = 20.0
RAW_CONFIG = BASE_CONFIG.replace("{upstream}", "{raw}")
bounded = bounded_by(LIMIT)


def misbehaving(mode: str, delay: float | None) -> Handler:
    """Answers every request on a connection as STRAYS[mode] says, marked by the user the
    proxy injected (`X-User-Id`), the stray bytes in the same write (`delay` None) or `delay`
    seconds later, while it goes on reading requests."""
    return strays.misbehaving(mode, None if delay is None else lambda: delay, strays.by_field(b"x-user-id"))


async def as_user(s: Sidecar, key: TestKey, method: str, user: str) -> str:
    """One request by `user`: "ok" when the answer it got was made for it."""
    token = mint({"sub": user}, key=key)
    raw = await send_raw(
        s,
        f"{method} /orders/{user} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Connection: close\r\n\r\n".encode(),
        timeout=3.0,
    )
    if not raw:
        return f"{user}: no answer"
    answer = first_response(raw)
    marker = answer.headers.get("X-Marker")
    if marker is None:
        return f"{user}: status {answer.status}"
    if marker != user or (method == "GET" and answer.status == 200 and answer.body != user.encode()):
        return f"{user}: crossed, got {marker}'s answer"
    return "ok"


async def users(s: Sidecar, key: TestKey, method: str, prefix: str, count: int, concurrency: int) -> list[str]:
    results: list[str] = []
    for start in range(0, count, concurrency):
        results += await asyncio.gather(
            *(as_user(s, key, method, f"{prefix}{i}") for i in range(start, min(count, start + concurrency)))
        )
    return results


@pytest.mark.parametrize("mode", list(STRAYS))
@bounded
async def test_no_user_gets_another_users_answer_when_the_upstream_sends_stray_bytes(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, mode: str
) -> None:
    method = STRAYS[mode][0]
    upstream = await raw_server(misbehaving(mode, None))
    s = await sidecar(RAW_CONFIG, raw=f"http://127.0.0.1:{upstream.port}")
    results = await users(s, rsa_key, method, "seq-", 15, 1)  # one after another
    results += await users(s, rsa_key, method, "conc-", 45, 15)  # and 15 at a time
    assert results == ["ok"] * 60, [r for r in results if r != "ok"]


@pytest.mark.parametrize("mode", ["second-answer", "head-body", "204-body", "after-chunked-end"])
@bounded
async def test_no_user_gets_another_users_answer_when_the_stray_bytes_come_late(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, mode: str
) -> None:
    # The stray bytes come 30 ms after the answer, into the idle pooled connection: it is
    # closed, and the origin's connections are no longer reused, so the users who come after,
    # one at a time or 15 at once, each get their own connection and their own answer.
    method = STRAYS[mode][0]
    upstream = await raw_server(misbehaving(mode, 0.03))
    s = await sidecar(RAW_CONFIG, raw=f"http://127.0.0.1:{upstream.port}")
    results = []
    for i in range(3):
        results.append(await as_user(s, rsa_key, method, f"first-{i}"))
        await asyncio.sleep(0.08)
    results += await users(s, rsa_key, method, "seq-", 10, 1)
    results += await users(s, rsa_key, method, "conc-", 30, 15)
    assert results == ["ok"] * 43, [r for r in results if r != "ok"]
    assert upstream.connections == 43
