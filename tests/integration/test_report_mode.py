"""Report-only rollout (`auth: {provider: main, mode: report}`), on the real proxy.

A real upstream on loopback records every header it got; a real JWKS server serves a real RSA
key; tokens are minted per case. In report mode every check runs as in enforce mode, but a
refusal of the token checks is a `would_deny` (access log, metrics, one operator-log event a
second): the request reaches the upstream as an anonymous one, with no identity header and
no token, and the client-sent identity headers still stripped. A malformed request (two
Authorization lines, two tokens, a malformed credential) is refused in both modes.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.base.errors import Reason
from proxy.base.logthrottle import RepeatFilter
from proxy.ops.reload import reload
from proxy.telemetry.accesslog import AccessLog
from tests.conftest import AUDIENCE, ISSUER, FakeClock, TestKey, jwks_of, mint, refused_port
from tests.support.process import running
from tests.support.upstream import start_upstream

TYP = "at+jwt"

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s, max_body: 1MB}}
max_token_bytes: 1500
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    typ: {TYP}
    max_token_age: 1h
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email, roles: X-User-Roles}}
  dead:
    issuer: https://dead.test
    audiences: [{AUDIENCE}]
    jwks: {{url: "http://127.0.0.1:{{dead}}/jwks.json", timeout: 1s}}
routes:
  - name: rollout
    match: {{path_prefix: /rollout/}}
    auth:
      provider: main
      mode: report
      scopes: {{all_of: [admin]}}
      claims: [{{claim: email_verified, equals: true}}]
  - name: enforced
    match: {{path_prefix: /enforced/}}
    auth:
      provider: main
      scopes: {{all_of: [admin]}}
      claims: [{{claim: email_verified, equals: true}}]
  - name: forwarding
    match: {{path_prefix: /fwd/}}
    auth: {{provider: main, mode: report}}
    headers: {{claims: {{sub: X-User-Id}}, forward_token: true}}
  - name: sources
    match: {{path_prefix: /sources/}}
    auth: {{provider: main, mode: report}}
    token_sources: [{{cookie: session}}, {{query: access_token}}]
  - name: outage
    match: {{path_prefix: /outage/}}
    auth: {{provider: dead, mode: report}}
  - name: socket
    match: {{path_exact: /ws}}
    auth: {{provider: main, mode: report}}
  - name: api
    match: {{path_prefix: /}}
    auth: {{provider: main}}
# Next to config.yaml; a test that writes no list gets an empty one.
revocation: {{file: revoked.yaml}}
"""

IDENTITY = ("X-User-Id", "X-User-Email", "X-User-Roles")
REVOKED_RULES = "rules: [{sub: revoked-user}]\n"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def good(claims: dict[str, Any] | None = None, *, key: TestKey, **kwargs: Any) -> str:
    """A token every check of route `rollout` admits, with `claims` on top."""
    base = {"scope": "admin", "email_verified": True, "email": "ann@example.com", "roles": ["dev"]}
    headers = {"typ": TYP, **kwargs.pop("headers", {})}
    return mint({**base, **(claims or {})}, key=key, headers=headers, **kwargs)


def cases(key: TestKey, other: TestKey) -> dict[str, dict[str, str]]:
    """One request (its headers) per refusal reason of the token checks, on route `rollout`."""
    now = int(time.time())
    return {
        Reason.TOKEN_MISSING: {},
        Reason.TOO_LARGE: bearer(good({"pad": "x" * 2000}, key=key)),
        Reason.MALFORMED: bearer("abc"),
        Reason.ALG_NOT_ALLOWED: bearer(
            mint({"scope": "admin", "email_verified": True}, secret=b"k" * 32, headers={"typ": TYP})
        ),
        Reason.TYP: bearer(good(key=key, headers={"typ": "JWT"})),
        Reason.CRIT: bearer(good(key=key, headers={"crit": ["exp"]})),
        Reason.UNKNOWN_KID: bearer(good(key=key, headers={"kid": "nobody"})),
        # Signed by another key under this key's kid.
        Reason.BAD_SIGNATURE: bearer(good(key=other, headers={"kid": key.kid})),
        Reason.MALFORMED_CLAIM: bearer(good({"exp": "soon"}, key=key)),
        Reason.EXPIRED: bearer(good({"iat": now - 1200, "exp": now - 600}, key=key)),
        Reason.NOT_YET_VALID: bearer(good({"nbf": now + 600}, key=key)),
        Reason.ISSUED_IN_FUTURE: bearer(good({"iat": now + 600, "exp": now + 900}, key=key)),
        Reason.TOO_OLD: bearer(good({"iat": now, "exp": now + 7200}, key=key)),
        Reason.ISSUER: bearer(good({"iss": "https://other.test"}, key=key)),
        Reason.AUDIENCE: bearer(good({"aud": "api://other"}, key=key)),
        Reason.MISSING_CLAIM: bearer(good(key=key, omit=("exp",))),
        Reason.SCOPE: bearer(good({"scope": "read"}, key=key)),
        Reason.CLAIM_RULE: bearer(good({"email_verified": False}, key=key)),
        Reason.UNSAFE_CLAIM: bearer(good({"email": "ann@example.com\r\nX-User-Id: admin"}, key=key)),
        Reason.REVOKED: bearer(good({"sub": "revoked-user"}, key=key)),  # REVOKED_RULES names it
    }


# What report mode never turns into a would_deny: refusals before any token check (the path,
# the route, the body), our upstream's failures, and a malformed request (tested below).
NOT_TOKEN_CHECKS = {
    Reason.MULTIPLE_TOKENS,
    Reason.MALFORMED_REQUEST,
    Reason.BAD_PATH,
    Reason.NO_ROUTE,
    Reason.BODY_TOO_LARGE,
    Reason.BODY_TIMEOUT,
    Reason.HEADER_TIMEOUT,
    Reason.UPSTREAM_UNAVAILABLE,
    Reason.UPSTREAM_TIMEOUT,
    Reason.INTERNAL,
    Reason.NO_KEYS,  # a would_deny too: its own test, on a provider without keys
    # The list too old with `fail: closed` is our outage, like NO_KEYS; its 503 needs the
    # clock moved (test_refusals.py).
    Reason.REVOCATION_UNAVAILABLE,
    # A CORS preflight is judged before any token check, and report mode is about the token:
    # a preflight is answered in pipeline.begin before the route's mode is read.
    Reason.CORS_ORIGIN,
    Reason.CORS_METHOD,
    Reason.CORS_HEADERS,
}


async def start(sidecar: Any, text: str = CONFIG) -> Any:
    return await sidecar(text, dead=str(refused_port()))


async def scrape(s: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with s.client.get(s.admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counted(samples: dict[Any, float], route: str, decision: str, reason: str, status: str = "2xx") -> float:
    labels = (("decision", decision), ("method", "GET"), ("reason", reason), ("route", route), ("status", status))
    return samples.get(("jwt_sidecar_requests_total", labels), 0)


def assert_anonymous(seen: Any, where: str) -> None:
    for name in IDENTITY:
        assert seen.header(name) is None, f"{where}: {name} reached the upstream: {seen.header(name)!r}"
    assert seen.header("Authorization") is None, f"{where}: the token reached the upstream"


async def test_every_refusal_of_the_token_checks_reaches_the_upstream_anonymous_and_is_counted(
    sidecar: Any, rsa_key: TestKey, rsa_key_2: TestKey, tmp_path: Path
) -> None:
    (tmp_path / "revoked.yaml").write_text(REVOKED_RULES)  # beside the fixture's config.yaml
    s = await start(sidecar)
    table = cases(rsa_key, rsa_key_2)
    # Every reason a token check can give has its case here (a new reason needs one).
    assert set(table) == set(Reason) - NOT_TOKEN_CHECKS
    for reason, headers in table.items():
        before = len(s.upstream.seen)
        async with await s.get("/rollout/orders?page=2", headers=headers) as response:
            assert response.status == 200, reason
            assert "WWW-Authenticate" not in response.headers, reason
            request_id = response.headers["X-Request-Id"]
        assert len(s.upstream.seen) == before + 1, reason
        seen = s.upstream.last()
        assert_anonymous(seen, reason)
        assert seen.raw_path == "/rollout/orders?page=2", reason
        assert seen.header("X-Request-Id") == request_id, reason
    # The same refusals in enforce mode, on route `enforced` (the same rules): refused, the
    # upstream sees nothing.
    before = len(s.upstream.seen)
    for reason, headers in table.items():
        async with await s.get("/enforced/orders", headers=headers) as response:
            assert response.status in (401, 403), reason
    assert len(s.upstream.seen) == before
    samples = await scrape(s)
    for reason in table:
        assert counted(samples, "rollout", "would_deny", reason) == 1, reason
        assert counted(samples, "enforced", "denied", reason, "4xx") == 1, reason
    assert not [
        key
        for key in samples
        if key[0] == "jwt_sidecar_requests_total"
        and ("decision", "denied") in key[1]
        and ("route", "rollout") in key[1]
    ], "report mode denied something"


async def test_a_valid_token_in_report_mode_gets_its_identity_headers_as_in_enforce_mode(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await start(sidecar)
    token = good(key=rsa_key)
    for path in ("/rollout/x", "/enforced/x"):
        for attempt in ("verified", "cached"):
            async with await s.get(path, headers=bearer(token)) as response:
                assert response.status == 200, (path, attempt)
            seen = s.upstream.last()
            assert seen.header("X-User-Id") == "user-42", (path, attempt)
            assert seen.header("X-User-Email") == "ann@example.com", (path, attempt)
            assert seen.header("X-User-Roles") == "dev", (path, attempt)
            assert seen.header("Authorization") is None, "forward_token is off"
    samples = await scrape(s)
    assert counted(samples, "rollout", "allowed", "") == 2
    assert counted(samples, "enforced", "allowed", "") == 2


async def test_a_would_deny_from_the_token_cache_is_reported_too(sidecar: Any, rsa_key: TestKey) -> None:
    # A token verified once (cached) that the route's rules refuse: the rules run per request.
    s = await start(sidecar)
    token = good({"scope": "read"}, key=rsa_key)
    for _ in range(3):
        async with await s.get("/rollout/x", headers=bearer(token)) as response:
            assert response.status == 200
        assert_anonymous(s.upstream.last(), "cached token, scope refused")
    assert counted(await scrape(s), "rollout", "would_deny", "scope") == 3


@pytest.mark.parametrize("token", ["none", "bad", "valid"])
async def test_client_sent_identity_headers_never_reach_the_upstream_in_report_mode(
    sidecar: Any, rsa_key: TestKey, token: str
) -> None:
    s = await start(sidecar)
    headers = {
        "none": {},
        "bad": bearer(good({"aud": "api://other"}, key=rsa_key)),
        "valid": bearer(good(key=rsa_key)),
    }[token]
    spoofed = [
        ("X-User-Id", "admin"),
        ("x-user-id", "admin"),
        ("X_User_Id", "admin"),
        ("X-User-Email", "admin@example.com"),
        ("X-User-Roles", "admin"),
        ("X-Jwt-Payload", "e30"),
        ("X-Auth-Request-User", "admin"),
    ]
    async with await s.get("/rollout/x", headers=[*headers.items(), *spoofed]) as response:
        assert response.status == 200
    seen = s.upstream.last()
    values = [value for name, value_list in seen.headers.items() for value in value_list]
    assert "admin" not in values and "admin@example.com" not in values and "e30" not in values, seen.headers
    identity = {name for name in seen.headers if name.replace("_", "-").startswith(("x-user-", "x-jwt-", "x-auth-"))}
    assert identity == ({"x-user-id", "x-user-email", "x-user-roles"} if token == "valid" else set()), seen.headers
    if token == "valid":
        assert seen.header("X-User-Id") == "user-42" and seen.header("X-User-Roles") == "dev"
    else:
        assert_anonymous(seen, token)


async def test_a_would_deny_never_takes_its_token_on_whatever_forward_token_says(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await start(sidecar)
    bad = good({"exp": int(time.time()) - 600, "iat": int(time.time()) - 900}, key=rsa_key)
    async with await s.get("/fwd/x", headers=bearer(bad)) as response:
        assert response.status == 200
    assert s.upstream.last().header("Authorization") is None, "an unverified token reached the upstream"
    assert s.upstream.last().header("X-User-Id") is None
    valid = good(key=rsa_key)
    async with await s.get("/fwd/x", headers=bearer(valid)) as response:
        assert response.status == 200
    assert s.upstream.last().header("Authorization") == f"Bearer {valid}", "forward_token: true, admitted"
    assert s.upstream.last().header("X-User-Id") == "user-42"


async def test_a_would_deny_token_is_taken_out_of_the_cookie_and_the_query(sidecar: Any, rsa_key: TestKey) -> None:
    s = await start(sidecar)
    bad = good({"aud": "api://other"}, key=rsa_key)
    async with await s.get(f"/sources/x?a=1&access_token={bad}&b=2") as response:
        assert response.status == 200
    seen = s.upstream.last()
    assert seen.raw_path == "/sources/x?a=1&b=2"
    assert bad not in json.dumps(seen.headers)
    async with await s.get("/sources/x", headers={"Cookie": f"theme=dark; session={bad}"}) as response:
        assert response.status == 200
    seen = s.upstream.last()
    assert seen.header("Cookie") == "theme=dark"
    assert_anonymous(seen, "cookie")
    assert counted(await scrape(s), "sources", "would_deny", "audience") == 2


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        # Two Authorization lines (a singleton: readers disagree on which counts), refused even
        # on public routes; two tokens; a credential that is not one token.
        ([("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")], "multiple_tokens"),
        ([("Authorization", "Bearer a.b.c"), ("Authorization", "Basic dXNlcjpwdw==")], "malformed_request"),
        ([("Authorization", "Bearer a.b.c d.e.f")], "malformed_request"),
        ([("Authorization", "Bearer\ta.b.c")], "malformed_request"),
    ],
    ids=["two bearer lines", "bearer and basic", "two tokens in one line", "tab separator"],
)
async def test_a_malformed_request_is_refused_in_report_mode_too(
    sidecar: Any, headers: list[tuple[str, str]], reason: str
) -> None:
    s = await start(sidecar)
    async with await s.get("/rollout/x", headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_request"
    assert s.upstream.seen == []
    assert counted(await scrape(s), "rollout", "denied", reason, "4xx") == 1


async def test_two_tokens_in_two_sources_are_refused_in_report_mode_too(sidecar: Any, rsa_key: TestKey) -> None:
    s = await start(sidecar)
    token = good(key=rsa_key)
    async with await s.get(f"/sources/x?access_token={token}", headers={"Cookie": f"session={token}"}) as response:
        assert response.status == 400
    assert s.upstream.seen == []


async def test_a_key_outage_in_report_mode_is_a_would_deny_and_does_not_hold_readiness_back(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await start(sidecar)
    token = mint({"iss": "https://dead.test"}, key=rsa_key)
    async with await s.get("/outage/x", headers=bearer(token)) as response:
        assert response.status == 200
    assert_anonymous(s.upstream.last(), "no keys")
    assert counted(await scrape(s), "outage", "would_deny", "no_keys") == 1
    async with s.client.get(s.admin_url + "/readyz") as response:
        assert response.status == 200, await response.text()


async def test_the_access_log_and_the_operator_log_say_would_deny(sidecar: Any, rsa_key: TestKey) -> None:
    s = await start(sidecar)
    stream = io.BytesIO()
    s.runtime.access_log = AccessLog(stream, interval=60)
    clock = FakeClock()
    lines: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record)

    handler = Keep()
    handler.addFilter(RepeatFilter(clock=clock))  # the operator log's own throttle, on the test's clock
    logger = logging.getLogger("jwt_sidecar")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        scoped = good({"scope": "read", "sub": "bob"}, key=rsa_key)
        for _ in range(5):
            async with await s.get("/rollout/orders?x=1", headers=bearer(scoped)) as response:
                assert response.status == 200
        clock.advance(1.5)
        async with await s.get("/rollout/orders", headers=bearer(scoped)) as response:
            assert response.status == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    s.runtime.access_log.flush()
    entries = [json.loads(line) for line in stream.getvalue().decode().splitlines()]
    assert len(entries) == 6
    entry = entries[0]
    assert {k: entry[k] for k in ("path", "route", "provider", "status", "decision", "reason", "subject")} == {
        "path": "/rollout/orders",
        "route": "rollout",
        "provider": "main",
        "status": 200,
        "decision": "would_deny",
        "reason": "scope",
        "subject": "bob",
    }
    would = [r for r in lines if getattr(r, "event", None) == "request_would_deny"]
    assert len(would) == 2, [r.getMessage() for r in would]  # one a second per provider
    first, later = would
    assert first.levelno == logging.INFO
    assert first.fields["reason"] == "scope" and first.fields["route"] == "rollout"  # type: ignore[attr-defined]
    assert first.fields["would_answer"] == 403  # type: ignore[attr-defined]
    assert "would be refused (403, report mode): scope" in first.getMessage()
    assert later.getMessage().endswith("(4 similar suppressed)")
    assert scoped not in "".join(r.getMessage() for r in would)


async def test_a_websocket_in_report_mode_opens_anonymous_or_with_its_identity(sidecar: Any, rsa_key: TestKey) -> None:
    s = await start(sidecar)
    bad = good({"aud": "api://other"}, key=rsa_key)
    for headers, hello in (
        ({"X-User-Id": "admin"}, "hello None"),
        ({**bearer(bad), "X-User-Id": "admin"}, "hello None"),
        ({**bearer(good(key=rsa_key)), "X-User-Id": "admin"}, "hello user-42"),
    ):
        async with s.client.ws_connect(s.url + "/ws", headers=headers) as ws:
            assert (await ws.receive_str(timeout=5)) == hello
            await ws.send_str("ping")
            assert (await ws.receive_str(timeout=5)) == "ping"
    # In enforce mode the same upgrade without a token is refused before it reaches the upstream.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with s.client.ws_connect(s.url + "/orders/ws"):
            pass
    assert refused.value.status == 401
    # A tunnel is counted when it ends: after the client's close, once the upstream has closed
    # too (the client's half-close is passed on to it, and it may still send).
    tunnels = (("would_deny", "token_missing"), ("would_deny", "audience"), ("allowed", ""))
    async with asyncio.timeout(5):
        while True:
            samples = await scrape(s)
            if sum(counted(samples, "socket", decision, reason, "1xx") for decision, reason in tunnels) == 3:
                break
            await asyncio.sleep(0.02)
    assert counted(samples, "socket", "would_deny", "token_missing", "1xx") == 1
    assert counted(samples, "socket", "would_deny", "audience", "1xx") == 1
    assert counted(samples, "socket", "allowed", "", "1xx") == 1


async def test_a_reload_from_report_to_enforce_takes_effect(sidecar: Any, rsa_key: TestKey) -> None:
    s = await start(sidecar)
    path = Path(s.runtime.config_path)
    bad = good({"aud": "api://other"}, key=rsa_key)
    async with await s.get("/rollout/x", headers=bearer(bad)) as response:
        assert response.status == 200
    path.write_text(path.read_text().replace("      mode: report\n", ""))
    assert await reload(s.runtime) is True
    before = len(s.upstream.seen)
    async with await s.get("/rollout/x", headers=bearer(bad)) as response:
        assert response.status == 401
    async with await s.get("/rollout/x") as response:
        assert response.status == 401
    assert len(s.upstream.seen) == before
    # And back: report mode again.
    path.write_text(path.read_text().replace("      provider: main\n", "      provider: main\n      mode: report\n", 1))
    assert await reload(s.runtime) is True
    async with await s.get("/rollout/x", headers=bearer(bad)) as response:
        assert response.status == 200
    assert_anonymous(s.upstream.last(), "after the reload back")
    samples = await scrape(s)
    assert counted(samples, "rollout", "would_deny", "audience") == 2
    assert counted(samples, "rollout", "denied", "audience", "4xx") == 1


async def test_run_says_at_start_which_routes_are_in_report_mode_and_logs_each_would_deny(
    aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    # The real process (`python -m proxy run`): its start log, its operator log and its access log.
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = (
        f'upstream: {{url: "{upstream.url}"}}\n'
        f'providers:\n  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{jwks_server.url()}"}}}}\n'
        "routes:\n"
        "  - {name: orders, match: {path_prefix: /orders/}, auth: {provider: main, mode: report}}\n"
        "  - {name: api, match: {path_prefix: /}, auth: {provider: main}}\n"
        "drain_timeout: 1s\nlog_format: json\n"
    )
    async with running(tmp_path, text) as run:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{run.url}/orders/1", headers={"X-User-Id": "admin"}) as response:
                assert response.status == 200
            async with session.get(f"{run.url}/users/1") as response:
                assert response.status == 401
        assert await run.stop(timeout=15) == 0
    path, out, err = run.config, run.out, run.err
    assert upstream.last().header("X-User-Id") is None
    events = [json.loads(line) for line in err.decode().splitlines()]
    [warned] = [e for e in events if e["event"] == "config_warning"]
    assert warned["level"] == "WARNING"
    assert warned["message"].startswith(
        f"{path}:5: warning: routes[0]: route 'orders' is in report mode (auth.mode: report)"
    )
    [would] = [e for e in events if e["event"] == "request_would_deny"]
    assert would["level"] == "INFO" and would["route"] == "orders" and would["reason"] == "token_missing"
    assert would["would_answer"] == 401 and would["provider"] == "main"
    access = [json.loads(line) for line in out.decode().splitlines()]
    assert [(a["route"], a["status"], a["decision"], a["reason"]) for a in access] == [
        ("orders", 200, "would_deny", "token_missing"),
        ("api", 401, "denied", "token_missing"),
    ]
