"""CORS on the wire (issue 13, item 2): the real proxy on loopback, a real recording upstream,
a real JWKS server and real keys; every request over a raw socket, so each answer's header
lines are read exactly as a browser gets them.

What a browser app relies on: its preflight is answered by the sidecar (204, no token, never
forwarded) or refused (403, counted and logged with its reason); every answer on a CORS
route, the upstream's and the sidecar's own refusals alike, carries the CORS headers for the
request's own origin and nobody else's (the refusals are memoised, the origins are not), with
`Vary: Origin`; the upstream's own `Access-Control-*` fields are replaced; a route without
`cors` is untouched (its OPTIONS is an ordinary request). Unit cases of the policy itself are
in tests/unit/request/test_cors.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.reload import reload
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.integration.conftest import Sidecar
from tests.integration.test_http1_attacks import FRAME, responses, ws_head
from tests.integration.test_refusals import BreakableClock
from tests.integration.test_security import RawResponse, raw_get, send_raw
from tests.support.process import running
from tests.support.raw import bounded_by

APP = "https://app.example.com"
PREVIEW = "https://pr-12.preview.example.com"
EVIL = "https://evil.example"

CONFIG = r"""
realm: api
upstream: {url: "{upstream}", timeout: 2s, connect_timeout: 1s, max_body: 1MB}
providers:
  main:
    issuer: {issuer}
    audiences: [{audience}]
    jwks: {url: "{jwks}", min_refresh_interval: 1s}
    headers:
      claims: {sub: X-User-Id}
cors:
  allow_origins:
    - https://app.example.com
    - 'regex:https://pr-[0-9]+\.preview\.example\.com'
  allow_methods: [GET, POST, PUT, DELETE]
  allow_headers: [Authorization, Content-Type]
  expose_headers: [X-Request-Id]
  max_age: 10m
routes:
  - {name: public, match: {path_prefix: /public/}, auth: none}
  - name: creds
    match: {path_prefix: /creds/}
    auth: {provider: main}
    cors: {allow_origins: [https://app.example.com], allow_credentials: true}
  - name: open
    match: {path_prefix: /open/}
    auth: none
    cors: {allow_origins: ['*']}
  - name: stray
    match: {path_prefix: /stray/}
    auth: none
    upstream: {url: "http://127.0.0.1:{stray}"}
  - name: stray-plain
    match: {path_prefix: /stray-plain/}
    auth: none
    upstream: {url: "http://127.0.0.1:{stray}"}
    cors: false
  - {name: admin, match: {path_prefix: /admin/}, auth: {provider: main, scopes: {all_of: [admin]}}}
  - {name: plain, match: {path_prefix: /plain/}, auth: {provider: main}, cors: false}
  - name: writes
    match: {path_prefix: /docs/, methods: [PUT]}
    auth: {provider: main}
    cors: {allow_origins: ['*'], allow_methods: [PUT]}
  - {name: api, match: {path_prefix: /}, auth: {provider: main}}
""".replace("{issuer}", ISSUER).replace("{audience}", AUDIENCE)

CORS_NAMES = {
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-expose-headers",
    "access-control-max-age",
}

bounded = bounded_by(20.0)


async def stray_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    """An upstream that answers every request with its own CORS fields (a framework's `*`)."""
    with suppress(ConnectionError, asyncio.IncompleteReadError):
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(
                b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\n"
                b"access-control-allow-credentials: true\r\nAccess-Control-Max-Age: 99\r\n"
                b"X-Other: kept\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()


@pytest.fixture
async def cors_sidecar(sidecar: Any, raw_server: Any) -> Any:
    async def make(text: str = CONFIG, **kwargs: Any) -> Sidecar:
        stray = await raw_server(stray_upstream)
        return await sidecar(text, stray=str(stray.port), **kwargs)

    return make


def preflight(
    origin: str | None = APP, method: str | None = "PUT", headers: str | None = "authorization,content-type"
) -> list[tuple[str, str]]:
    fields = []
    if origin is not None:
        fields.append(("Origin", origin))
    if method is not None:
        fields.append(("Access-Control-Request-Method", method))
    if headers is not None:
        fields.append(("Access-Control-Request-Headers", headers))
    return fields


def bearer(key: TestKey, **claims: Any) -> tuple[str, str]:
    return ("Authorization", f"Bearer {mint(claims or None, key=key)}")


def cors_fields(answer: RawResponse) -> dict[str, list[str]]:
    """The answer's CORS fields and Vary, by lower-case name, every value as sent."""
    found: dict[str, list[str]] = {}
    for name, value in answer.headers.items():
        if name.lower() in CORS_NAMES or name.lower() == "vary":
            found.setdefault(name.lower(), []).append(value)
    return found


def allowed_for(origin: str, *, expose: bool = True) -> dict[str, list[str]]:
    """What every answer on the top-level policy's routes says to an allowed origin."""
    expected = {"access-control-allow-origin": [origin], "vary": ["Origin"]}
    if expose:
        expected["access-control-expose-headers"] = ["X-Request-Id"]
    return expected


def requests_total(s: Sidecar) -> dict[tuple[str, str, str, str, str], float]:
    counts: dict[tuple[str, str, str, str, str], float] = {}
    for family in text_string_to_metric_families(s.runtime.metrics.render()[0].decode()):
        for sample in family.samples:
            if sample.name == "jwt_sidecar_requests_total":
                labels = sample.labels
                key = (labels["route"], labels["method"], labels["decision"], labels["reason"], labels["status"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def grown(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}


# -- preflights ------------------------------------------------------------------------------
@bounded
async def test_an_allowed_preflight_is_answered_by_the_sidecar_without_a_token(cors_sidecar: Any) -> None:
    s = await cors_sidecar()
    before = requests_total(s)
    answer = await raw_get(s, "/orders/7", preflight(), method="OPTIONS")
    assert answer.status == 204, answer.raw
    assert answer.body == b"" and "Content-Length" not in answer.headers
    assert cors_fields(answer) == {
        "access-control-allow-origin": [APP],
        "access-control-allow-methods": ["GET, POST, PUT, DELETE"],
        "access-control-allow-headers": ["Authorization, Content-Type"],
        "access-control-max-age": ["600"],
        "vary": ["Origin"],
    }
    assert "WWW-Authenticate" not in answer.headers and answer.headers["X-Request-Id"]
    assert s.upstream.seen == [], "a preflight is never forwarded"
    assert grown(before, requests_total(s)) == {("api", "OPTIONS", "allowed", "", "2xx"): 1.0}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param(preflight(origin=EVIL), "cors_origin", id="origin"),
        pytest.param(preflight(origin="https://pr-x.preview.example.com"), "cors_origin", id="regex-origin"),
        pytest.param(preflight(origin="null"), "cors_origin", id="null-origin"),
        pytest.param(preflight(method="PATCH"), "cors_method", id="method"),
        pytest.param(preflight(method="put"), "cors_method", id="method-case"),
        pytest.param(preflight(headers="authorization,x-secret"), "cors_headers", id="headers"),
    ],
)
@bounded
async def test_a_refused_preflight_is_a_403_counted_with_its_reason_and_never_forwarded(
    cors_sidecar: Any, fields: list[tuple[str, str]], reason: str
) -> None:
    s = await cors_sidecar()
    before = requests_total(s)
    answer = await raw_get(s, "/orders/7", fields, method="OPTIONS")
    assert answer.status == 403, answer.raw
    body = json.loads(answer.body)
    assert body["error"] == "cors_refused" and body["error_description"]
    # No CORS header: the browser's check fails on the status and on the missing origin alike.
    assert cors_fields(answer) == {"vary": ["Origin"]}
    assert "WWW-Authenticate" not in answer.headers
    assert s.upstream.seen == []
    assert grown(before, requests_total(s)) == {("api", "OPTIONS", "rejected", reason, "4xx"): 1.0}


@bounded
async def test_a_refused_preflight_tells_the_operator_what_was_refused(
    cors_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = await cors_sidecar()
    caplog.set_level(logging.DEBUG, logger="jwt_sidecar")
    await raw_get(s, "/orders/7", preflight(origin="https://evil.example\\x"), method="OPTIONS")
    await raw_get(s, "/orders/7", preflight(headers="x-secret"), method="OPTIONS")
    refusals = [
        (r.fields["reason"], r.fields["route"], r.fields["detail"])
        for r in caplog.records
        if getattr(r, "event", None) == "request_refused"
    ]
    assert refusals == [
        ("cors_origin", "api", "origin 'https://evil.example\\\\x' is not in allow_origins"),
        ("cors_headers", "api", "header 'x-secret' is not in allow_headers"),
    ]


@bounded
async def test_a_preflight_on_a_route_without_cors_is_an_ordinary_options_request(
    cors_sidecar: Any, rsa_key: TestKey
) -> None:
    s = await cors_sidecar()
    answer = await raw_get(s, "/plain/x", preflight(), method="OPTIONS")
    assert answer.status == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer ")
    assert cors_fields(answer) == {}
    # With a token it goes to the upstream like any OPTIONS, its CORS fields untouched.
    answer = await raw_get(s, "/plain/x", [*preflight(), bearer(rsa_key)], method="OPTIONS")
    assert answer.status == 200
    seen = s.upstream.last()
    assert seen.method == "OPTIONS" and seen.header("Origin") == APP and seen.header("Access-Control-Request-Method")
    # An OPTIONS on a CORS route without Access-Control-Request-Method is no preflight either.
    answer = await raw_get(s, "/orders", [("Origin", APP)], method="OPTIONS")
    assert answer.status == 401 and cors_fields(answer) == allowed_for(APP)


@bounded
async def test_a_preflight_is_judged_by_the_route_of_the_method_it_announces(cors_sidecar: Any) -> None:
    s = await cors_sidecar()
    before = requests_total(s)
    # PUT /docs/ is the `writes` route (any origin); DELETE /docs/ is `api` (listed origins).
    answer = await raw_get(s, "/docs/x", preflight(origin=EVIL, headers=None), method="OPTIONS")
    assert answer.status == 204 and cors_fields(answer) == {
        "access-control-allow-origin": ["*"],
        "access-control-allow-methods": ["PUT"],
        "access-control-allow-headers": ["Authorization, Content-Type"],
    }
    answer = await raw_get(s, "/docs/x", preflight(origin=EVIL, method="DELETE", headers=None), method="OPTIONS")
    assert answer.status == 403
    assert grown(before, requests_total(s)) == {
        ("writes", "OPTIONS", "allowed", "", "2xx"): 1.0,
        ("api", "OPTIONS", "rejected", "cors_origin", "4xx"): 1.0,
    }
    # `null` (a sandboxed page) is allowed by `*` alone, and a `*` answer varies on nothing.
    answer = await raw_get(s, "/open/x", preflight(origin="null", method="POST", headers=None), method="OPTIONS")
    assert answer.status == 204 and cors_fields(answer)["access-control-allow-origin"] == ["*"]
    assert "vary" not in cors_fields(answer)


# -- answers on a CORS route ------------------------------------------------------------------
@bounded
async def test_the_upstreams_answer_carries_the_cors_headers_of_the_allowed_origin(
    cors_sidecar: Any, rsa_key: TestKey
) -> None:
    s = await cors_sidecar()
    answer = await raw_get(s, "/orders/7", [("Origin", APP), bearer(rsa_key)])
    assert answer.status == 200
    assert cors_fields(answer) == allowed_for(APP)
    assert s.upstream.last().header("Origin") == APP, "the Origin goes on to the upstream"
    # A regex origin, an answer too large to relay in one write, a 204, a public route alike.
    answer = await raw_get(s, "/download?bytes=200000", [("Origin", PREVIEW), bearer(rsa_key)])
    assert answer.status == 200 and len(answer.raw) > 200000, answer.raw[:300]
    assert cors_fields(answer) == allowed_for(PREVIEW)
    answer = await raw_get(s, "/status/204", [("Origin", PREVIEW), bearer(rsa_key)])
    assert answer.status == 204 and cors_fields(answer) == allowed_for(PREVIEW)
    answer = await raw_get(s, "/public/x", [("Origin", PREVIEW)])
    assert answer.status == 200 and cors_fields(answer) == allowed_for(PREVIEW)


@bounded
async def test_our_own_refusals_carry_the_cors_headers_so_the_page_can_read_them(
    cors_sidecar: Any, rsa_key: TestKey
) -> None:
    s = await cors_sidecar()
    answer = await raw_get(s, "/orders/7", [("Origin", APP)])
    assert answer.status == 401 and answer.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert cors_fields(answer) == allowed_for(APP)
    answer = await raw_get(s, "/orders/7", [("Origin", APP), ("Authorization", "Bearer x.y.z")])
    assert answer.status == 401 and json.loads(answer.body)["error"] == "invalid_token"
    assert cors_fields(answer) == allowed_for(APP)
    answer = await raw_get(s, "/admin/x", [("Origin", PREVIEW), bearer(rsa_key)])
    assert answer.status == 403 and "insufficient_scope" in answer.headers["WWW-Authenticate"]
    assert cors_fields(answer) == allowed_for(PREVIEW)
    # Two Authorization lines on a public route: refused before any question of identity.
    answer = await raw_get(s, "/public/x", [("Origin", APP), ("Authorization", "a"), ("Authorization", "b")])
    assert answer.status == 400 and cors_fields(answer) == allowed_for(APP)


@bounded
async def test_an_error_of_ours_carries_them_too(cors_sidecar: Any, rsa_key: TestKey) -> None:
    clock = BreakableClock()
    s = await cors_sidecar(clock=clock)
    clock.broken = True
    answer = await raw_get(s, "/orders/7", [("Origin", APP), bearer(rsa_key)])
    assert answer.status == 500 and cors_fields(answer) == allowed_for(APP)


@bounded
async def test_vary_origin_on_every_answer_that_depends_on_it(cors_sidecar: Any, rsa_key: TestKey) -> None:
    s = await cors_sidecar()
    for fields in ([], [("Origin", EVIL)], [("Origin", "null")], [("Origin", APP), ("Origin", EVIL)]):
        for target, extra in (("/orders", [bearer(rsa_key)]), ("/orders", []), ("/public/x", [])):
            answer = await raw_get(s, target, [*fields, *extra])
            assert answer.status in (200, 401)
            assert cors_fields(answer) == {"vary": ["Origin"]}, (fields, target)
    # `*` is the same answer for everyone: nothing varies, the null origin included.
    for fields in ([], [("Origin", "null")], [("Origin", EVIL)]):
        answer = await raw_get(s, "/open/x", fields)
        assert cors_fields(answer) == {"access-control-allow-origin": ["*"]}


@bounded
async def test_credentials_echo_the_origin_and_say_so_on_every_answer(cors_sidecar: Any, rsa_key: TestKey) -> None:
    s = await cors_sidecar()
    answer = await raw_get(s, "/creds/x", preflight(method="GET", headers="authorization"), method="OPTIONS")
    assert answer.status == 204
    assert cors_fields(answer) == {
        "access-control-allow-origin": [APP],
        "access-control-allow-credentials": ["true"],
        "access-control-allow-methods": ["GET, HEAD, POST"],
        "access-control-allow-headers": ["Authorization, Content-Type"],
        "vary": ["Origin"],
    }
    credentialed = {
        "access-control-allow-origin": [APP],
        "access-control-allow-credentials": ["true"],
        "vary": ["Origin"],
    }
    assert cors_fields(await raw_get(s, "/creds/x", [("Origin", APP)])) == credentialed
    assert cors_fields(await raw_get(s, "/creds/x", [("Origin", APP), bearer(rsa_key)])) == credentialed
    # The route's own policy replaces the top-level one whole: the preview origins are not in it.
    assert cors_fields(await raw_get(s, "/creds/x", [("Origin", PREVIEW)])) == {"vary": ["Origin"]}


@bounded
async def test_the_upstreams_own_cors_fields_are_replaced_on_a_cors_route_only(cors_sidecar: Any) -> None:
    s = await cors_sidecar()
    answer = await raw_get(s, "/stray/x", [("Origin", APP)])
    assert answer.status == 200 and answer.body == b"ok"
    assert cors_fields(answer) == allowed_for(APP), "one Access-Control-Allow-Origin: ours"
    assert answer.headers["X-Other"] == "kept"
    answer = await raw_get(s, "/stray/x", [("Origin", EVIL)])
    assert cors_fields(answer) == {"vary": ["Origin"]}, "an origin we refuse gets no upstream `*` either"
    answer = await raw_get(s, "/stray-plain/x", [("Origin", EVIL)])
    assert cors_fields(answer) == {
        "access-control-allow-origin": ["*"],
        "access-control-allow-credentials": ["true"],
        "access-control-max-age": ["99"],
    }, "a route without cors relays the upstream's answer untouched"


@bounded
async def test_head_answers_carry_the_headers_and_no_body(cors_sidecar: Any, rsa_key: TestKey) -> None:
    s = await cors_sidecar()
    for fields, status in (([("Origin", APP), bearer(rsa_key)], 200), ([("Origin", APP)], 401)):
        raw = await send_raw(
            s,
            b"HEAD /orders HTTP/1.1\r\nHost: x\r\n"
            + b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)
            + b"Connection: close\r\n\r\n",
        )
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status) and rest == b"", raw
        assert b"\r\nAccess-Control-Allow-Origin: https://app.example.com\r\n" in head
        assert b"\r\nVary: Origin\r\n" in head


# -- no answer ever carries another request's origin --------------------------------------------
@bounded
async def test_alternating_origins_never_see_each_others_headers(cors_sidecar: Any, rsa_key: TestKey) -> None:
    """The refusals are prepared once per reason and reused: the origin's lines are added per answer."""
    s = await cors_sidecar()
    token = bearer(rsa_key)
    origins = [APP, PREVIEW, EVIL, None, "https://pr-7.preview.example.com", "null"]

    def expected(origin: str | None) -> dict[str, list[str]]:
        allowed = origin in (APP, PREVIEW, "https://pr-7.preview.example.com")
        return allowed_for(origin) if allowed and origin is not None else {"vary": ["Origin"]}

    async def one(i: int) -> None:
        origin = origins[i % len(origins)]
        fields = [] if origin is None else [("Origin", origin)]
        for extra in ([], [token], [("Authorization", "Bearer bad")]):
            answer = await raw_get(s, f"/orders/{i}", [*fields, *extra])
            assert answer.status in (200, 401)
            assert cors_fields(answer) == expected(origin), (origin, extra, answer.raw[:400])

    for _ in range(2):
        await asyncio.gather(*(one(i) for i in range(24)))


@bounded
async def test_pipelined_requests_with_different_origins_on_one_connection(cors_sidecar: Any, rsa_key: TestKey) -> None:
    s = await cors_sidecar()
    token = mint(key=rsa_key)

    def request(method: str, target: str, *fields: str) -> bytes:
        return "\r\n".join([f"{method} {target} HTTP/1.1", "Host: x", *fields, "", ""]).encode()

    raw = await send_raw(
        s,
        request("GET", "/orders/1", f"Origin: {APP}")
        + request("OPTIONS", "/orders/2", f"Origin: {PREVIEW}", "Access-Control-Request-Method: DELETE")
        + request("GET", "/public/3", f"Origin: {EVIL}")
        + request("OPTIONS", "/orders/4", f"Origin: {EVIL}", "Access-Control-Request-Method: PUT")
        + request("GET", "/orders/5", f"Origin: {PREVIEW}", f"Authorization: Bearer {token}")
        + request("GET", "/public/6", "Connection: close"),
    )
    answers = responses(raw)
    assert [a.status for a in answers] == [401, 204, 200, 403, 200, 200]
    assert [cors_fields(a).get("access-control-allow-origin") for a in answers] == [
        [APP],
        [PREVIEW],
        None,
        None,
        [PREVIEW],
        None,
    ]
    assert all(cors_fields(a)["vary"] == ["Origin"] for a in answers)
    assert [seen.raw_path for seen in s.upstream.seen] == ["/public/3", "/orders/5", "/public/6"]


# -- WebSocket handshakes ---------------------------------------------------------------------
@bounded
async def test_a_websocket_handshake_with_an_origin_is_authenticated_and_forwarded_as_usual(
    cors_sidecar: Any, rsa_key: TestKey
) -> None:
    s = await cors_sidecar()
    token = mint(key=rsa_key)
    for origin in (APP, EVIL):
        host, port = s.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(ws_head("/ws", f"Origin: {origin}\r\nAuthorization: Bearer {token}\r\n"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 "), head
            # CORS does not apply to WebSockets: the upstream sees the Origin and judges it.
            assert s.upstream.last().header("Origin") == origin
            greeting = await asyncio.wait_for(reader.readexactly(2), 5)
            assert greeting[0] == 0x81  # a text frame: the tunnel is open
            writer.write(FRAME)
        finally:
            writer.close()
    # Refused by us (no token), the handshake's 401 is readable by an allowed origin like any answer.
    raw = await send_raw(s, ws_head("/ws", f"Origin: {APP}\r\nConnection: close\r\n"))
    answer = responses(raw)[0]
    assert answer.status == 401 and cors_fields(answer) == allowed_for(APP)


# -- reload ----------------------------------------------------------------------------------
@bounded
async def test_a_reload_that_changes_the_policy_applies_to_the_next_request(
    cors_sidecar: Any, rsa_key: TestKey
) -> None:
    s = await cors_sidecar()
    assert (await raw_get(s, "/orders", preflight(), method="OPTIONS")).status == 204
    path = Path(s.runtime.config_path)
    path.write_text(path.read_text().replace("    - https://app.example.com\n", "    - https://new.example.com\n"))
    assert await reload(s.runtime) is True
    assert (await raw_get(s, "/orders", preflight(), method="OPTIONS")).status == 403
    answer = await raw_get(s, "/orders", preflight(origin="https://new.example.com"), method="OPTIONS")
    assert answer.status == 204 and cors_fields(answer)["access-control-allow-origin"] == ["https://new.example.com"]
    assert cors_fields(await raw_get(s, "/orders", [("Origin", APP)])) == {"vary": ["Origin"]}
    # And away altogether: OPTIONS is an ordinary request again, answers carry no CORS line.
    text = path.read_text()
    path.write_text(text[: text.index("cors:\n")] + text[text.index("routes:\n") :])
    assert await reload(s.runtime) is True
    answer = await raw_get(s, "/orders", preflight(origin="https://new.example.com"), method="OPTIONS")
    assert answer.status == 401 and cors_fields(answer) == {}
    assert cors_fields(await raw_get(s, "/orders", [("Origin", "https://new.example.com"), bearer(rsa_key)])) == {}


# -- the real process: access log --------------------------------------------------------------
@bounded
async def test_run_answers_preflights_and_logs_them_under_the_judging_route(
    aiohttp_server: Any, jwks_server: Any, raw_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    from tests.conftest import jwks_of
    from tests.support.upstream import start_upstream

    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    stray = await raw_server(stray_upstream)
    text = (
        CONFIG.replace("{upstream}", upstream.url)
        .replace("{jwks}", jwks_server.url())
        .replace("{stray}", str(stray.port))
        + "access_log: true\n"
    )
    async with running(tmp_path, text) as run:
        base = run.url
        async with aiohttp.ClientSession() as session:
            ask = {"Origin": APP, "Access-Control-Request-Method": "PUT"}
            async with session.options(base + "/orders/7", headers=ask) as response:
                assert response.status == 204
                assert response.headers["Access-Control-Allow-Origin"] == APP
            async with session.options(base + "/orders/7", headers={**ask, "Origin": EVIL}) as response:
                assert response.status == 403
            async with session.get(base + "/orders/7", headers={"Origin": APP}) as response:
                assert response.status == 401 and response.headers["Access-Control-Allow-Origin"] == APP
            async with session.get(f"{run.admin_url}/metrics") as response:
                metrics = await response.text()
        assert (
            'jwt_sidecar_requests_total{decision="rejected",method="OPTIONS",reason="cors_origin",'
            'route="api",status="4xx"} 1.0' in metrics
        )
        assert await run.stop(timeout=10) == 0
        lines = [json.loads(line) for line in run.out.decode().splitlines() if line.startswith("{")]
        options = [line for line in lines if line.get("method") == "OPTIONS"]
        assert [(o["route"], o["status"], o["decision"], o["reason"]) for o in options] == [
            ("api", 204, "allowed", ""),
            ("api", 403, "rejected", "cors_origin"),
        ]
        assert upstream.seen == [], "nothing reached the upstream"


# -- the README's worked example, on the real proxy ----------------------------------------------
@bounded
async def test_the_readme_example_is_what_the_proxy_answers(sidecar: Any) -> None:
    import re

    from tests.project.test_readme_reference import fenced_blocks, section

    text = section("### CORS")
    example = next(body for language, body in fenced_blocks(text) if language == "yaml")
    provider = CONFIG[: CONFIG.index("cors:\n")]  # realm, upstream and the provider `main`
    s = await sidecar(provider + example)
    shell = next(body for language, body in fenced_blocks(text) if body.startswith("$ curl"))
    command, _, shown = shell.partition("HTTP/1.1 204 No Content\n")
    sent = re.findall(r"-H '([^:]+): ([^']*)'", command)
    target = re.search(r"http://127\.0\.0\.1:8080(\S+)", command).group(1)  # type: ignore[union-attr]
    answer = await raw_get(s, target, sent, method="OPTIONS")
    assert answer.status == 204
    head = answer.raw.partition(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
    # "(and `X-Request-Id` and `Date`, as on every answer)"; Connection: ours, as the client asked.
    assert [line for line in head if not line.startswith(("X-Request-Id:", "Date:", "Connection:"))] == (
        shown.strip().splitlines()
    )
    assert s.upstream.seen == []
    # "The `PUT` that follows is authenticated as usual, and its answer, the upstream's or a 401, gets …"
    words = " ".join(text.split())
    origin = dict(sent)["Origin"]
    answer = await raw_get(s, target, [("Origin", origin)], method="PUT")
    assert answer.status == 401
    added = [f"{name}: {value}" for name, value in answer.headers.items() if name.startswith(("Access-", "Vary"))]
    assert added and all(f"`{line}`" in words for line in added), added
    refused = await raw_get(
        s, target, [(n, "https://evil.example" if n == "Origin" else v) for n, v in sent], method="OPTIONS"
    )
    assert refused.status == 403 and f"`{refused.body.decode()}`" in words
