"""Through the real proxy: what a token holds never makes a 5xx, never has two spellings, never
has two values for one claim, and its scope string splits on SP alone (issue 10 items 1-4).

Each case asserts the status and challenge the client got and what the recording upstream
received (nothing, for a refusal). Requests go over a raw socket (test_security's `get`).
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from proxy.base.errors import ProxyError, Reason
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.integration.test_security import INVALID_REQUEST_MALFORMED, bearer, get

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    headers:
      claims: {{sub: X-User-Id, roles: X-User-Roles}}
routes:
  - name: admin
    match: {{path_prefix: /admin/}}
    auth: {{provider: main, scopes: {{all_of: [admin]}}}}
  - name: payload
    match: {{path_prefix: /p/}}
    auth: {{provider: main}}
    headers: {{claims: {{sub: X-User-Id}}, payload: X-Jwt-Payload}}
  - name: query
    match: {{path_prefix: /q/}}
    auth: {{provider: main}}
    token_sources: [{{query: access_token}}]
  - name: api
    match: {{path_prefix: /}}
    auth: {{provider: main}}
"""


def challenge(reason: Reason) -> str:
    return f'Bearer realm="api", error="invalid_token", error_description="{ProxyError(reason).description}"'


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed_text(key: TestKey, payload: str, header: str | None = None) -> str:
    """An RS256 token signed over the JSON texts as given (duplicate names, NaN and all)."""
    header = header if header is not None else json.dumps({"alg": "RS256", "kid": key.kid})
    signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
    signature = key.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def claims_text(extra: str = "") -> str:
    now = int(time.time())
    return f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"user-1","iat":{now},"exp":{now + 300}{extra}}}'


async def refused(s: Any, path: str, token: str, reason: Reason) -> None:
    status, headers, body = await get(s, path, bearer(token))
    assert status == 401, (status, body)
    assert headers["WWW-Authenticate"] == challenge(reason)
    assert json.loads(body) == {"error": "invalid_token", "error_description": ProxyError(reason).description}


# -- item 1: scopes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "separator", ["\t", "\u00a0", "\u3000", "\u2003", "\x0b", "\x1f", "\u200b", "\ufeff", "\u2028"]
)
async def test_a_scope_string_grants_admin_only_when_sp_separates_it(
    sidecar: Any, rsa_key: TestKey, separator: str
) -> None:
    s = await sidecar(CONFIG)
    status, headers, _ = await get(s, "/admin/x", bearer(mint({"scope": f"read{separator}admin"}, key=rsa_key)))
    assert status == 403 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert s.upstream.seen == []
    status, _, _ = await get(s, "/admin/x", bearer(mint({"scope": "read  admin "}, key=rsa_key)))
    assert status == 200 and len(s.upstream.seen) == 1


# -- item 2: no token content makes a 5xx ----------------------------------------------------
@pytest.mark.parametrize(
    "path, claims",
    [
        ("/orders", {"sub": "\ud800"}),
        ("/orders", {"sub": "user-\udfff-1"}),
        ("/orders", {"roles": ["dev", "\udc80"]}),
        ("/orders", {"roles": {"\ud800": 1}}),
        ("/p/x", {"note": "\ud800"}),  # not a claim header, but in the payload header
        ("/p/x", {"o": {"k": [{"\udfff": 1}]}}),
        ("/p/x", ',"big":1e400'),  # JSON, but Python reads it as inf, which has no JSON form
        ("/orders", ',"roles":[1,1e999]'),
    ],
    ids=[
        "sub",
        "sub-inner",
        "list-item",
        "object-name",
        "payload-value",
        "payload-nested-name",
        "payload-1e400",
        "list-1e999",
    ],
)
async def test_a_claim_with_no_exact_header_form_is_a_401_unsafe_claim_not_a_500(
    sidecar: Any, rsa_key: TestKey, path: str, claims: dict[str, Any] | str
) -> None:
    s = await sidecar(CONFIG)
    token = mint(claims, key=rsa_key) if isinstance(claims, dict) else signed_text(rsa_key, claims_text(claims))
    for _ in range(2):  # the second time from the verified-token cache: the same answer
        await refused(s, path, token, Reason.UNSAFE_CLAIM)
    assert s.upstream.seen == []


async def test_a_lone_surrogate_in_a_claim_nothing_renders_is_no_reason_to_refuse(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await sidecar(CONFIG)
    status, _, _ = await get(s, "/orders", bearer(mint({"note": "\ud800", "n": {"\udc80": 1}}, key=rsa_key)))
    assert status == 200
    assert s.upstream.last().headers["x-user-id"] == ["user-42"]


@pytest.mark.parametrize("depth", [50, 400, 900, 2000])
async def test_deeply_nested_claims_never_make_a_5xx(sidecar: Any, rsa_key: TestKey, depth: int) -> None:
    s = await sidecar(CONFIG)
    token = signed_text(rsa_key, claims_text(',"deep":' + "[" * depth + "]" * depth))
    for path in ("/orders", "/p/x"):
        status, headers, _ = await get(s, path, bearer(token))
        assert status in (200, 401), status
        if status == 401:
            assert headers["WWW-Authenticate"] in (challenge(Reason.MALFORMED), challenge(Reason.UNSAFE_CLAIM))
        elif path == "/p/x":
            sent = s.upstream.last().headers["x-jwt-payload"][0]
            assert json.loads(base64.urlsafe_b64decode(sent + "=" * (-len(sent) % 4)))["deep"] is not None
    if depth <= 50:
        assert len(s.upstream.seen) == 2, "shallow nesting is forwarded"


# -- item 3: one token, one spelling -----------------------------------------------------------
async def test_only_the_canonical_spelling_of_a_token_is_accepted_even_once_it_is_cached(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await sidecar(CONFIG)
    token = mint(key=rsa_key)
    header, payload, signature = token.split(".")
    status, _, _ = await get(s, "/orders", bearer(token))
    assert status == 200  # verified and cached under this text
    assert len(signature) % 4 == 2, "2048-bit RSA: 342 characters"
    standard = signature.replace("-", "+").replace("_", "/")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    others = [
        f"{header}.{payload}.{signature}==",  # padded: what PyJWT accepted
        f"{header}.{payload}.{signature}=",
        f"{header}.{payload}.{signature}===",
        f"{header}{'=' * (-len(header) % 4) or '===='}.{payload}.{signature}",
        f"{header}.{payload}{'=' * (-len(payload) % 4) or '===='}.{signature}",
        # a last character with unused bits set: the same bytes to a lenient decoder
        f"{header}.{payload}.{signature[:-1]}{alphabet[(last & ~0x0F) | 0x01]}",
        *([f"{header}.{payload}.{standard}"] if standard != signature else []),  # base64, not base64url
    ]
    for other in others:
        # A '=' inside the token is no RFC 6750 §2.1 b64token: that is a 400 before any token
        # check. Every other spelling reaches the verifier, which refuses it.
        b64token = re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", other) is not None
        for path, headers in (("/orders", bearer(other)), ("/q/x?access_token=" + quote(other, safe=""), {})):
            status, answer, _ = await get(s, path, headers)
            assert (status, answer["WWW-Authenticate"]) == (
                (401, challenge(Reason.MALFORMED)) if b64token else (400, INVALID_REQUEST_MALFORMED)
            ), (path, other)
    assert len(s.upstream.seen) == 1
    status, _, _ = await get(s, "/orders", bearer(token))
    assert status == 200 and len(s.upstream.seen) == 2, "the token itself still passes, from the cache"


# -- item 4: one value per claim ------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda k: signed_text(k, claims_text(',"sub":"admin"')),
        lambda k: signed_text(k, claims_text(',"s\\u0075b":"admin"')),
        lambda k: signed_text(k, claims_text(',"roles":{"r":["user"],"r":["admin"]}')),
        lambda k: signed_text(k, claims_text(), header=f'{{"alg":"RS256","kid":"{k.kid}","kid":"{k.kid}"}}'),
        lambda k: signed_text(k, claims_text(',"n":NaN')),
    ],
    ids=["sub-twice", "sub-twice-escaped", "nested-twice", "header-kid-twice", "NaN"],
)
async def test_a_duplicate_member_name_at_any_depth_is_malformed(sidecar: Any, rsa_key: TestKey, make: Any) -> None:
    s = await sidecar(CONFIG)
    for path in ("/orders", "/p/x"):
        await refused(s, path, make(rsa_key), Reason.MALFORMED)
    assert s.upstream.seen == []
    status, _, _ = await get(s, "/p/x", bearer(signed_text(rsa_key, claims_text(',"a":{"x":1},"b":{"x":2}'))))
    assert status == 200, "one name in two objects is no duplicate"


async def test_an_exp_too_large_for_a_double_is_a_malformed_claim(sidecar: Any, rsa_key: TestKey) -> None:
    # 1e400 is JSON (RFC 8259 §6 leaves the range to the reader); Python reads inf, which is
    # no NumericDate. `Infinity` itself is not JSON at all: malformed.
    s = await sidecar(CONFIG)
    now = int(time.time())
    text = f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"u","iat":{now},"exp":1e400}}'
    await refused(s, "/orders", signed_text(rsa_key, text), Reason.MALFORMED_CLAIM)
    await refused(s, "/orders", signed_text(rsa_key, text.replace("1e400", "Infinity")), Reason.MALFORMED)
    assert s.upstream.seen == []


# -- item 9: kid is a hint ---------------------------------------------------------------------
async def test_a_kid_reaches_a_secret_without_kid_and_a_configured_kid_only_its_own(
    sidecar: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, rsa_key: TestKey
) -> None:
    import secrets

    secret = secrets.token_urlsafe(48)
    monkeypatch.setenv("JWT_SIDECAR_EDGE_SECRET", secret)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(rsa_key.public_pem())
    s = await sidecar(f"""\
        realm: api
        upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
        providers:
          hs: {{issuer: "https://hs.test", audiences: [{AUDIENCE}], secret: {{env: JWT_SIDECAR_EDGE_SECRET}}}}
          hs-kid:
            issuer: "https://hs-kid.test"
            audiences: [{AUDIENCE}]
            secret: {{env: JWT_SIDECAR_EDGE_SECRET, kid: "2024-05"}}
          pem: {{issuer: "https://pem.test", audiences: [{AUDIENCE}], pem_file: {{file: "{pem}", kid: pem-1}}}}
        routes:
          - {{name: hs, match: {{path_prefix: /hs/}}, auth: {{provider: hs}}}}
          - {{name: hs-kid, match: {{path_prefix: /hk/}}, auth: {{provider: hs-kid}}}}
          - {{name: pem, match: {{path_prefix: /pem/}}, auth: {{provider: pem}}}}
        """)
    key = secret.encode()
    cases = [
        ("/hs/x", mint({"iss": "https://hs.test"}, secret=key, headers={"kid": "whatever"}), 200),
        ("/hs/x", mint({"iss": "https://hs.test"}, secret=key), 200),
        ("/hk/x", mint({"iss": "https://hs-kid.test"}, secret=key, headers={"kid": "2024-05"}), 200),
        ("/hk/x", mint({"iss": "https://hs-kid.test"}, secret=key), 200),
        ("/hk/x", mint({"iss": "https://hs-kid.test"}, secret=key, headers={"kid": "2024-06"}), 401),
        ("/pem/x", mint({"iss": "https://pem.test"}, key=rsa_key, headers={"kid": "pem-1"}), 200),
        ("/pem/x", mint({"iss": "https://pem.test"}, key=rsa_key, headers={"kid": None}), 200),
        ("/pem/x", mint({"iss": "https://pem.test"}, key=rsa_key), 401),  # kid rsa-1, not pem-1
    ]
    for path, token, expected in cases:
        status, headers, _ = await get(s, path, bearer(token))
        assert status == expected, (path, jwt_header(token), status)
        if expected == 401:
            assert headers["WWW-Authenticate"] == challenge(Reason.UNKNOWN_KID)


def jwt_header(token: str) -> Any:
    segment = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


# -- widened by the review: odd types and values in dates, claims, headers and token text ------
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    ["true", "false", '"1700000000"', "[1]", "{}", "1e400", "-1e400", "1" + "0" * 400, "-1" + "0" * 400],
    ids=["true", "false", "string", "list", "object", "1e400", "-1e400", "int-1e400", "int--1e400"],
)
async def test_a_numeric_date_of_another_type_or_beyond_a_double_is_a_malformed_claim(
    sidecar: Any, rsa_key: TestKey, claim: str, value: str
) -> None:
    # True is an int to Python and 10**400 an int no float holds (math.isfinite raises on it):
    # neither is a NumericDate, and neither may be a 500.
    s = await sidecar(CONFIG)
    now = int(time.time())
    dates = {"iat": str(now), "exp": str(now + 300), claim: value}
    text = (
        f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"u",'
        + ",".join(f'"{name}":{v}' for name, v in dates.items())
        + "}"
    )
    for _ in range(2):
        await refused(s, "/orders", signed_text(rsa_key, text), Reason.MALFORMED_CLAIM)
    assert s.upstream.seen == []


@pytest.mark.parametrize(
    "roles",
    [
        [["dev", "admin"]],
        [{"a": [1, 2]}],
        ["dev", [0, True, 5]],
        [{"a": 1, "b": 2}],
    ],
    ids=["nested-list", "object-with-list", "bare-numbers", "object-two-members"],
)
async def test_a_list_claim_whose_item_renders_with_a_comma_is_unsafe(
    sidecar: Any, rsa_key: TestKey, roles: list[Any]
) -> None:
    # Items are joined with ','; an item whose own text holds one (a nested list or object as
    # JSON) reads upstream as several items: [[0,true,5]] would grant role "5" and "true".
    s = await sidecar(CONFIG)
    await refused(s, "/orders", mint({"roles": roles}, key=rsa_key), Reason.UNSAFE_CLAIM)
    assert s.upstream.seen == []


@pytest.mark.parametrize(
    "roles",
    [["dev", " admin"], ["dev ", "admin"], ["dev", "\tadmin"]],
    ids=["leading-sp", "trailing-sp", "leading-tab"],
)
async def test_a_list_claim_item_with_surrounding_whitespace_is_unsafe(
    sidecar: Any, rsa_key: TestKey, roles: list[str]
) -> None:
    # A list field's parser trims OWS around each item (RFC 9110 §5.6.1): " admin" would
    # arrive as "admin", another role than the token holds.
    s = await sidecar(CONFIG)
    await refused(s, "/orders", mint({"roles": roles}, key=rsa_key), Reason.UNSAFE_CLAIM)
    assert s.upstream.seen == []


@pytest.mark.parametrize(
    "roles, sent",
    [
        (True, "true"),
        (False, "false"),
        (1, "1"),
        (0, "0"),
        (1e16, "1e+16"),
        (-0.0, "-0.0"),
        (2.5, "2.5"),
        (10**30, str(10**30)),
        (["a", 1, True, None], "a,1,true,null"),
        ({"k": "v"}, '{"k":"v"}'),
        ("é-ü", "é-ü"),
        ([], ""),
        (["", "a"], ",a"),
        ({"a\r\nX-User-Id: admin": 1}, '{"a\\r\\nX-User-Id: admin":1}'),
        ({"k": " v "}, '{"k":" v "}'),
    ],
    ids=[
        "true",
        "false",
        "1",
        "0",
        "1e16",
        "-0.0",
        "2.5",
        "big-int",
        "mixed-list",
        "object",
        "non-ascii",
        "empty-list",
        "empty-item",
        "object-key-with-crlf",
        "object-value-with-spaces",
    ],
)
async def test_claims_of_every_json_type_are_rendered_exactly(
    sidecar: Any, rsa_key: TestKey, roles: Any, sent: str
) -> None:
    s = await sidecar(CONFIG)
    status, _, body = await get(s, "/orders", bearer(mint({"roles": roles}, key=rsa_key)))
    assert status == 200, body
    assert s.upstream.last().headers.get("x-user-roles") == [sent]


def _header(**fields: Any) -> str:
    return json.dumps({"alg": "RS256", "kid": "rsa-1", **fields})


@pytest.mark.parametrize(
    "header, reason",
    [
        ('{"alg":"rs256","kid":"rsa-1"}', Reason.ALG_NOT_ALLOWED),
        ('{"alg":"RS256 ","kid":"rsa-1"}', Reason.ALG_NOT_ALLOWED),
        ('{"alg":"RS256\\u0000","kid":"rsa-1"}', Reason.ALG_NOT_ALLOWED),
        ('{"alg":null,"kid":"rsa-1"}', Reason.ALG_NOT_ALLOWED),
        ('{"alg":"RS256","kid":1}', Reason.MALFORMED),
        ('{"alg":"RS256","kid":true}', Reason.MALFORMED),
        ('{"alg":"RS256","kid":{"k":"rsa-1"}}', Reason.MALFORMED),
        ('{"alg":"RS256","kid":["rsa-1"]}', Reason.MALFORMED),
        ('{"alg":"RS256","kid":""}', Reason.UNKNOWN_KID),
        ('{"alg":"RS256","kid":"rsa-1 "}', Reason.UNKNOWN_KID),
        ('{"alg":"RS256","kid":"RSA-1"}', Reason.UNKNOWN_KID),
        ('{"alg":"RS256","kid":"' + "k" * 5000 + '"}', Reason.UNKNOWN_KID),
        (_header(crit=[]), Reason.CRIT),
        (_header(crit="exp"), Reason.CRIT),
        (_header(b64=True), Reason.CRIT),
        ("[]", Reason.MALFORMED),
        ('"RS256"', Reason.MALFORMED),
        ("\ufeff" + _header(), Reason.MALFORMED),
        (_header() + " x", Reason.MALFORMED),
    ],
    ids=[
        "alg-lower",
        "alg-trailing-space",
        "alg-nul",
        "alg-null",
        "kid-number",
        "kid-bool",
        "kid-object",
        "kid-list",
        "kid-empty",
        "kid-trailing-space",
        "kid-other-case",
        "kid-long",
        "crit-empty",
        "crit-string",
        "b64-true",
        "header-list",
        "header-string",
        "header-bom",
        "header-trailing-garbage",
    ],
)
async def test_a_header_trick_is_refused_for_its_reason(
    sidecar: Any, rsa_key: TestKey, header: str, reason: Reason
) -> None:
    s = await sidecar(CONFIG)
    await refused(s, "/orders", signed_text(rsa_key, claims_text(), header=header), reason)
    assert s.upstream.seen == []


async def test_a_kid_of_null_is_no_kid(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(CONFIG)
    status, _, _ = await get(
        s, "/orders", bearer(signed_text(rsa_key, claims_text(), header='{"alg":"RS256","kid":null}'))
    )
    assert status == 200


@pytest.mark.parametrize(
    "make",
    [
        lambda k: "eyJhbGciOiJSUzI1NiJ9.e30",
        lambda k: mint(key=k) + ".AAAA",
        lambda k: mint(key=k) + "." + mint(key=k).split(".")[1] + ".x.y",
        lambda k: "..",
        lambda k: "...",
        lambda k: ".".join(mint(key=k).split(".")[:2]) + ".",
        lambda k: signed_text(k, json.dumps(mint(key=k)), header=_header(cty="JWT")),
        lambda k: signed_text(k, "[" + claims_text() + "]"),
        lambda k: signed_text(k, "\ufeff" + claims_text()),
        lambda k: signed_text(k, claims_text() + "\x00"),
    ],
    ids=[
        "two-segments",
        "four-segments",
        "five-segments",
        "empty-segments",
        "four-empty",
        "no-signature",
        "nested-jwt",
        "payload-list",
        "payload-bom",
        "payload-trailing-nul",
    ],
)
async def test_a_token_of_another_shape_is_a_401_never_forwarded(sidecar: Any, rsa_key: TestKey, make: Any) -> None:
    s = await sidecar(CONFIG)
    status, headers, _ = await get(s, "/orders", bearer(make(rsa_key)))
    assert status == 401
    assert headers["WWW-Authenticate"] in (challenge(Reason.MALFORMED), challenge(Reason.BAD_SIGNATURE))
    assert s.upstream.seen == []


SOURCES = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
routes:
  - {{name: cookie, match: {{path_prefix: /c}}, auth: {{provider: main}}, token_sources: [{{cookie: access_token}}]}}
  - {{name: query, match: {{path_prefix: /q}}, auth: {{provider: main}}, token_sources: [{{query: access_token}}]}}
  - name: header
    match: {{path_prefix: /h}}
    auth: {{provider: main}}
    token_sources: [{{header: X-Api-Token, prefix: "Token "}}]
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""


def _in_source(kind: str, text: str) -> tuple[str, list[tuple[str, str]]]:
    if kind == "bearer":
        return "/x", [("Authorization", f"Bearer {text}")]
    if kind == "header":
        return "/h/x", [("X-Api-Token", f"Token {text}")]
    if kind == "cookie":
        return "/c/x", [("Cookie", f"access_token={text}")]
    return "/q/x?access_token=" + quote(text, safe=""), []


STRAY = {
    "zwsp-after": lambda t: t + "\u200b",
    "bom-before": lambda t: "\ufeff" + t,
    "non-ascii-inside": lambda t: t[:10] + "\u00e9" + t[10:],
    "vt-after": lambda t: t + "\x0b",
    "space-inside": lambda t: t[:10] + " " + t[10:],
    "tab-inside": lambda t: t[:10] + "\t" + t[10:],
    "del-after": lambda t: t + "\x7f",
    "fullwidth-dot": lambda t: t.replace(".", "\uff0e", 1),
    "comma-two": lambda t: t + "," + t,
    "semicolon-after": lambda t: t + ";",
    "nbsp-before": lambda t: "\u00a0" + t,
}


@pytest.mark.parametrize(
    "kind, around",
    [
        pytest.param(kind, around, id=f"{name}-{kind}")
        for kind in ("bearer", "header", "cookie", "query")
        for name, around in STRAY.items()
        if not (kind == "cookie" and name in ("comma-two", "semicolon-after"))  # ';' and ',' end a cookie pair
    ],
)
async def test_token_text_with_a_stray_character_is_never_accepted_nor_a_5xx(
    sidecar: Any, rsa_key: TestKey, kind: str, around: Any
) -> None:
    s = await sidecar(SOURCES)
    target, headers = _in_source(kind, around(mint(key=rsa_key)))
    status, _, _ = await get(s, target, headers)
    assert status in (400, 401), status
    assert s.upstream.seen == []


@pytest.mark.parametrize("kind", ["bearer", "header", "cookie", "query"])
async def test_the_plain_token_passes_in_every_source(sidecar: Any, rsa_key: TestKey, kind: str) -> None:
    s = await sidecar(SOURCES)
    target, headers = _in_source(kind, mint(key=rsa_key))
    status, _, _ = await get(s, target, headers)
    assert status == 200 and len(s.upstream.seen) == 1


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "Bearer {t}"), ("authorization", "Bearer {t}")],
        [("authorization", "Basic dXNlcjpwYXNz"), ("AUTHORIZATION", "Bearer {t}")],
        [("Authorization", "Bearer {t}"), ("Authorization", "")],
        [("Authorization", ""), ("Authorization", "Bearer {t}")],
    ],
    ids=["two-casings", "basic-and-bearer-casings", "bearer-then-empty", "empty-then-bearer"],
)
async def test_authorization_twice_in_any_casing_is_a_400_on_every_route(
    sidecar: Any, rsa_key: TestKey, headers: list[tuple[str, str]]
) -> None:
    s = await sidecar(SOURCES)
    token = mint(key=rsa_key)
    for target in ("/x", "/c/x", "/q/x?access_token=" + token):
        status, _, _ = await get(s, target, [(k, v.format(t=token)) for k, v in headers])
        assert status == 400, (target, status)
    assert s.upstream.seen == []


async def test_an_obs_folded_authorization_is_a_400(sidecar: Any, rsa_key: TestKey) -> None:
    # RFC 9112 §5.2 lets a server reject obs-fold or unfold it; the parser rejects it, so a
    # folded line never reaches the token check as some other text.
    s = await sidecar(SOURCES)
    token = mint(key=rsa_key)
    for value in (f"Bearer\r\n {token}", f"Bearer {token}\r\n x", f"Bearer\r\n\t{token}"):
        status, _, _ = await get(s, "/x", [("Authorization", value)])
        assert status == 400, (value[:20], status)
    assert s.upstream.seen == []


@pytest.mark.parametrize(
    "cookie, status",
    [
        ('access_token="{t}"', 200),
        ("access_token= {t}\t", 200),
        ('access_token="{t}', 400),
        ('access_token={t}"', 400),
        ('access_token=""{t}""', 400),
        ("access_token=\u00a0{t}", 400),
        ("access_token={t}\u3000", 400),
    ],
    ids=["quoted", "ows", "open-quote", "close-quote", "doubled-quotes", "nbsp-before", "ideographic-space-after"],
)
async def test_a_cookie_value_is_the_token_only_in_its_one_syntax(
    sidecar: Any, rsa_key: TestKey, cookie: str, status: int
) -> None:
    # RFC 6265 §4.2.1: OWS is SP/HTAB, and one DQUOTE pair may enclose the value.
    s = await sidecar(SOURCES)
    got, _, _ = await get(s, "/c/x", [("Cookie", cookie.format(t=mint(key=rsa_key)))])
    assert got == status
    assert len(s.upstream.seen) == (status == 200)


@pytest.mark.parametrize(
    "claims, status",
    [
        ({"scope": ["admin"]}, 200),
        ({"scp": ["read", "admin"]}, 200),
        ({"scp": "read admin"}, 200),
        ({"scope": "read", "scp": ["admin"]}, 200),
        ({"scope": [["admin"]]}, 403),
        ({"scope": {"admin": True}}, 403),
        ({"scope": ["read admin"]}, 403),
        ({"scope": "read,admin"}, 403),
        ({"scope": "ADMIN"}, 403),
        ({"scope": "admin\u0000"}, 403),
        ({"scope": True}, 403),
        ({"scope": 1}, 403),
        ({"scope": None}, 403),
        ({"scope": ""}, 403),
        ({"scope": [1, True, None, {"a": "admin"}]}, 403),
        ({"scp": "admin\u200b"}, 403),
        ({"scope": "adm in"}, 403),
    ],
    ids=[
        "list",
        "scp-list",
        "scp-string",
        "scope-and-scp",
        "nested-list",
        "object",
        "list-item-with-space",
        "comma",
        "other-case",
        "nul",
        "bool",
        "number",
        "null",
        "empty",
        "non-strings",
        "zwsp",
        "split-word",
    ],
)
async def test_a_scope_of_any_json_type_grants_admin_only_as_an_exact_scope_token(
    sidecar: Any, rsa_key: TestKey, claims: dict[str, Any], status: int
) -> None:
    s = await sidecar(CONFIG)
    got, _headers, _ = await get(s, "/admin/x", bearer(mint(claims, key=rsa_key)))
    assert got == status
    assert len(s.upstream.seen) == (status == 200)


@pytest.mark.parametrize(
    "dates, status, reason",
    [
        ('"exp":1e16', 200, None),
        ('"exp":{now}.5', 200, None),
        ('"exp":' + "9" * 300, 200, None),
        ('"exp":-0.0', 401, Reason.EXPIRED),
        ('"exp":-1e308', 401, Reason.EXPIRED),
        ('"exp":0', 401, Reason.EXPIRED),
        ('"exp":{later},"nbf":-1e308', 200, None),
        ('"exp":{later},"nbf":1e308', 401, Reason.NOT_YET_VALID),
        ('"exp":{later},"iat":1e16', 401, Reason.ISSUED_IN_FUTURE),
        ('"exp":{later},"iat":-0.0', 200, None),
    ],
    ids=[
        "exp-1e16",
        "exp-fraction",
        "exp-300-digits",
        "exp-minus-zero",
        "exp-most-negative",
        "exp-zero",
        "nbf-most-negative",
        "nbf-1e308",
        "iat-1e16",
        "iat-minus-zero",
    ],
)
async def test_numeric_dates_at_the_edges_of_a_double_compare_as_numbers(
    sidecar: Any, rsa_key: TestKey, dates: str, status: int, reason: Reason | None
) -> None:
    s = await sidecar(CONFIG)
    now = int(time.time())
    text = f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"u",' + dates.format(now=now + 60, later=now + 300) + "}"
    if status == 200:
        for _ in range(2):  # and again from the cache
            got, _, body = await get(s, "/orders", bearer(signed_text(rsa_key, text)))
            assert got == 200, body
    else:
        assert reason is not None
        await refused(s, "/orders", signed_text(rsa_key, text), reason)
        assert s.upstream.seen == []
