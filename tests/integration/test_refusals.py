"""Every refusal the proxy can give, on the wire, against the README's table of reasons.

One case per way of getting each `errors.Reason` (and each status a reason can have), sent
over a raw socket to the real proxy on loopback. For every answer: the reason it is counted
under, its status and `error` as the README's "Answers the client gets" table says, and RFC
6750's rules: a challenge's `error` and `error_description` are exactly the JSON body's (none
at all for a request without a token, §3.1), `invalid_request` is a 400, `invalid_token` a
401, `insufficient_scope` a 403, and every 401 carries a challenge (RFC 9110 §15.5.2).
The README table and the code's `Reason` are compared in both directions, reasons and statuses.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.base.errors import ProxyError, Reason
from proxy.config import builder as config
from proxy.http.http1 import Server
from proxy.request.app import Proxy
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint, refused_port
from tests.integration.test_security import RawResponse, first_response, forge, valid_claims
from tests.support.upstream import start_upstream

README = Path(__file__).parents[2] / "README.md"


# -- the README's table ----------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    statuses: frozenset[int]
    error: str | None
    meaning: str


def readme_reasons() -> dict[str, Row]:
    """reason -> its row, from the table under "### Answers the client gets" whose first column is `reason`."""
    text = README.read_text()
    section = text.split("\n### Answers the client gets\n", 1)[1].split("\n#", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| reason | status | `error` |"))
    assert set(lines[start + 1].replace("|", "").split()) == {"---"}, "a header row, then its --- row"
    rows: dict[str, Row] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        reason = re.fullmatch(r"`([a-z_]+)`", cells[0])
        assert reason is not None, f"a reason is written `like_this`: {cells[0]!r}"
        assert reason.group(1) not in rows, f"{reason.group(1)} twice in the README table"
        error = re.fullmatch(r"`([a-z_]+)`", cells[2])
        assert error is not None or cells[2].startswith("—"), f"an error code or — (none): {cells[2]!r}"
        statuses = frozenset(int(s) for s in re.findall(r"\b\d{3}\b", cells[1]))
        assert statuses and re.fullmatch(r"\d{3}(, \d{3})*", cells[1]), f"status list: {cells[1]!r}"
        assert cells[3], f"{reason.group(1)}: what it means"
        rows[reason.group(1)] = Row(statuses, error.group(1) if error else None, cells[3])
    return rows


def test_the_readme_table_has_every_reason_of_the_code_and_no_other() -> None:
    documented = set(readme_reasons())
    code = {str(reason) for reason in Reason}
    assert documented - code == set(), "in the README, unknown to the code"
    assert code - documented == set(), "in the code, missing from the README"


# -- the challenge ---------------------------------------------------------------------------
_PARAM = re.compile(r'\s*([A-Za-z_]+)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_challenge(value: str) -> dict[str, str]:
    """The auth-params of one `Bearer` challenge (RFC 6750 §3), quoted-strings unescaped."""
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer", value
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM.match(rest, position)
        assert match is not None, f"not an auth-param list: {rest[position:]!r}"
        assert match.group(1) not in params, value
        params[match.group(1)] = re.sub(r"\\(.)", r"\1", match.group(2))
        position = match.end()
    return params


# Status of each RFC 6750 §3.1 error code.
RFC6750_STATUS = {"invalid_request": 400, "invalid_token": 401, "insufficient_scope": 403}
FIXED_PHRASES = {ProxyError(reason).description for reason in Reason}


def check_answer(answer: RawResponse) -> None:
    """RFC 6750 and our own rules for any refusal, whatever its reason."""
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
    body = json.loads(answer.body)
    assert isinstance(body, dict) and set(body) <= {"error", "error_description"}, body
    challenges = answer.headers.getall("WWW-Authenticate", [])
    assert len(challenges) <= 1
    if answer.status == 401:
        assert challenges, "a 401 without a challenge (RFC 9110 §15.5.2)"
    if challenges:
        params = parse_challenge(challenges[0])
        assert params["realm"] == "api"
        # The body says exactly what the challenge says: the same code and phrase, or neither.
        assert body.get("error") == params.get("error")
        assert body.get("error_description") == params.get("error_description")
        if "error" not in params:
            assert answer.status == 401 and body == {} and set(params) == {"realm"}, "no credentials: no error"
        else:
            assert answer.status == RFC6750_STATUS[params["error"]], params
            if "scope" in params:  # optional (RFC 6750 §3), and only about scope
                assert params["error"] == "insufficient_scope"
    else:
        # Without a challenge, no RFC 6750 code: those are answers about credentials.
        assert body.get("error") not in ("invalid_token", "insufficient_scope"), body
        assert answer.status != 401
    if "error_description" in body:
        phrase = HTTPStatus(answer.status).phrase
        assert body["error_description"] in FIXED_PHRASES | {phrase, "Request-URI Too Long"}, body


# -- the cases -------------------------------------------------------------------------------
CONFIG = f"""\
realm: api
header_timeout: 300ms
upstream: {{url: "{{upstream}}", timeout: 400ms, connect_timeout: 1s, max_body: 1KB}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    max_token_age: 1h
    typ: at+jwt
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email}}
  down:
    issuer: https://down.test
    audiences: [{AUDIENCE}]
    jwks: {{url: "http://127.0.0.1:{{dead}}/jwks", timeout: 1s}}
routes:
  - {{name: public, match: {{path_prefix: /public/}}, auth: none}}
  - {{name: slow, match: {{path_exact: /slow}}, auth: none}}
  - name: dead
    match: {{path_prefix: /dead/}}
    auth: none
    upstream: {{url: "http://127.0.0.1:{{dead}}", connect_timeout: 1s}}
  - {{name: down, match: {{path_prefix: /down/}}, auth: {{provider: down}}}}
  - name: admin
    match: {{path_prefix: /admin/}}
    auth:
      provider: main
      scopes: {{all_of: [admin]}}
      claims: [{{claim: email_verified, equals: true}}]
  - {{name: maybe, match: {{path_prefix: /maybe/}}, auth: {{provider: main, optional: true}}}}
  - {{name: api, match: {{path_prefix: /api/}}, auth: {{provider: main}}}}
  - name: cors
    match: {{path_prefix: /cors/}}
    auth: {{provider: main}}
    cors: {{allow_origins: [https://app.test], allow_methods: [GET, PUT], allow_headers: [Authorization]}}
# The list names one subject; `fail: closed`, so a list too old is a 503 (the case moves the clock).
revocation: {{file: "{{revoked}}", fail: closed, max_staleness: 30s}}
"""
REVOKED_RULES = "rules: [{sub: revoked-user}]\n"

TYP = {"typ": "at+jwt"}


def dead_port() -> int:
    """A loopback port nothing listens on, for the whole run (tests.conftest.refused_port)."""
    return refused_port()


def head(target: str, *fields: str, method: str = "GET", version: str = "1.1") -> bytes:
    return "\r\n".join(
        [f"{method} {target} HTTP/{version}", "Host: sidecar.test", *fields, "Connection: close", "", ""]
    ).encode("latin-1")


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


Build = Callable[[TestKey, TestKey], bytes | list[bytes]]
"""The bytes of one request (a list: parts sent 0.2 s apart), from the provider's key and a
key the provider does not hold."""


@dataclass(frozen=True)
class Case:
    id: str
    reason: Reason
    status: int
    build: Build


def token(key: TestKey, claims: dict[str, Any] | None = None, **kwargs: Any) -> str:
    return mint(claims, key=key, headers={**TYP, **kwargs.pop("headers", {})}, **kwargs)


def _chunked_then_garbage(key: TestKey, other: TestKey) -> list[bytes]:
    # The bad chunk comes once the body is on its way upstream, so the proxy's forwarding
    # (not the parser, before any handler ran) is what finds it.
    return [head("/public/upload", "Transfer-Encoding: chunked", method="POST") + b"5\r\nhello\r\n", b"zz\r\n"]


CASES = [
    Case("no-token", Reason.TOKEN_MISSING, 401, lambda k, o: head("/api/x")),
    Case("basic-is-no-token", Reason.TOKEN_MISSING, 401, lambda k, o: head("/api/x", "Authorization: Basic dTpw")),
    Case(
        "two-bearer-lines",
        Reason.MULTIPLE_TOKENS,
        400,
        lambda k, o: head("/api/x", bearer(token(k)), bearer(token(k, {"sub": "b"}))),
    ),
    Case("bearer-two-words", Reason.MALFORMED_REQUEST, 400, lambda k, o: head("/api/x", "Authorization: Bearer a b")),
    Case(
        "authorization-twice",
        Reason.MALFORMED_REQUEST,
        400,
        lambda k, o: head("/public/x", "Authorization: Basic dTpw", "Authorization: Basic dTpx"),
    ),
    Case("chunked-body-breaks", Reason.MALFORMED_REQUEST, 400, _chunked_then_garbage),
    Case(
        "parser-bad-framing",
        Reason.MALFORMED_REQUEST,
        400,
        lambda k, o: head("/public/x", "Content-Length: 3", "Transfer-Encoding: chunked", method="POST"),
    ),
    Case("parser-long-target", Reason.MALFORMED_REQUEST, 414, lambda k, o: head("/public/" + "a" * 9000)),
    Case("parser-huge-field", Reason.MALFORMED_REQUEST, 431, lambda k, o: head("/public/x", "X-Big: " + "a" * 20000)),
    Case(
        "parser-gzip-coding",
        Reason.MALFORMED_REQUEST,
        501,
        lambda k, o: head("/public/x", "Transfer-Encoding: gzip, chunked", method="POST"),
    ),
    Case("parser-http-2.0", Reason.MALFORMED_REQUEST, 505, lambda k, o: head("/public/x", version="2.0")),
    Case("too-large", Reason.TOO_LARGE, 401, lambda k, o: head("/api/x", bearer("a" * 9000))),
    Case("two-segments", Reason.MALFORMED, 401, lambda k, o: head("/api/x", bearer("abc.def"))),
    Case(
        "hs256-on-jwks",
        Reason.ALG_NOT_ALLOWED,
        401,
        lambda k, o: head("/api/x", bearer(mint(valid_claims(), secret=b"k" * 32, headers=TYP))),
    ),
    Case("typ", Reason.TYP, 401, lambda k, o: head("/api/x", bearer(mint(key=k, headers={"typ": "JWT"})))),
    Case(
        "crit",
        Reason.CRIT,
        401,
        lambda k, o: head(
            "/api/x",
            bearer(
                forge(
                    {"alg": "RS256", "kid": k.kid, "typ": "at+jwt", "crit": ["exp"], "exp": 1},
                    valid_claims(),
                    b"x" * 256,
                )
            ),
        ),
    ),
    Case(
        "unknown-kid", Reason.UNKNOWN_KID, 401, lambda k, o: head("/api/x", bearer(token(k, headers={"kid": "nobody"})))
    ),
    Case(
        "bad-signature",
        Reason.BAD_SIGNATURE,
        401,
        lambda k, o: head("/api/x", bearer(token(o, headers={"kid": k.kid}))),
    ),
    Case("exp-is-text", Reason.MALFORMED_CLAIM, 401, lambda k, o: head("/api/x", bearer(token(k, {"exp": "soon"})))),
    Case(
        "expired",
        Reason.EXPIRED,
        401,
        lambda k, o: head("/api/x", bearer(token(k, {"exp": int(time.time()) - 600}, now=time.time() - 1200))),
    ),
    # Optional means "no token is fine", not "a bad token is fine": the same challenge.
    Case(
        "expired-on-an-optional-route",
        Reason.EXPIRED,
        401,
        lambda k, o: head("/maybe/x", bearer(token(k, {"exp": int(time.time()) - 600}, now=time.time() - 1200))),
    ),
    Case(
        "nbf-ahead",
        Reason.NOT_YET_VALID,
        401,
        lambda k, o: head("/api/x", bearer(token(k, {"nbf": int(time.time()) + 600, "exp": int(time.time()) + 900}))),
    ),
    Case(
        "iat-ahead",
        Reason.ISSUED_IN_FUTURE,
        401,
        lambda k, o: head("/api/x", bearer(token(k, {"exp": int(time.time()) + 1200}, now=time.time() + 600))),
    ),
    Case(
        "lifetime-over-max-token-age",
        Reason.TOO_OLD,
        401,
        lambda k, o: head("/api/x", bearer(token(k, {"exp": int(time.time()) + 7200}))),
    ),
    Case("issuer", Reason.ISSUER, 401, lambda k, o: head("/api/x", bearer(token(k, {"iss": "https://evil.test"})))),
    Case("audience", Reason.AUDIENCE, 401, lambda k, o: head("/api/x", bearer(token(k, {"aud": "api://other"})))),
    Case("no-exp", Reason.MISSING_CLAIM, 401, lambda k, o: head("/api/x", bearer(token(k, omit=("exp",))))),
    Case("scope", Reason.SCOPE, 403, lambda k, o: head("/admin/x", bearer(token(k, {"email_verified": True})))),
    Case("claim-rule", Reason.CLAIM_RULE, 403, lambda k, o: head("/admin/x", bearer(token(k, {"scope": "admin"})))),
    Case(
        "newline-in-a-claim-header",
        Reason.UNSAFE_CLAIM,
        401,
        lambda k, o: head("/api/x", bearer(token(k, {"email": "a@b.test\r\nX-Admin: 1"}))),
    ),
    Case("encoded-slash", Reason.BAD_PATH, 400, lambda k, o: head("/public/a%2Fb")),
    Case("options-asterisk", Reason.BAD_PATH, 400, lambda k, o: head("*", method="OPTIONS")),
    Case("no-route", Reason.NO_ROUTE, 404, lambda k, o: head("/elsewhere")),
    Case(
        "body-over-max-body",
        Reason.BODY_TOO_LARGE,
        413,
        lambda k, o: head("/public/upload", "Content-Length: 2000", method="POST") + b"x" * 2000,
    ),
    Case(
        "body-stalls",
        Reason.BODY_TIMEOUT,
        408,
        lambda k, o: head("/public/upload", "Content-Length: 100", method="POST") + b"x" * 10,
    ),
    Case("head-stalls", Reason.HEADER_TIMEOUT, 408, lambda k, o: b"GET /public/x HTTP/1.1\r\nHost: x\r\nX-Pad: "),
    Case("provider-without-keys", Reason.NO_KEYS, 503, lambda k, o: head("/down/x", bearer(token(k)))),
    Case("upstream-refuses", Reason.UPSTREAM_UNAVAILABLE, 502, lambda k, o: head("/dead/x")),
    Case("upstream-too-slow", Reason.UPSTREAM_TIMEOUT, 504, lambda k, o: head("/slow?seconds=2")),
    Case("revoked", Reason.REVOKED, 401, lambda k, o: head("/api/x", bearer(token(k, {"sub": "revoked-user"})))),
    # The list last known current an hour ago (the clock moves; see the test), fail: closed.
    Case("revocation-list-too-old", Reason.REVOCATION_UNAVAILABLE, 503, lambda k, o: head("/api/x", bearer(token(k)))),
    # An unexpected error of ours: the clock breaks once the proxy is up (see broken_sidecar).
    Case("unexpected-error", Reason.INTERNAL, 500, lambda k, o: head("/api/x", bearer(token(k)))),
    # A CORS preflight the route's policy refuses: a 403 without a challenge (no credentials are involved).
    Case(
        "cors-origin",
        Reason.CORS_ORIGIN,
        403,
        lambda k, o: head(
            "/cors/x", "Origin: https://evil.test", "Access-Control-Request-Method: PUT", method="OPTIONS"
        ),
    ),
    Case(
        "cors-method",
        Reason.CORS_METHOD,
        403,
        lambda k, o: head(
            "/cors/x", "Origin: https://app.test", "Access-Control-Request-Method: DELETE", method="OPTIONS"
        ),
    ),
    Case(
        "cors-headers",
        Reason.CORS_HEADERS,
        403,
        lambda k, o: head(
            "/cors/x",
            "Origin: https://app.test",
            "Access-Control-Request-Method: PUT",
            "Access-Control-Request-Headers: authorization, x-secret",
            method="OPTIONS",
        ),
    ),
]


def test_the_cases_cover_every_reason_and_every_status_the_readme_gives_it() -> None:
    table = readme_reasons()
    assert {case.reason for case in CASES} == set(Reason)
    for reason in Reason:
        assert {case.status for case in CASES if case.reason is reason} == table[reason].statuses, reason


def requests_by_reason(text: str) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jwt_sidecar_requests_total":
                key = (sample.labels["reason"], sample.labels["status"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


class BreakableClock:
    """The system clock until `broken`: then `time()` raises, as a bug of ours would."""

    def __init__(self) -> None:
        self.broken = False
        self.ahead = 0.0
        """Seconds the monotonic clock jumps ahead (what a store unreachable that long looks like)."""

    def time(self) -> float:
        if self.broken:
            raise RuntimeError("the clock broke")
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@pytest.fixture
async def refusing(aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path) -> Any:
    """Starts the proxy with CONFIG (its clock breakable), on loopback: (url, runtime, clock)."""
    proxies: list[Proxy] = []
    servers: list[Server] = []

    async def start() -> tuple[str, Any, BreakableClock]:
        jwks_server.document = jwks_of(rsa_key)
        upstream = await start_upstream(aiohttp_server)
        text = (
            CONFIG.replace("{upstream}", upstream.url)
            .replace("{jwks}", jwks_server.url())
            .replace("{dead}", str(dead_port()))
            .replace("{revoked}", str(tmp_path / "revoked.yaml"))
        )
        (tmp_path / "revoked.yaml").write_text(REVOKED_RULES)
        path = tmp_path / "config.yaml"
        path.write_text(text)
        clock = BreakableClock()
        proxy = Proxy(config.load(path), config_path=str(path), clock=clock)
        proxies.append(proxy)
        await proxy.start()
        server = proxy.server()
        servers.append(server)
        await server.listen("127.0.0.1", 0)
        host, port = server.sockets[0]
        return f"http://{host}:{port}", proxy.runtime, clock

    yield start
    for server in servers:
        await server.shutdown(0)
    for proxy in proxies:
        await proxy.close()


async def send(url: str, data: bytes | list[bytes]) -> bytes:
    """Write the request (its parts 0.2 s apart) and read until the proxy closes (bounded)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    parts = [data] if isinstance(data, bytes) else data
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 3)
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.2)
            with suppress(ConnectionError):
                writer.write(part)
                await writer.drain()
        with suppress(ConnectionError):
            return await asyncio.wait_for(reader.read(), 5)
        return b""
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
async def test_each_refusal_is_answered_as_the_readme_and_rfc_6750_say(
    refusing: Any, rsa_key: TestKey, rsa_key_2: TestKey, case: Case
) -> None:
    url, runtime, clock = await refusing()
    clock.broken = case.reason is Reason.INTERNAL
    if case.reason is Reason.REVOCATION_UNAVAILABLE:
        # The file goes (the last list keeps serving, no longer current), and it has been gone
        # "an hour": older than max_staleness. The store judges its age every second.
        Path(runtime.revocation.path).unlink()
        for _ in range(100):
            if runtime.revocation.problem is not None:
                break
            await asyncio.sleep(0.05)
        clock.ahead = 3600.0
        for _ in range(100):
            if runtime.revocation.unavailable is not None:
                break
            await asyncio.sleep(0.05)
    before = requests_by_reason(runtime.metrics.render()[0].decode())
    raw = await send(url, case.build(rsa_key, rsa_key_2))
    answer = first_response(raw)
    after = requests_by_reason(runtime.metrics.render()[0].decode())
    grown = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    assert grown == {(str(case.reason), f"{case.status // 100}xx"): 1.0}, answer.raw[:300]
    assert answer.status == case.status, answer.raw[:300]
    row = readme_reasons()[str(case.reason)]
    assert answer.status in row.statuses
    assert json.loads(answer.body).get("error") == row.error, "the README's error code for this reason"
    check_answer(answer)
    body = json.loads(answer.body)
    if not case.id.startswith("parser-"):
        # Our own refusals carry the reason's fixed phrase (the parser's, the status phrase).
        assert body.get("error_description", ProxyError(case.reason).description) == ProxyError(case.reason).description


def test_every_reason_has_a_fixed_ascii_phrase() -> None:
    # RFC 6750 §3: error_description is ASCII without '"' and '\\' (it goes into a quoted-string).
    for reason in Reason:
        phrase = ProxyError(reason).description
        assert phrase and phrase.isascii() and not set(phrase) & {'"', "\\"} and phrase.isprintable(), reason
