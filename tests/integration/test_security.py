"""Through the real proxy, as an attacker: what a client can and cannot make the upstream believe.

Every case asserts two things only: the exact status the client got, and what the recording
upstream actually received (or that it received nothing). Every request goes over a raw
socket (`send_raw`): no client library normalises the request target, merges headers (aiohttp's
client folds `X-A` and `x-a` into one) or fixes the framing on the way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.base.errors import ProxyError, Reason
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.integration.conftest import Sidecar

TIMEOUT = 3.0  # every socket read is bounded by this

# Route table of the token-source and header-map cases: one route per way of carrying a token.
SOURCES_CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email, roles: X-User-Roles}}
routes:
  - name: query
    match: {{path_prefix: /q/}}
    auth: {{provider: main}}
    token_sources: [{{query: access_token}}]
  - name: bearer-or-query
    match: {{path_prefix: /bq/}}
    auth: {{provider: main}}
    token_sources: [bearer, {{query: access_token}}]
  - name: cookie
    match: {{path_prefix: /c/}}
    auth: {{provider: main}}
    token_sources: [{{cookie: access_token}}]
  - name: bearer-or-cookie
    match: {{path_prefix: /bc/}}
    auth: {{provider: main}}
    token_sources: [bearer, {{cookie: access_token}}]
  - name: api-token
    match: {{path_prefix: /h/}}
    auth: {{provider: main}}
    token_sources: [{{header: X-Api-Token, prefix: "Token "}}]
  - name: auth-token
    match: {{path_prefix: /xa/}}
    auth: {{provider: main}}
    token_sources: [{{header: X-Auth-Token}}]
  - name: forward-token
    match: {{path_prefix: /fwd/}}
    auth: {{provider: main}}
    headers: {{forward_token: true}}
  - name: payload
    match: {{path_prefix: /p/}}
    auth: {{provider: main}}
    headers: {{claims: {{sub: X-User-Id}}, payload: X-Jwt-Payload}}
  - name: own-names
    match: {{path_prefix: /own/}}
    auth: {{provider: main}}
    headers: {{claims: {{sub: Remote-User}}, payload: X-Claims}}
  - name: public
    match: {{path_prefix: /public/}}
    auth: none
  - name: api
    match: {{path_prefix: /}}
    auth: {{provider: main}}
"""

# Routes whose match is not a plain prefix: an exact path and an end-anchored regex.
EXACT_CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - {{name: assets, match: {{path_regex: '\\.css$'}}, auth: none}}
  - {{name: admin, match: {{path_exact: /admin}}, auth: {{provider: main}}}}
  - {{name: internal, match: {{path_regex: '^/internal/[a-z]+$'}}, auth: {{provider: main}}}}
  - {{name: private, match: {{path_prefix: /private/}}, auth: {{provider: main}}}}
  - {{name: rest, match: {{path_prefix: /}}, auth: none}}
"""

BARE = 'Bearer realm="api"'
INVALID_REQUEST_MALFORMED = 'Bearer realm="api", error="invalid_request", error_description="The request is malformed"'
INVALID_REQUEST_MULTIPLE = (
    'Bearer realm="api", error="invalid_request", error_description="More than one access token was presented"'
)
UNSAFE_CLAIM = (
    'Bearer realm="api", error="invalid_token", '
    'error_description="The token has a claim that cannot be forwarded safely"'
)
FIXED_PHRASES = frozenset(ProxyError(reason).description for reason in Reason)


# -- helpers -------------------------------------------------------------------------------
def admin_token(key: TestKey, **claims: Any) -> str:
    return mint({"scope": "admin", "email_verified": True, **claims}, key=key)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS built by hand, for tokens no honest library would sign."""
    return ".".join((b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature)))


def valid_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-42", "iat": now, "exp": now + 300, **extra}


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    raw: bytes


async def send_raw(s: Sidecar, data: bytes, *, timeout: float = TIMEOUT) -> bytes:
    """Write bytes to the proxy's socket and read until it closes (or `timeout`): no client in between."""
    url = URL(s.url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(url.host, url.port), timeout)
    chunks: list[bytes] = []

    async def pump() -> None:
        while chunk := await reader.read(65536):
            chunks.append(chunk)

    try:
        with suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        with suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(pump(), timeout)
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()
    return b"".join(chunks)


def first_response(raw: bytes) -> RawResponse:
    """The first final response in `raw` (interim 1xx answers such as 100 Continue skipped)."""
    while raw.startswith(b"HTTP/1.1 1"):
        raw = raw.partition(b"\r\n\r\n")[2]
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    status, headers = parse_head(head)
    length = int(headers.get("Content-Length", len(rest)))
    return RawResponse(status=status, headers=headers, body=rest[:length], raw=raw)


def parse_head(head: bytes) -> tuple[int, CIMultiDict[str]]:
    """The status and header fields of a response head (without its blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return int(lines[0].split(" ", 2)[1]), headers


async def raw_get(
    s: Sidecar, target: str, headers: Sequence[tuple[str, str]] = (), method: str = "GET", body: bytes = b""
) -> RawResponse:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: sidecar.test",
        *(f"{k}: {v}" for k, v in headers),
        "Connection: close",
        "",
        "",
    ]
    return first_response(await send_raw(s, "\r\n".join(lines).encode("utf-8") + body))


async def get(
    s: Sidecar,
    target: str,
    headers: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    """One request over a raw socket: status, headers, body. Header names, casings and
    duplicates go out exactly as listed (aiohttp's client merges `X-A` and `x-a` into one)."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if body is not None:
        pairs.append(("Content-Length", str(len(body))))
    response = await raw_get(s, target, pairs, method=method, body=body or b"")
    return response.status, response.headers, response.body


def upstream_paths(s: Sidecar) -> list[str]:
    return [seen.raw_path for seen in s.upstream.seen]


# -- 1. spoofed identity headers ----------------------------------------------------------
SPOOFS = [
    pytest.param([("X-User-Id", "admin")], id="X-User-Id"),
    pytest.param([("x-user-id", "admin")], id="x-user-id-lower"),
    pytest.param([("X-USER-ID", "admin")], id="X-USER-ID-upper"),
    pytest.param([("X-User-Id", "admin"), ("X-User-Id", "root")], id="X-User-Id-twice"),
    pytest.param([("x-user-id", "admin"), ("X-USER-ID", "root")], id="X-User-Id-twice-mixed-case"),
    pytest.param([("X-User-Email", "ceo@example.com")], id="X-User-Email"),
    pytest.param([("x-uSeR-eMaIl", "ceo@example.com"), ("X-User-Email", "x@y")], id="X-User-Email-twice-odd-case"),
    pytest.param([("X-User-Roles", "admin")], id="X-User-Roles"),
    pytest.param([("X-Jwt-Anything", "1")], id="X-Jwt-prefix"),
    pytest.param([("x-jwt-payload", "eyJzdWIiOiJhZG1pbiJ9")], id="x-jwt-prefix-lower"),
    pytest.param([("X-Auth-Whatever", "1")], id="X-Auth-prefix"),
    pytest.param([("X-AUTH-REQUEST-USER", "admin"), ("X-Auth-Request-User", "root")], id="X-Auth-prefix-twice"),
    pytest.param([("X-User-Id", "")], id="X-User-Id-empty"),
    # The client's address as an ingress writes it: a client's own copy chooses its address.
    pytest.param([("X-Real-IP", "10.0.0.1")], id="X-Real-IP"),
    pytest.param([("x_real_ip", "10.0.0.1")], id="x_real_ip-underscores"),
    pytest.param([("True-Client-IP", "10.0.0.1")], id="True-Client-IP"),
    pytest.param([("X-Client-IP", "10.0.0.1")], id="X-Client-IP"),
    pytest.param([("CF-Connecting-IP", "10.0.0.1")], id="CF-Connecting-IP"),
    pytest.param([("cf_connecting_ip", "10.0.0.1")], id="cf_connecting_ip-underscores"),
    pytest.param([("Fastly-Client-IP", "10.0.0.1")], id="Fastly-Client-IP"),
    pytest.param([("X-Cluster-Client-IP", "10.0.0.1")], id="X-Cluster-Client-IP"),
    pytest.param([("Client-IP", "10.0.0.1")], id="Client-IP"),
    pytest.param([("Forwarded", "for=10.0.0.1;proto=https")], id="Forwarded"),
]


@pytest.mark.parametrize("spoofed", SPOOFS)
async def test_spoofed_identity_headers_never_reach_a_public_route(
    sidecar: Any, spoofed: list[tuple[str, str]]
) -> None:
    s = await sidecar()
    status, _, _ = await get(s, "/public/page", spoofed)
    assert status == 200
    seen = s.upstream.last()
    for name, _ in spoofed:
        assert seen.header(name) is None, f"{name} reached the upstream of a public route"


@pytest.mark.parametrize("spoofed", SPOOFS)
async def test_spoofed_identity_headers_are_replaced_by_ours_on_a_protected_route(
    sidecar: Any, rsa_key: TestKey, spoofed: list[tuple[str, str]]
) -> None:
    s = await sidecar()
    token = mint({"roles": ["dev"]}, key=rsa_key)  # no email claim: X-User-Email must be absent
    status, _, _ = await get(s, "/orders/1", [*spoofed, ("Authorization", f"Bearer {token}")])
    assert status == 200
    seen = s.upstream.last()
    assert seen.headers["x-user-id"] == ["user-42"], "exactly our value, once"
    assert seen.headers["x-user-roles"] == ["dev"]
    assert "x-user-email" not in seen.headers, "a claim the token lacks must not fall back to the client's header"
    for name, _ in spoofed:
        if name.lower() not in ("x-user-id", "x-user-roles"):
            assert seen.header(name) is None


@pytest.mark.parametrize("spoofed", SPOOFS)
async def test_spoofed_identity_headers_are_stripped_on_an_optional_route_without_a_token(
    sidecar: Any, spoofed: list[tuple[str, str]]
) -> None:
    s = await sidecar()
    status, _, _ = await get(s, "/maybe/x", spoofed)
    assert status == 200
    for name, _ in spoofed:
        assert s.upstream.last().header(name) is None


@pytest.mark.parametrize("path", ["/public/page", "/q/x"], ids=["public", "other-route"])
async def test_header_names_from_any_routes_map_are_stripped_on_every_route(
    sidecar: Any, rsa_key: TestKey, path: str
) -> None:
    # /own/ writes Remote-User and X-Claims (neither under a strip prefix): no route may let a
    # client set them, because the upstream behind /own/ trusts them.
    s = await sidecar(SOURCES_CONFIG)
    token = mint(key=rsa_key)
    target = f"{path}?access_token={token}" if path.startswith("/q/") else path
    status, _, _ = await get(s, target, [("Remote-User", "admin"), ("X-Claims", "e30"), ("remote-user", "root")])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("Remote-User") is None
    assert seen.header("X-Claims") is None


UNDERSCORE_SPOOFS = [
    pytest.param("X_User_Id", id="X_User_Id"),
    pytest.param("x_user_email", id="x_user_email"),
    pytest.param("X_Jwt_Payload", id="X_Jwt_Payload"),
    pytest.param("X_Auth_Whatever", id="X_Auth_Whatever"),
    pytest.param("X-User_Id", id="X-User_Id-mixed"),
]


@pytest.mark.parametrize("name", UNDERSCORE_SPOOFS)
@pytest.mark.parametrize("path", ["/public/page", "/orders/1"], ids=["public", "protected"])
async def test_underscore_variants_of_identity_headers_never_reach_the_upstream(
    sidecar: Any, rsa_key: TestKey, name: str, path: str
) -> None:
    # WSGI/CGI (Django, Flask, PHP) read X_User_Id and X-User-Id as the same HTTP_X_USER_ID;
    # the same hole as oauth2-proxy's CVE-2025-64484 (GHSA-vjrc-mh2v-45x6).
    s = await sidecar()
    status, _, _ = await get(s, path, [(name, "admin"), *bearer(mint(key=rsa_key)).items()])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header(name) is None, f"{name} reached the upstream"
    if path == "/orders/1":
        assert seen.headers["x-user-id"] == ["user-42"]


async def test_a_token_source_header_under_an_identity_prefix_never_carries_a_client_value_upstream(
    sidecar: Any, rsa_key: TestKey
) -> None:
    # /xa/ takes its token from X-Auth-Token, which sits under the X-Auth- strip prefix. The
    # header must not become a way to hand the upstream an X-Auth-* value (on a route that
    # does not read it), nor to send a second, unverified token spelt X_Auth_Token.
    s = await sidecar(SOURCES_CONFIG)
    token = mint(key=rsa_key)
    status, _, _ = await get(s, "/xa/x", [("X-Auth-Token", token), ("X_Auth_Token", token)])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("X-Auth-Token") is None and seen.header("X_Auth_Token") is None
    assert seen.headers["x-user-id"] == ["user-42"]
    status, _, _ = await get(s, "/public/x", [("X-Auth-Token", "spoof"), ("X_Api_Token", "Token " + token)])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("X-Auth-Token") is None and seen.header("X_Api_Token") is None


# -- 2. hop-by-hop and Connection-named headers -----------------------------------------
HOP_CASES = [
    pytest.param(
        [("Connection", "X-User-Id"), ("X-User-Id", "admin")], ["connection"], id="Connection-names-X-User-Id"
    ),
    pytest.param(
        [("Connection", "close, X-User-Id"), ("X-User-Id", "admin")],
        ["connection"],
        id="Connection-close-and-X-User-Id",
    ),
    pytest.param([("Connection", "x-user-id")], ["connection"], id="Connection-names-X-User-Id-alone"),
    pytest.param(
        [("Connection", "X-Custom"), ("X-Custom", "1")], ["connection", "x-custom"], id="Connection-names-custom"
    ),
    pytest.param(
        [("Connection", "keep-alive, X-A"), ("Connection", "X-B"), ("X-A", "1"), ("X-B", "2")],
        ["connection", "x-a", "x-b"],
        id="two-Connection-headers",
    ),
    pytest.param([("Keep-Alive", "timeout=5, max=100")], ["keep-alive"], id="Keep-Alive"),
    pytest.param([("TE", "trailers")], ["te"], id="TE"),
    pytest.param([("Trailer", "X-Checksum")], ["trailer"], id="Trailer"),
    pytest.param([("Proxy-Authorization", "Basic dXNlcjpwYXNz")], ["proxy-authorization"], id="Proxy-Authorization"),
    pytest.param([("Proxy-Connection", "keep-alive")], ["proxy-connection"], id="Proxy-Connection"),
    pytest.param([("Upgrade", "websocket")], ["upgrade"], id="Upgrade-without-Connection-upgrade"),
    pytest.param([("Connection", "Upgrade"), ("Upgrade", "h2c")], ["upgrade", "connection"], id="Upgrade-h2c"),
    pytest.param(
        [("Connection", "X-Forwarded-For"), ("X-Forwarded-For", "10.0.0.1")],
        ["connection"],
        id="Connection-names-X-Forwarded-For",
    ),
]


@pytest.mark.parametrize(("sent", "absent"), HOP_CASES)
async def test_hop_by_hop_and_connection_named_headers_do_not_reach_the_upstream(
    sidecar: Any, rsa_key: TestKey, sent: list[tuple[str, str]], absent: list[str]
) -> None:
    s = await sidecar()
    status, _, _ = await get(s, "/orders/1", [*sent, *bearer(mint(key=rsa_key)).items()])
    assert status == 200
    seen = s.upstream.last()
    for name in absent:
        assert seen.header(name) is None, f"{name} reached the upstream"
    assert seen.headers["x-user-id"] == ["user-42"], "a client's Connection header cannot remove what we inject"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert len(s.upstream.seen) == 1


async def test_connection_naming_authorization_removes_the_token_and_fails_closed(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await sidecar()
    status, headers, _ = await get(
        s, "/orders/1", [("Connection", "Authorization"), *bearer(mint(key=rsa_key)).items()]
    )
    assert status == 401
    assert headers["WWW-Authenticate"] == BARE
    assert s.upstream.seen == []


async def test_chunked_body_is_reframed_by_the_proxy_and_arrives_as_one_request(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    chunked = b"a\r\naaaaaaaaaa\r\n14\r\n" + b"b" * 20 + b"\r\n1e\r\n" + b"c" * 30 + b"\r\n0\r\nX-Sum: 1\r\n\r\n"
    response = await raw_get(
        s,
        "/orders/1",
        [
            *bearer(mint(key=rsa_key)).items(),
            ("Transfer-Encoding", "chunked"),
            ("Trailer", "X-Sum"),
            ("TE", "trailers"),
        ],
        method="POST",
        body=chunked,
    )
    assert response.status == 200
    assert len(s.upstream.seen) == 1
    seen = s.upstream.last()
    assert seen.body_size == 60
    # The only Transfer-Encoding upstream is the proxy's own framing of the new hop.
    assert seen.header("Transfer-Encoding") in (None, "chunked")
    assert seen.header("Trailer") is None
    assert seen.header("TE") is None
    assert seen.header("X-Sum") is None, "a trailer field is not a header"


# -- 3. path attacks -------------------------------------------------------------------------
NORMALISED = "normalised"
REFUSED = "refused"
PATH_CASES = [
    pytest.param("/public/../admin/x", NORMALISED, "/admin/x", id="dotdot"),
    pytest.param("/public/%2e%2e/admin/x", NORMALISED, "/admin/x", id="encoded-dotdot-lower"),
    pytest.param("/public/%2E%2E/admin/x", NORMALISED, "/admin/x", id="encoded-dotdot-upper"),
    pytest.param("/public/.%2e/admin/x", NORMALISED, "/admin/x", id="half-encoded-dotdot"),
    pytest.param("/public/./../admin/x", NORMALISED, "/admin/x", id="dot-then-dotdot"),
    pytest.param("/public/%2e/../admin/x", NORMALISED, "/admin/x", id="encoded-dot"),
    pytest.param("//admin/x", NORMALISED, "/admin/x", id="double-slash-start"),
    pytest.param("/public//../admin/x", NORMALISED, "/admin/x", id="double-slash-then-dotdot"),
    pytest.param("/public///..//admin//x", NORMALISED, "/admin/x", id="many-slashes"),
    pytest.param("/%61dmin/x", NORMALISED, "/admin/x", id="encoded-unreserved-letter"),
    pytest.param("/admin/%7Euser", NORMALISED, "/admin/~user", id="encoded-tilde"),
    pytest.param("/public/x/../../admin/x/.", NORMALISED, "/admin/x/", id="trailing-dot"),
    pytest.param("/admin/%2Fx", REFUSED, None, id="encoded-slash"),
    pytest.param("/admin/%2fx", REFUSED, None, id="encoded-slash-lower"),
    pytest.param("/public%2F..%2Fadmin/x", REFUSED, None, id="encoded-slashes-around-dotdot"),
    pytest.param("/public/..%2Fadmin/x", REFUSED, None, id="dotdot-encoded-slash"),
    pytest.param("/public/%2e%2e%2fadmin/x", REFUSED, None, id="all-encoded-dotdot-slash"),
    pytest.param("/public/%5C../admin", REFUSED, None, id="encoded-backslash"),
    pytest.param("/public/%5c..%5cadmin", REFUSED, None, id="encoded-backslash-lower"),
    pytest.param("/public/..;/admin/x", REFUSED, None, id="dotdot-semicolon"),
    pytest.param("/public/%2e%2e;x=1/admin/x", REFUSED, None, id="encoded-dotdot-with-param"),
    pytest.param("/public/x%00", REFUSED, None, id="encoded-nul"),
    pytest.param("/public/..%00/admin/x", REFUSED, None, id="dotdot-encoded-nul"),
    pytest.param("/public/\\..\\admin", REFUSED, None, id="raw-backslash"),
    pytest.param("/..", REFUSED, None, id="climb-from-root"),
    pytest.param("/public/../../x", REFUSED, None, id="climb-above-root"),
    pytest.param("/public/%2e%2e/%2e%2e/admin/x", REFUSED, None, id="encoded-climb-above-root"),
    pytest.param("/public/x%2", REFUSED, None, id="truncated-escape"),
    pytest.param("/public/x%zz", REFUSED, None, id="non-hex-escape"),
    pytest.param("public/x", REFUSED, None, id="no-leading-slash"),
]


@pytest.mark.parametrize(("target", "outcome", "normalised"), PATH_CASES)
async def test_path_attacks_are_refused_or_judged_by_the_route_of_the_normalised_path(
    sidecar: Any, rsa_key: TestKey, target: str, outcome: str, normalised: str | None
) -> None:
    s = await sidecar()
    anonymous = await raw_get(s, target)
    authorised = await raw_get(s, target, [("Authorization", f"Bearer {admin_token(rsa_key)}")])
    if outcome == REFUSED:
        for response in (anonymous, authorised):
            assert response.status == 400, response.raw[:300]
        assert s.upstream.seen == []
        return
    # Judged by /admin/, never by /public/: no token is a 401 and nothing moves.
    assert anonymous.status == 401, anonymous.raw[:300]
    assert anonymous.headers["WWW-Authenticate"] == BARE
    assert authorised.status == 200, authorised.raw[:300]
    assert upstream_paths(s) == [normalised], "the upstream gets exactly the path the router matched"


async def test_a_path_that_stays_public_is_forwarded_as_normalised(sidecar: Any) -> None:
    s = await sidecar()
    # %25 is a literal % (not unreserved): it stays encoded, so the upstream decodes it once
    # to `%2e%2e`, a file name, never to `..`.
    for target, expected in [
        ("/public/%252e%252e/admin/x", "/public/%252e%252e/admin/x"),
        ("/public/a/../b", "/public/b"),
        ("/public/caf%C3%A9", "/public/caf%C3%A9"),
        ("/public/a%3bb", "/public/a%3Bb"),
    ]:
        response = await raw_get(s, target)
        assert response.status == 200, target
        assert s.upstream.last().raw_path == expected, target


QUERY_CASES = [
    pytest.param("/public/../admin/x?a=%2F&b=..", "/admin/x?a=%2F&b=..", id="dotdot-path-query-kept"),
    pytest.param("/admin/x?a=%2F&b=..&c=%2e%2e/../&d", "/admin/x?a=%2F&b=..&c=%2e%2e/../&d", id="query-untouched"),
    pytest.param("/admin/x?q=a+b&r=%20&s=%zz&t=;", "/admin/x?q=a+b&r=%20&s=%zz&t=;", id="odd-escapes-kept"),
    pytest.param("/admin/x?", "/admin/x", id="empty-query"),
]


@pytest.mark.parametrize(("target", "expected"), QUERY_CASES)
async def test_query_strings_reach_the_upstream_byte_for_byte(
    sidecar: Any, rsa_key: TestKey, target: str, expected: str
) -> None:
    s = await sidecar()
    response = await raw_get(s, target, [("Authorization", f"Bearer {admin_token(rsa_key)}")])
    assert response.status == 200
    assert upstream_paths(s) == [expected]


FRAGMENT_CASES = [
    pytest.param("/admin#", id="exact-route-empty-fragment"),
    pytest.param("/admin#x", id="exact-route-fragment"),
    pytest.param("/internal/keys#", id="anchored-regex-route"),
    pytest.param("/private/keys#.css", id="public-suffix-regex-route"),
    pytest.param("/admin#/../admin", id="fragment-with-dot-segments"),
    pytest.param("/rest/x?a=1#b", id="fragment-after-query"),
]


@pytest.mark.parametrize("target", FRAGMENT_CASES)
async def test_a_fragment_in_the_request_target_is_refused(sidecar: Any, target: str) -> None:
    # RFC 9112 §3.2: origin-form is absolute-path ["?" query]: no fragment. llhttp accepts `#`;
    # were it routed, the router would match `/admin#` while an upstream that drops `#…` would
    # serve /admin through a public route with no token at all.
    s = await sidecar(EXACT_CONFIG)
    response = await raw_get(s, target)
    assert response.status == 400, f"{response.status}; the upstream saw {upstream_paths(s)}"
    assert s.upstream.seen == []


# -- 4. unsafe claims ---------------------------------------------------------------------------
UNSAFE_CLAIMS = [
    pytest.param({"sub": "user-42\r\nX-Admin: 1"}, id="sub-CRLF"),
    pytest.param({"sub": "user-42\n"}, id="sub-LF"),
    pytest.param({"sub": "user\r42"}, id="sub-CR"),
    pytest.param({"sub": "user\x0042"}, id="sub-NUL"),
    pytest.param({"sub": "user\x7f"}, id="sub-DEL"),
    pytest.param({"sub": "user\x0b42"}, id="sub-VT"),
    pytest.param({"roles": ["dev", "ops\r\nX-User-Id: admin"]}, id="list-claim-CRLF"),
    pytest.param({"roles": ["dev", "a\x00"]}, id="list-claim-NUL"),
    pytest.param({"email": "a@b.c\nX-Evil: 1"}, id="email-LF"),
]


@pytest.mark.parametrize("claims", UNSAFE_CLAIMS)
async def test_a_claim_with_control_characters_is_denied(
    sidecar: Any, rsa_key: TestKey, claims: dict[str, Any]
) -> None:
    s = await sidecar()
    status, headers, body = await get(s, "/orders/1", bearer(mint(claims, key=rsa_key)))
    assert status == 401
    assert headers["WWW-Authenticate"] == UNSAFE_CLAIM
    assert json.loads(body) == {
        "error": "invalid_token",
        "error_description": "The token has a claim that cannot be forwarded safely",
    }
    assert s.upstream.seen == []


FORWARDED_CLAIMS = [
    pytest.param({"sub": "user\t42"}, "x-user-id", "user\t42", id="inner-TAB"),
    pytest.param({"sub": "josé"}, "x-user-id", "josé", id="latin-1-accent"),
    pytest.param({"sub": "日本"}, "x-user-id", "日本", id="cjk"),
    pytest.param({"roles": ["é", "日本", "a b"]}, "x-user-roles", "é,日本,a b", id="list-non-ascii"),
    pytest.param({"org": {"name": "Café\n"}}, "x-user-org", '{"name":"Café\\n"}', id="object-escapes-LF-as-JSON"),
    pytest.param({"note": "a\r\nb"}, "x-user-id", "user-42", id="unmapped-claim-with-CRLF-is-never-a-header"),
]


@pytest.mark.parametrize(("claims", "header", "arrives"), FORWARDED_CLAIMS)
async def test_tab_and_non_ascii_claims_are_forwarded_as_utf8(
    sidecar: Any, rsa_key: TestKey, claims: dict[str, Any], header: str, arrives: str
) -> None:
    s = await sidecar()
    status, _, _ = await get(s, "/orders/1", bearer(mint(claims, key=rsa_key)))
    assert status == 200
    assert s.upstream.last().headers[header] == [arrives]


WHITESPACE_EDGES = [
    pytest.param(" admin", id="leading-space"),
    pytest.param("admin ", id="trailing-space"),
    pytest.param("\tadmin", id="leading-TAB"),
    pytest.param("admin\t", id="trailing-TAB"),
]


@pytest.mark.parametrize("sub", WHITESPACE_EDGES)
async def test_a_claim_that_would_not_arrive_unchanged_is_denied(sidecar: Any, rsa_key: TestKey, sub: str) -> None:
    # RFC 9110 §5.5: a field value's leading and trailing whitespace is not part of it, so the
    # upstream would read `admin` for a token whose sub is " admin": a different identity.
    s = await sidecar()
    status, headers, _ = await get(s, "/orders/1", bearer(mint({"sub": sub}, key=rsa_key)))
    arrived = s.upstream.seen[-1].headers.get("x-user-id") if s.upstream.seen else None
    assert status == 401, f"forwarded; X-User-Id arrived as {arrived!r} for sub {sub!r}"
    assert headers["WWW-Authenticate"] == UNSAFE_CLAIM
    assert s.upstream.seen == []


# -- 5. more than one token, malformed credentials -------------------------------------------
TWO_TOKENS = [
    pytest.param(
        "/orders/1",
        [("Authorization", "Bearer {t1}"), ("Authorization", "Bearer {t2}")],
        id="two-Authorization-headers",
    ),
    pytest.param(
        "/orders/1",
        [("Authorization", "Bearer {t1}"), ("authorization", "Bearer {t2}")],
        id="two-Authorization-headers-mixed-case",
    ),
    pytest.param(
        "/orders/1", [("Authorization", "Bearer {t1}"), ("Authorization", "Bearer {t1}")], id="same-token-twice"
    ),
    pytest.param("/bq/x?access_token={t2}", [("Authorization", "Bearer {t1}")], id="bearer-and-query"),
    pytest.param("/bq/x?access_token={t1}", [("Authorization", "Bearer {t1}")], id="same-token-bearer-and-query"),
    pytest.param("/bc/x", [("Authorization", "Bearer {t1}"), ("Cookie", "access_token={t2}")], id="bearer-and-cookie"),
    pytest.param("/q/x?access_token={t1}&access_token={t1}", [], id="query-parameter-twice"),
    pytest.param("/q/x?access_token={t1}&access%5Ftoken={t2}", [], id="query-parameter-twice-encoded-name"),
    pytest.param("/h/x", [("X-Api-Token", "Token {t1}"), ("X-Api-Token", "Token {t2}")], id="header-source-twice"),
]


@pytest.mark.parametrize(("target", "headers"), TWO_TOKENS)
async def test_two_tokens_are_a_400_and_nothing_moves(
    sidecar: Any, rsa_key: TestKey, target: str, headers: list[tuple[str, str]]
) -> None:
    s = await sidecar(SOURCES_CONFIG)
    tokens = {"t1": mint(key=rsa_key), "t2": mint({"sub": "other"}, key=rsa_key)}
    status, response_headers, body = await get(
        s, target.format(**tokens), [(k, v.format(**tokens)) for k, v in headers]
    )
    assert status == 400
    assert response_headers["WWW-Authenticate"] == INVALID_REQUEST_MULTIPLE
    assert json.loads(body) == {
        "error": "invalid_request",
        "error_description": "More than one access token was presented",
    }
    assert s.upstream.seen == []


async def test_two_cookies_of_the_token_name_are_two_tokens(sidecar: Any, rsa_key: TestKey) -> None:
    # Two `access_token` cookies (cookie tossing from a sibling domain or path) are as
    # ambiguous as two Authorization headers; aiohttp's `request.cookies` keeps only the last.
    s = await sidecar(SOURCES_CONFIG)
    t1, t2 = mint(key=rsa_key), mint({"sub": "other"}, key=rsa_key)
    status, headers, _ = await get(s, "/c/x", [("Cookie", f"access_token={t1}; access_token={t2}")])
    assert status == 400, f"{status}; the upstream saw X-User-Id {[x.header('X-User-Id') for x in s.upstream.seen]}"
    assert headers["WWW-Authenticate"] == INVALID_REQUEST_MULTIPLE
    assert s.upstream.seen == []


MALFORMED_AUTHORIZATION = [
    pytest.param("Bearer", 400, INVALID_REQUEST_MALFORMED, id="Bearer-alone"),
    pytest.param("Bearer ", 400, INVALID_REQUEST_MALFORMED, id="Bearer-space"),
    pytest.param("Bearer a b", 400, INVALID_REQUEST_MALFORMED, id="two-credentials"),
    pytest.param("Bearer\t{token}", 400, INVALID_REQUEST_MALFORMED, id="tab"),
    pytest.param("Bearer {token}, Bearer {token}", 400, INVALID_REQUEST_MALFORMED, id="comma-list"),
    pytest.param("Bearer {token}%", 400, INVALID_REQUEST_MALFORMED, id="non-b64token-char"),
    pytest.param('Bearer "{token}"', 400, INVALID_REQUEST_MALFORMED, id="quoted"),
    pytest.param("Basic dXNlcjpwYXNz", 401, BARE, id="Basic"),
    pytest.param("Digest username=x", 401, BARE, id="Digest"),
    pytest.param("Bearer{token}", 401, BARE, id="no-space-is-another-scheme"),
]


@pytest.mark.parametrize(("value", "status", "challenge"), MALFORMED_AUTHORIZATION)
async def test_malformed_authorization_is_refused_with_the_exact_challenge(
    sidecar: Any, rsa_key: TestKey, value: str, status: int, challenge: str
) -> None:
    s = await sidecar()
    got, headers, _ = await get(s, "/orders/1", [("Authorization", value.format(token=mint(key=rsa_key)))])
    assert got == status
    assert headers["WWW-Authenticate"] == challenge
    assert s.upstream.seen == []


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_is_case_insensitive(sidecar: Any, rsa_key: TestKey, scheme: str) -> None:
    s = await sidecar()
    status, _, _ = await get(s, "/orders/1", [("Authorization", f"{scheme} {mint(key=rsa_key)}")])
    assert status == 200
    seen = s.upstream.last()
    assert seen.headers["x-user-id"] == ["user-42"]
    assert seen.header("Authorization") is None


# -- 6. token sources: accepted, then removed --------------------------------------------
QUERY_TOKENS = [
    pytest.param("/q/x?a=1&access_token={t}&b=%2F", "/q/x?a=1&b=%2F", id="middle"),
    pytest.param("/q/x?access_token={t}", "/q/x", id="alone"),
    pytest.param("/q/x?access_token={t}&z=..&a=%2e", "/q/x?z=..&a=%2e", id="first"),
    pytest.param("/q/x?b=%20&b=2&access%5Ftoken={t}&c", "/q/x?b=%20&b=2&c", id="encoded-name-last-then-bare-key"),
    pytest.param(
        "/q/x?x=access_token&access_token={t}&y=access_token%3D1",
        "/q/x?x=access_token&y=access_token%3D1",
        id="name-as-a-value-elsewhere",
    ),
    pytest.param("/q/x?a=%2F&&access_token={t}&b=", "/q/x?a=%2F&&b=", id="empty-pairs-kept"),
]


@pytest.mark.parametrize(("target", "expected"), QUERY_TOKENS)
async def test_a_query_token_is_accepted_and_removed_with_the_rest_of_the_query_kept(
    sidecar: Any, rsa_key: TestKey, target: str, expected: str
) -> None:
    s = await sidecar(SOURCES_CONFIG)
    status, _, _ = await get(s, target.format(t=mint(key=rsa_key)))
    assert status == 200
    seen = s.upstream.last()
    assert seen.raw_path == expected
    assert seen.headers["x-user-id"] == ["user-42"]


COOKIE_TOKENS = [
    pytest.param("theme=dark; access_token={t}; lang=en", "theme=dark; lang=en", id="middle"),
    pytest.param("access_token={t}", None, id="alone"),
    pytest.param("a=1;access_token={t};b=2", "a=1; b=2", id="no-spaces"),
    pytest.param('access_token="{t}"; session=abc', "session=abc", id="quoted-value"),
]


@pytest.mark.parametrize(("cookie", "expected"), COOKIE_TOKENS)
async def test_a_cookie_token_is_accepted_and_only_that_cookie_removed(
    sidecar: Any, rsa_key: TestKey, cookie: str, expected: str | None
) -> None:
    s = await sidecar(SOURCES_CONFIG)
    status, _, _ = await get(s, "/c/x", [("Cookie", cookie.format(t=mint(key=rsa_key)))])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("Cookie") == expected
    assert seen.headers["x-user-id"] == ["user-42"]


COOKIE_PARSER_EDGES = [
    pytest.param("access_token ={token}; lang=en", id="space-before-equals"),
    pytest.param("lang=en, access_token={token}", id="comma-separated"),
]


@pytest.mark.parametrize("cookie", COOKIE_PARSER_EDGES)
async def test_a_cookie_token_the_parser_accepts_never_reaches_the_upstream(
    sidecar: Any, rsa_key: TestKey, cookie: str
) -> None:
    # The token is read with aiohttp's cookie parser and removed with extract.without_cookie:
    # whatever the first accepts, the second must remove, or the token leaks upstream.
    s = await sidecar(SOURCES_CONFIG)
    token = mint(key=rsa_key)
    status, _, _ = await get(s, "/c/x", [("Cookie", cookie.format(token=token))])
    assert status == 200, "aiohttp's parser finds the token, and it verifies"
    forwarded = s.upstream.last().header("Cookie") or ""
    assert token not in forwarded, f"the verified token reached the upstream in Cookie: {forwarded[:60]}…"
    assert "lang=en" in forwarded


async def test_a_header_token_with_a_prefix_is_accepted_and_removed(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(SOURCES_CONFIG)
    token = mint(key=rsa_key)
    status, _, _ = await get(s, "/h/x", [("X-Api-Token", f"Token {token}"), ("X-Other", "kept")])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("X-Api-Token") is None
    assert seen.header("X-Other") == "kept"
    assert seen.headers["x-user-id"] == ["user-42"]
    for bad, expected in [(f"Bearer {token}", 400), (f"Token  {token}", 400), ("Token ", 400)]:
        status, headers, _ = await get(s, "/h/x", [("X-Api-Token", bad)])
        assert status == expected, bad
        assert headers["WWW-Authenticate"] == INVALID_REQUEST_MALFORMED
    status, headers, _ = await get(s, "/h/x", bearer(token))
    assert status == 401, "Authorization is not a source of this route"
    assert headers["WWW-Authenticate"] == BARE
    assert len(s.upstream.seen) == 1


async def test_a_token_header_under_a_strip_prefix_still_carries_the_token(sidecar: Any, rsa_key: TestKey) -> None:
    # X-Auth-Token matches the default strip prefix X-Auth-; as a token source it must survive
    # the identity strip long enough to be read, then be removed like any token.
    s = await sidecar(SOURCES_CONFIG)
    status, _, _ = await get(s, "/xa/x", [("X-Auth-Token", mint(key=rsa_key))])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("X-Auth-Token") is None
    assert seen.headers["x-user-id"] == ["user-42"]


async def test_forward_token_keeps_authorization_for_the_upstream(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(SOURCES_CONFIG)
    token = mint(key=rsa_key)
    status, _, _ = await get(s, "/fwd/x", bearer(token))
    assert status == 200
    assert s.upstream.last().headers["authorization"] == [f"Bearer {token}"]
    assert s.upstream.last().headers["x-user-id"] == ["user-42"]
    status, _, _ = await get(s, "/orders/1", bearer(token))
    assert status == 200
    assert s.upstream.last().header("Authorization") is None, "only the route that asks for it"


# -- 7. the payload header ------------------------------------------------------------------
def unb64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@pytest.mark.parametrize(
    "spoof",
    [[], [("X-Jwt-Payload", "eyJzdWIiOiJhZG1pbiJ9")], [("x-jwt-payload", "e30"), ("X-JWT-PAYLOAD", "e30")]],
    ids=["no-spoof", "spoofed", "spoofed-twice"],
)
async def test_the_payload_header_is_the_verified_payload_and_replaces_a_clients(
    sidecar: Any, rsa_key: TestKey, spoof: list[tuple[str, str]]
) -> None:
    s = await sidecar(SOURCES_CONFIG)
    token = mint({"roles": ["dev"], "name": "Zoë", "nested": {"a": [1, 2]}}, key=rsa_key)
    status, _, _ = await get(s, "/p/x", [*spoof, *bearer(token).items()])
    assert status == 200
    values = s.upstream.last().headers["x-jwt-payload"]
    assert len(values) == 1
    assert "=" not in values[0]
    assert json.loads(unb64url(values[0])) == jwt.decode(token, options={"verify_signature": False})


# -- 8. refusals reveal nothing ------------------------------------------------------------
Builder = Any  # (rsa_key, attacker_key) -> (path, header pairs)


def _auth(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


REFUSALS = [
    pytest.param(lambda k, a: ("/orders", _auth(mint({"exp": 1000, "iat": 0}, key=k))), 401, id="expired"),
    pytest.param(lambda k, a: ("/orders", _auth(mint(key=a, headers={"kid": "rsa-1"}))), 401, id="bad-signature"),
    pytest.param(
        lambda k, a: ("/orders", _auth(forge({"alg": "none", "kid": "rsa-1"}, valid_claims()))), 401, id="alg-none"
    ),
    pytest.param(lambda k, a: ("/orders", _auth("abc.def.ghi")), 401, id="malformed"),
    pytest.param(lambda k, a: ("/orders", _auth(b64url(b"{nope") + ".e30.")), 401, id="bad-json-header"),
    pytest.param(
        lambda k, a: ("/orders", _auth(mint(headers={"kid": "../../etc/passwd"}, key=k))), 401, id="unknown-kid"
    ),
    pytest.param(lambda k, a: ("/orders", _auth(mint({"aud": "evil"}, key=k))), 401, id="wrong-audience"),
    pytest.param(lambda k, a: ("/orders", _auth(mint({"sub": "a\r\nb"}, key=k))), 401, id="unsafe-claim"),
    pytest.param(lambda k, a: ("/orders", [*_auth(mint(key=k)), *_auth(mint(key=k))]), 400, id="two-tokens"),
    pytest.param(
        lambda k, a: ("/orders", [("Authorization", "Bearer " + mint(key=k) + " x")]), 400, id="malformed-bearer"
    ),
    pytest.param(lambda k, a: ("/admin/x", _auth(mint(key=k))), 403, id="missing-scope"),
    pytest.param(lambda k, a: ("/admin/x", _auth(mint({"scope": "admin"}, key=k))), 403, id="claim-rule"),
    pytest.param(lambda k, a: ("/public/%2e%2e/%2e%2e/x", _auth(mint(key=k))), 400, id="bad-path"),
    pytest.param(lambda k, a: ("/orders", _auth(mint({"pad": "x" * 9000}, key=k))), 401, id="too-large"),
]


@pytest.mark.parametrize(("build", "status"), REFUSALS)
async def test_refusals_reveal_no_token_key_traceback_or_library_message(
    sidecar: Any, rsa_key: TestKey, rsa_key_2: TestKey, build: Builder, status: int
) -> None:
    s = await sidecar()
    path, headers = build(rsa_key, rsa_key_2)
    response = await raw_get(s, path, headers)
    assert response.status == status
    body = json.loads(response.body)
    assert set(body) == {"error", "error_description"}
    assert body["error_description"] in FIXED_PHRASES
    # The Server banner is ours ("jwt-sidecar") and left out of the comparison.
    shown = "\n".join(
        line for line in response.raw.decode("latin-1").split("\r\n") if not line.lower().startswith("server:")
    )
    for _, value in headers:
        for segment in value.removeprefix("Bearer ").split("."):
            if len(segment) >= 8:
                assert segment not in shown, "a token segment was echoed"
    for secret in (
        "user-42",
        str(rsa_key.public_jwk["n"])[:24],
        str(rsa_key_2.public_jwk["n"])[:24],
        "Traceback",
        "Exception",
        "PyJWT",
        "jwt.",
        "Signature verification",
        "Invalid",
        "Expecting",
        "padding",
        "passwd",
        "kid",
        "rsa-1",
        "\\r",
        "email_verified",
    ):
        assert secret not in shown, f"{secret!r} in the response"
    assert s.upstream.seen == []


PARSER_ERRORS = [
    pytest.param(
        "GET /orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}" + "A" * 20000 + "\r\n\r\n",
        431,
        id="oversized-authorization",
    ),
    pytest.param(
        "GET /q/x?access_token={token}&q=\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="bad-char-after-query-token"
    ),
    pytest.param(
        "GET /orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n",
        400,
        id="control-char-in-authorization",
    ),
    pytest.param(
        "GET /orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nBad Name: 1\r\n\r\n",
        400,
        id="bad-header-name-after-authorization",
    ),
]


@pytest.mark.parametrize(("template", "status"), PARSER_ERRORS)
async def test_parser_errors_reach_nothing_and_keep_the_token_out_of_the_logs(
    sidecar: Any, rsa_key: TestKey, template: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The parser refuses these before any routing: the upstream sees nothing, the answer is a
    # fixed body that never quotes the request back, and the operator log never holds the token.
    from proxy.ops.server import configure_logging

    configure_logging()
    s = await sidecar()
    token = mint(key=rsa_key)
    with caplog.at_level(logging.DEBUG):
        raw = await send_raw(s, template.format(token=token).encode("latin-1"))
    response = first_response(raw)
    assert response.status == status
    assert token[:24].encode() not in raw and b"Bearer" not in raw, raw[:300]
    assert s.upstream.seen == []
    formatter = logging.Formatter("%(message)s")
    logged = "\n".join(formatter.format(record) for record in caplog.records)  # with any traceback
    assert token[:24] not in logged and "Bearer" not in logged, logged[:300]


# -- 9. more attacks ----------------------------------------------------------------------------
def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def _challenge(reason: Reason) -> str:
    return f'Bearer realm="api", error="invalid_token", error_description="{ProxyError(reason).description}"'


ADMIN = {"scope": "admin", "email_verified": True}
FORGED = [
    pytest.param(
        lambda k, a: forge({"alg": "none", "kid": "rsa-1"}, valid_claims(**ADMIN)),
        Reason.ALG_NOT_ALLOWED,
        id="alg-none",
    ),
    pytest.param(lambda k, a: forge({"alg": "None"}, valid_claims(**ADMIN)), Reason.ALG_NOT_ALLOWED, id="alg-None"),
    pytest.param(
        lambda k, a: forge({"alg": "none"}, valid_claims(**ADMIN), b"sig"),
        Reason.ALG_NOT_ALLOWED,
        id="alg-none-with-a-signature",
    ),
    pytest.param(lambda k, a: forge({"kid": "rsa-1"}, valid_claims(**ADMIN)), Reason.ALG_NOT_ALLOWED, id="alg-missing"),
    pytest.param(
        lambda k, a: forge({"alg": ["RS256"], "kid": "rsa-1"}, valid_claims(**ADMIN)),
        Reason.ALG_NOT_ALLOWED,
        id="alg-as-a-list",
    ),
    pytest.param(
        lambda k, a: hs256({"alg": "HS256", "kid": "rsa-1"}, valid_claims(**ADMIN), k.public_pem()),
        Reason.ALG_NOT_ALLOWED,
        id="HS256-signed-with-the-public-key",
    ),
    pytest.param(
        lambda k, a: mint(ADMIN, key=a, headers={"kid": "rsa-1", "jwk": a.public_jwk}),
        Reason.BAD_SIGNATURE,
        id="embedded-jwk",
    ),
    pytest.param(
        lambda k, a: mint(ADMIN, key=a, headers={"kid": "rsa-1", "jku": "http://127.0.0.1:9/jwks"}),
        Reason.BAD_SIGNATURE,
        id="jku-to-the-attacker",
    ),
    pytest.param(
        lambda k, a: mint(ADMIN, key=a, headers={"kid": "rsa-1", "x5u": "http://127.0.0.1:9/cert"}),
        Reason.BAD_SIGNATURE,
        id="x5u-to-the-attacker",
    ),
    pytest.param(
        lambda k, a: mint(ADMIN, key=a, headers={"kid": None}), Reason.BAD_SIGNATURE, id="no-kid-attacker-key"
    ),
    pytest.param(
        lambda k, a: mint(ADMIN, key=k).rsplit(".", 1)[0] + ".", Reason.BAD_SIGNATURE, id="signature-stripped"
    ),
    pytest.param(
        lambda k, a: ".".join(
            [mint(key=k).split(".")[0], b64url(json.dumps(valid_claims(**ADMIN)).encode()), mint(key=k).split(".")[2]]
        ),
        Reason.BAD_SIGNATURE,
        id="payload-swapped",
    ),
    pytest.param(lambda k, a: mint(ADMIN, key=k, headers={"crit": ["exp"]}), Reason.CRIT, id="crit-unknown"),
    pytest.param(lambda k, a: mint(ADMIN, key=k, headers={"b64": False, "crit": ["b64"]}), Reason.CRIT, id="b64-false"),
    pytest.param(lambda k, a: mint({**ADMIN, "iss": "https://evil.test"}, key=k), Reason.ISSUER, id="foreign-iss"),
    pytest.param(
        lambda k, a: mint({**ADMIN, "exp": str(int(time.time()) + 300)}, key=k),
        Reason.MALFORMED_CLAIM,
        id="exp-as-a-string",
    ),
    pytest.param(lambda k, a: mint({**ADMIN, "sub": 1}, key=k), Reason.MALFORMED_CLAIM, id="sub-as-a-number"),
    # PyJWT writes inf as `Infinity`, which is not JSON (RFC 8259 §6): the payload is malformed.
    pytest.param(lambda k, a: mint({**ADMIN, "exp": float("inf")}, key=k), Reason.MALFORMED, id="exp-infinite"),
]


@pytest.mark.parametrize(("build", "reason"), FORGED)
async def test_forged_tokens_are_refused(
    sidecar: Any, rsa_key: TestKey, rsa_key_2: TestKey, build: Builder, reason: Reason
) -> None:
    s = await sidecar()
    status, headers, _ = await get(s, "/admin/x", bearer(build(rsa_key, rsa_key_2)))
    assert status == 401
    assert headers["WWW-Authenticate"] == _challenge(reason)
    assert s.upstream.seen == []


async def test_oversized_tokens_and_headers_are_refused_before_any_work(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    status, headers, _ = await get(s, "/orders", bearer(mint({"pad": "x" * 9000}, key=rsa_key)))
    assert status == 401, "over max_token_bytes (8192), under the header limit"
    assert headers["WWW-Authenticate"] == (
        'Bearer realm="api", error="invalid_token", error_description="The access token is too large"'
    )
    status, _, _ = await get(s, "/orders", [("Authorization", "Bearer " + "A" * 20000)])
    assert status == 431, "over the 16 KiB field limit: Request Header Fields Too Large (RFC 6585)"
    status, _, _ = await get(s, "/public/x", [(f"X-Pad-{i}", "y" * 1000) for i in range(200)])
    assert status == 431, "too many header fields"
    assert s.upstream.seen == []


async def test_a_flood_of_spoofed_identity_headers_leaves_exactly_ours(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    many = [("X-User-Id" if i % 2 else "x-user-id", f"admin{i}") for i in range(100)]
    status, _, _ = await get(s, "/orders", [*many, *bearer(mint(key=rsa_key)).items()])
    assert status == 200
    assert s.upstream.last().headers["x-user-id"] == ["user-42"]


SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLING = [
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        400,
        id="CL-and-TE",
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        400,
        id="TE-and-CL",
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 41\r\n\r\n" + SMUGGLED,
        400,
        id="two-different-CL",
    ),
    pytest.param(b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 41\r\n\r\n" + SMUGGLED, 400, id="CL-list"),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: +41\r\n\r\n" + SMUGGLED, 400, id="CL-plus-sign"
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
        id="TE-chunked-not-last",
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
        id="TE-xchunked",
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
        id="TE-space-before-colon",
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\nContent-Length: 3\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        400,
        id="TE-tab",
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;ext="\r\n"\r\nhello\r\n0\r\n\r\n' + SMUGGLED,
        400,
        id="chunk-extension-with-CRLF",
    ),
    pytest.param(
        b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n" + SMUGGLED,
        400,
        id="bare-LF-chunks",
    ),
    pytest.param(
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n" + SMUGGLED,
        200,
        id="upgrade-then-pipelined",
    ),
    pytest.param(
        b"GET /public/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 41\r\n\r\n" + SMUGGLED,
        200,
        id="expect-continue-body",
    ),
]


@pytest.mark.parametrize(("data", "status"), SMUGGLING)
async def test_a_smuggled_request_never_reaches_the_upstream_unauthenticated(
    sidecar: Any, data: bytes, status: int
) -> None:
    # 400: the parser (llhttp) refuses the framing. 200: the carrier request is answered and the
    # trailing bytes are swallowed (an upgraded stream, or the body announced by Content-Length).
    s = await sidecar()
    raw = await send_raw(s, data, timeout=2.0)
    paths = upstream_paths(s)
    assert "/admin/smuggled" not in paths, f"smuggled through; the upstream saw {paths}"
    assert paths == ([] if status == 400 else ["/public/a"])
    assert first_response(raw).status == status, raw[:200]
    # Whatever the proxy made of the extra bytes, a second request must be judged by /admin/.
    assert raw.count(b"HTTP/1.1 200") <= 1, "a second 200 came back on the same connection"


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        pytest.param("GET http://evil/admin/x HTTP/1.1", 400, id="absolute-form"),
        pytest.param("GET http://sidecar.test/public/x HTTP/1.1", 400, id="absolute-form-own-host"),
        pytest.param("OPTIONS * HTTP/1.1", 400, id="asterisk-form"),
        pytest.param("CONNECT evil:443 HTTP/1.1", 400, id="authority-form"),
        pytest.param("GET /public/x HTTP/1.2", 400, id="unknown-minor-version"),
        pytest.param("get /admin/x HTTP/1.1", 400, id="lower-case-method"),
    ],
)
async def test_unusual_request_targets_are_refused(
    sidecar: Any, rsa_key: TestKey, request_line: str, status: int
) -> None:
    s = await sidecar()
    data = (
        f"{request_line}\r\nHost: sidecar.test\r\nAuthorization: Bearer {mint(key=rsa_key)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    raw = await send_raw(s, data)
    assert first_response(raw).status == status, raw[:200]
    assert s.upstream.seen == []


async def test_method_and_path_reaching_the_upstream_are_the_ones_routed(sidecar: Any, rsa_key: TestKey) -> None:
    # /admin/ takes GET and POST; any other method falls through to `api`. Whatever arrives
    # upstream must carry the method the router saw, never an upper-cased or rewritten one.
    s = await sidecar()
    token = mint(key=rsa_key)
    for method in ("PUT", "DELETE", "PATCH", "PROPFIND"):
        status, _, _ = await get(s, "/admin/x", bearer(token), method=method)
        assert status == 200, method
        assert (s.upstream.last().method, s.upstream.last().raw_path) == (method, "/admin/x")
    status, _, _ = await get(s, "/admin/x", bearer(token), method="GET")
    assert status == 403
    assert len(s.upstream.seen) == 4


async def test_head_is_judged_like_get(sidecar: Any, rsa_key: TestKey) -> None:
    # RFC 9110 §9.3.2: HEAD is GET without content, and most frameworks (aiohttp's add_get,
    # Flask, Django) run the GET handler for it. /admin/ lists GET: without admin scope a
    # HEAD must not fall through to the catch-all and run the admin GET handler upstream.
    s = await sidecar()
    status, headers, _ = await get(s, "/admin/x", bearer(mint(key=rsa_key)), method="HEAD")
    assert status == 403, f"{status}; the upstream saw {[(x.method, x.raw_path) for x in s.upstream.seen]}"
    assert headers["WWW-Authenticate"].startswith('Bearer realm="api", error="insufficient_scope"')
    assert s.upstream.seen == []


async def test_the_host_and_forwarded_chain_cannot_be_used_to_hide_the_client(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    status, _, _ = await get(
        s,
        "/orders",
        [
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Proto", "https"),
            ("X-Request-Id", "abc\tdef"),
            *bearer(mint(key=rsa_key)).items(),
        ],
    )
    assert status == 200
    seen = s.upstream.last()
    # Appended, not replaced: the rightmost entry is always the peer this hop saw.
    assert seen.header("X-Forwarded-For") == "10.0.0.1, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https, http"
    assert seen.header("X-Request-Id") != "abc\tdef"
    assert len(seen.headers["x-request-id"]) == 1


async def test_repeated_headers_reach_the_upstream_whatever_their_casing(sidecar: Any) -> None:
    # Header names are case-insensitive (RFC 9110 §5.1): X-Dup and x-dup are one field with
    # three values, and the upstream must get all three, as a raw socket sent them.
    s = await sidecar()
    status, _, _ = await get(s, "/public/x", [("X-Dup", "1"), ("x-dup", "2"), ("X-DUP", "3")])
    assert status == 200
    assert s.upstream.last().headers["x-dup"] == ["1", "2", "3"]
