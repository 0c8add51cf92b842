"""A request allowed on a (method, target) forwarded before is forwarded from what the first
one prepared (pipeline.py's `ForwardPlan`, identity.py's `HeadPlan`): no routing again, the
upstream head written by one `bytes %`. What a user relies on: the upstream receives the same
bytes as by the field-by-field way (the strip, the path the router matched, X-Forwarded-*,
identity headers), every refusal is as before, a token revoked after the target was prepared
is refused, and a reload leaves nothing prepared under the old config."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.auth.revocation import make_rule
from proxy.auth.revocationstore import write_rules_file
from proxy.http.upstream import Pool
from proxy.ops.reload import reload
from proxy.request import app
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.support import strays
from tests.support.raw import bounded_by

CONFIG = f"""\
realm: api
upstream: {{url: "{{raw}}/base", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}"}}
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email}}
routes:
  - {{name: public, match: {{path_prefix: /public/}}, auth: none}}
  - {{name: optional, match: {{path_prefix: /maybe/}}, auth: {{provider: main, optional: true}}}}
  - name: optional-fwd
    match: {{path_prefix: /maybe-fwd/}}
    auth: {{provider: main, optional: true}}
    headers: {{claims: {{sub: X-User-Id}}, forward_token: true}}
  - name: fwd
    match: {{path_prefix: /fwd/}}
    auth: {{provider: main}}
    headers: {{claims: {{sub: X-User-Id}}, forward_token: true, payload: X-Jwt-Payload}}
  - {{name: admin, match: {{path_prefix: /admin/}}, auth: {{provider: main, scopes: {{all_of: [admin]}}}}}}
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
revocation: {{file: "{{revoked}}"}}
"""
# Spoofed identity, hop-by-hop and framing fields, in several spellings (no Connection and no
# X-Forwarded-* of the client's: those requests are planned the field-by-field way).
SPOOF = (
    "X-User-Id: evil\r\nx_user_email: evil@x\r\nX-Jwt-Payload: evil\r\nTe: trailers\r\n"
    "Keep-Alive: timeout=5\r\nProxy-Authorization: Basic evil\r\nTransfer_Encoding: chunked\r\n"
    "Content_Length: 5\r\nX_Forwarded_For: 6.6.6.6\r\nAccept: */*\r\naccept: text/plain\r\n"
)


async def start(sidecar: Any, raw_server: Any, tmp_path: Path) -> tuple[Any, list[bytes], list[int]]:
    """A sidecar in front of an upstream that records each request head; its pool reuses a
    connection at once; and a list that grows by one for each request `begin_planned` took."""
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await strays.read_request(reader)) is not None:
            heads.append(request[0])
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
            writer.write(head if request[0].startswith(b"HEAD ") else head + b"ok")

    server = await raw_server(upstream)
    s = await sidecar(CONFIG, raw=f"http://127.0.0.1:{server.port}", revoked=str(tmp_path / "revoked.yaml"))
    old = s.runtime.pool
    s.runtime.pool = Pool(probation=0)
    await old.close()
    return s, heads, []


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Each (method, target) app.py handed to `begin_planned` (a prepared forward), or forwarded
    the prepared way with no `Exchange` (a public route without CORS: `_Public`)."""
    taken: list[tuple[str, str]] = []
    real, head = app.begin_planned, app.Proxy._head

    def counting(ex: Any, *args: Any) -> Any:
        taken.append((ex.request.method, ex.request.raw_path))
        return real(ex, *args)

    def counting_public(proxy: Any, method: str, target: str, *args: Any) -> Any:
        answered = head(proxy, method, target, *args)
        if isinstance(answered, app._Public):
            taken.append((method, target))
        return answered

    monkeypatch.setattr(app, "begin_planned", counting)
    monkeypatch.setattr(app.Proxy, "_head", counting_public)  # (the server is made with it: `Proxy.server`)
    return taken


async def exchange(s: Any, raw: bytes) -> tuple[int, bytes]:
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = b"" if raw.startswith(b"HEAD ") else await asyncio.wait_for(reader.readexactly(length), 5)
        return int(head.split(b" ")[1]), body
    finally:
        writer.close()


async def session(s: Any, requests: list[bytes]) -> list[int]:
    """The requests one after another on one connection (so the pool's connection is idle for each)."""
    host, port = s.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    statuses = []
    try:
        for raw in requests:
            writer.write(raw)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if not raw.startswith(b"HEAD "):
                await asyncio.wait_for(reader.readexactly(length), 5)
            statuses.append(int(head.split(b" ")[1]))
    finally:
        writer.close()
    return statuses


def request(method: str, target: str, fields: str = "", rid: str = "case") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: sidecar.test\r\nX-Request-Id: {rid}\r\n{fields}\r\n".encode()


@bounded_by(60)
async def test_a_prepared_forward_sends_the_upstream_the_same_bytes(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path, planned: list[tuple[str, str]]
) -> None:
    s, heads, _ = await start(sidecar, raw_server, tmp_path)
    token = mint({"sub": "alice", "email": "a@b.c"}, key=rsa_key)
    bearer = f"Authorization: Bearer {token}\r\n"
    cases = [
        ("GET", "/public/a?b=c&d", bearer + SPOOF),  # a public route forwards Authorization as sent
        ("GET", "/public//x/./y/../z", SPOOF),  # the path the router matched is the one forwarded
        ("GET", "/api/a?q=1", bearer + SPOOF),
        ("GET", "/api/a", "authorization: bearer  " + token + "\r\n" + SPOOF),
        ("HEAD", "/api/a", bearer + SPOOF),
        ("DELETE", "/api/a", bearer + SPOOF),
        ("OPTIONS", "/api/a", bearer + SPOOF),  # (no CORS here: an OPTIONS is a request as any)
        ("GET", "/api/b", bearer + "Content-Length: 0\r\n" + SPOOF),
        ("GET", "/fwd/a", bearer + SPOOF),  # forward_token, and the payload header
        ("GET", "/maybe/a", bearer + SPOOF),
        ("GET", "/maybe/a", "Authorization: Basic dXNlcjpwdw==\r\n" + SPOOF),  # another scheme: anonymous
    ]
    last: list[bytes] = []
    for index, (method, target, fields) in enumerate(cases):
        raw = request(method, target, fields, f"case-{index}")
        before, taken = len(heads), len(planned)
        fresh = (method, target) not in s.runtime.snapshot.forwards
        assert await session(s, [raw] * 4) == [200] * 4, index
        got = heads[before:]
        assert len(got) == 4
        # The first one prepared what the next three were forwarded from.
        assert (method, target) in s.runtime.snapshot.forwards, index
        assert planned[taken:] == [(method, target)] * (3 if fresh else 4), index
        assert got[0] == got[1] == got[2] == got[3], (index, got[0], got[1])
        assert b"evil" not in got[3] and b"6.6.6.6" not in got[3], got[3]
        assert b"X-Forwarded-For: 127.0.0.1\r\n" in got[3]
        assert b"X-Request-Id: case-%d\r\n" % index in got[3]
        last.append(got[3])
    assert last[0].startswith(b"GET /base/public/a?b=c&d HTTP/1.1\r\n")
    assert last[1].startswith(b"GET /base/public/x/z HTTP/1.1\r\n")
    assert b"Authorization: Bearer" in last[0]  # (public: as sent)
    assert b"Authorization" not in last[2] and b"X-User-Id: alice\r\nX-User-Email: a@b.c\r\n" in last[2]
    assert last[4].startswith(b"HEAD /base/api/a HTTP/1.1\r\n")
    assert b"Content-Length: 0\r\n\r\n" in last[7]
    assert b"Authorization: Bearer " + token.encode() in last[8]  # (forward_token)
    assert b"X-Jwt-Payload: " in last[8]
    # (a route with auth: an Authorization it did not check never reaches the upstream, README "Routes")
    assert b"Authorization" not in last[10] and b"X-User-Id" not in last[10]


@pytest.mark.parametrize("prefix", ["/maybe/", "/maybe-fwd/"])
@bounded_by(60)
async def test_an_unchecked_authorization_is_dropped_on_a_prepared_target_as_on_the_first(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path, planned: list[tuple[str, str]], prefix: str
) -> None:
    # An optional route lets a request with another scheme on, anonymous: its Authorization
    # (Basic, a token of another kind) was checked by no one, so the upstream must not see it,
    # forward_token or not (identity.upstream_fields, `guarded`). The first request on the
    # target prepares it; the prepared forward dropped nothing (it kept the line whenever no
    # Bearer token was found), so the second and later requests carried it upstream.
    s, heads, _ = await start(sidecar, raw_server, tmp_path)
    token = mint({"sub": "alice"}, key=rsa_key)
    for target, fields in [
        (prefix + "basic", "Authorization: Basic dXNlcjpwdw==\r\n" + SPOOF),
        (prefix + "other", "authorization: Digest username=x\r\n"),
        (prefix + "empty", "Authorization: \r\n"),
        (prefix + "bearer-first", f"Authorization: Bearer {token}\r\n"),  # prepared by a checked token...
    ]:
        raw = request("GET", target, fields)
        before = len(heads)
        assert await session(s, [raw] * 3) == [200] * 3, target
        got = heads[before:]
        assert (("GET", target) in planned) and got[0] == got[1] == got[2], (target, got)
        if "bearer" in target:
            assert (b"Authorization: Bearer " in got[0]) == (prefix == "/maybe-fwd/"), got[0]
            # ...then used by a request with another scheme.
            basic = request("GET", target, "Authorization: Basic dXNlcjpwdw==\r\n")
            assert await session(s, [basic, basic]) == [200, 200]
            got = heads[-2:]
        assert all(b"uthorization" not in head and b"X-User-Id" not in head for head in got), (target, got)


@bounded_by(60)
async def test_refusals_on_a_prepared_target_are_as_before(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path, planned: list[tuple[str, str]]
) -> None:
    s, heads, _ = await start(sidecar, raw_server, tmp_path)
    token = mint({"sub": "alice"}, key=rsa_key)
    other = mint({"sub": "bob"}, key=rsa_key)
    ok = request("GET", "/api/a", f"Authorization: Bearer {token}\r\n")
    assert await session(s, [ok, ok]) == [200, 200]
    assert await session(s, [request("GET", "/public/a"), request("GET", "/public/a")]) == [200, 200]
    assert len(planned) == 2
    sent = len(heads)
    for raw, status in [
        (request("GET", "/api/a"), 401),  # no token
        (request("GET", "/api/a", "Authorization: Basic dXNlcjpwdw==\r\n"), 401),  # another scheme
        (request("GET", "/api/a", f"Authorization: Bearer {token}x\r\n"), 401),  # a bad signature
        (request("GET", "/api/a", "Authorization: Bearer a b\r\n"), 400),  # not a token68
        (request("GET", "/api/a", f"Authorization: Bearer {token}\r\nAuthorization: Bearer {other}\r\n"), 400),
        (request("GET", "/public/a", "Authorization: Basic eA==\r\nAuthorization: Basic eQ==\r\n"), 400),
    ]:
        assert (await exchange(s, raw))[0] == status, raw
    assert len(heads) == sent  # none of them reached the upstream
    assert await session(s, [ok]) == [200]


@bounded_by(60)
async def test_a_routes_rules_hold_on_a_prepared_target(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path, planned: list[tuple[str, str]]
) -> None:
    s, heads, _ = await start(sidecar, raw_server, tmp_path)
    admin = request("GET", "/admin/a", f"Authorization: Bearer {mint({'scope': 'admin'}, key=rsa_key)}\r\n")
    user = request("GET", "/admin/a", f"Authorization: Bearer {mint({'scope': 'read'}, key=rsa_key)}\r\n")
    assert await session(s, [admin, admin, user, user, admin]) == [200, 200, 403, 403, 200]
    assert planned == [("GET", "/admin/a")] * 4  # (the first one prepared it)
    assert len(heads) == 3


def revoke_sub(path: Path, sub: str) -> None:
    write_rules_file(str(path), [make_rule(sub=sub, expires=time.time() + 3600)], time.time())


@bounded_by(60)
async def test_a_token_revoked_after_its_target_was_prepared_is_refused(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path, planned: list[tuple[str, str]]
) -> None:
    s, heads, _ = await start(sidecar, raw_server, tmp_path)
    token = mint({"sub": "mallory"}, key=rsa_key)
    raw = request("GET", "/api/a", f"Authorization: Bearer {token}\r\n")
    assert await session(s, [raw, raw]) == [200, 200]  # cached, and its target prepared
    assert planned == [("GET", "/api/a")]
    revoke_sub(tmp_path / "revoked.yaml", "mallory")
    for _ in range(100):  # the file is checked twice a second: bounded at 5 s
        if (await exchange(s, raw))[0] == 401:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a revoked token was still let through")
    sent = len(heads)
    assert await session(s, [raw, raw]) == [401, 401]
    assert len(heads) == sent
    assert ("GET", "/api/a") in s.runtime.snapshot.forwards and planned[-1] == ("GET", "/api/a")


@bounded_by(60)
async def test_a_reload_leaves_nothing_prepared_under_the_old_config(
    sidecar: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path, planned: list[tuple[str, str]]
) -> None:
    s, heads, _ = await start(sidecar, raw_server, tmp_path)
    runtime = s.runtime
    token = mint({"sub": "alice"}, key=rsa_key)
    raw = request("GET", "/api/a", f"Authorization: Bearer {token}\r\n")
    public = request("GET", "/public/a")
    assert await session(s, [raw, raw, public, public]) == [200] * 4
    assert b"X-User-Id: alice\r\n" in heads[-3] and heads[-1].startswith(b"GET /base/public/a ")
    old = runtime.snapshot
    config = Path(runtime.config_path)
    text = config.read_text().replace("sub: X-User-Id, email", "sub: X-Subject, email").replace("/base", "/v2")
    # The public prefix now needs a token.
    text = text.replace(
        "{name: public, match: {path_prefix: /public/}, auth: none}",
        "{name: public, match: {path_prefix: /public/}, auth: {provider: main}}",
    )
    config.write_text(text)
    assert await reload(runtime)
    assert runtime.snapshot is not old and not len(runtime.snapshot.forwards)
    assert await session(s, [raw, raw]) == [200, 200]
    assert heads[-1] == heads[-2] and heads[-1].startswith(b"GET /v2/api/a HTTP/1.1\r\n")
    assert b"X-Subject: alice\r\n" in heads[-1] and b"X-User-Id" not in heads[-1]
    sent = len(heads)
    assert await session(s, [public, public]) == [401, 401]
    assert len(heads) == sent
