"""rules.py: scopes and claim rules on verified claims; failures are 403s with the right reason."""

from __future__ import annotations

import re
from typing import Any

import pytest

from proxy.auth.rules import ABSENT, check_route, claim_at, rule_holds, scopes_of
from proxy.base.errors import InsufficientScope, Reason
from proxy.config.builder import ClaimRule, RouteAuth, ScopeRule


def rule(claim: str, op: str, value: Any = None) -> ClaimRule:
    if op == "matches":
        value = re.compile(value)
    if op == "one_of":
        value = tuple(value)
    return ClaimRule(claim=claim, path=tuple(claim.split(".")), op=op, value=value)


PAYLOAD = {
    "sub": "u1",
    "email": "ann@example.com",
    "email_verified": True,
    "level": 1,
    "tenant": "acme",
    "realm_access": {"roles": ["admin", "dev"]},
    "groups": "admin",
    "nothing": None,
}


@pytest.mark.parametrize(
    "r, holds",
    [
        (rule("tenant", "equals", "acme"), True),
        (rule("tenant", "equals", "other"), False),
        (rule("email_verified", "equals", True), True),
        (rule("level", "equals", True), False),  # 1 is not true, though Python says 1 == True
        (rule("email_verified", "equals", 1), False),
        (rule("tenant", "one_of", ["x", "acme"]), True),
        (rule("tenant", "one_of", ["x", "y"]), False),
        (rule("realm_access.roles", "contains", "admin"), True),
        (rule("realm_access.roles", "contains", "root"), False),
        (rule("groups", "contains", "admin"), False),  # contains is for list claims only
        (rule("email", "matches", r".*@example\.com"), True),
        (rule("email", "matches", r"example\.com"), False),  # full match, not search
        (rule("level", "matches", r"1"), False),  # only strings match a pattern
        (rule("realm_access.roles", "present", True), True),
        (rule("realm_access.missing", "present", True), False),
        (rule("realm_access.missing", "present", False), True),
        (rule("nothing", "present", True), False),  # null counts as absent
        (rule("email.deeper", "equals", "x"), False),  # path through a string
        (rule("absent", "equals", "x"), False),
    ],
    ids=lambda v: f"{v.claim} {v.op} {getattr(v.value, 'pattern', v.value)!r}" if isinstance(v, ClaimRule) else str(v),
)
def test_claim_operators(r: ClaimRule, holds: bool) -> None:
    assert rule_holds(r, PAYLOAD) is holds


def test_claim_at_walks_nested_objects() -> None:
    assert claim_at(PAYLOAD, ("realm_access", "roles")) == ["admin", "dev"]
    assert claim_at(PAYLOAD, ("realm_access", "x")) is ABSENT


@pytest.mark.parametrize(
    "payload, scopes",
    [
        ({"scope": "read write"}, {"read", "write"}),
        ({"scope": ["read", "write"]}, {"read", "write"}),
        ({"scp": ["admin"]}, {"admin"}),
        ({"scp": "a b", "scope": "c"}, {"a", "b", "c"}),
        ({"scope": 3}, set()),
        ({}, set()),
    ],
)
def test_scopes_from_string_or_list(payload: dict, scopes: set) -> None:
    assert scopes_of(payload) == scopes


def test_all_of_scopes_missing_one_is_insufficient_scope_naming_what_is_required() -> None:
    auth = RouteAuth(provider="main", scopes=ScopeRule(all_of=("orders:read", "orders:write")))
    check_route(auth, {"scope": "orders:write orders:read"})
    with pytest.raises(InsufficientScope) as caught:
        check_route(auth, {"scope": "orders:read"})
    assert caught.value.reason is Reason.SCOPE and caught.value.status == 403
    assert caught.value.challenge("api") == (
        'Bearer realm="api", error="insufficient_scope", '
        'error_description="The access token lacks a required scope", scope="orders:read orders:write"'
    )


def test_any_of_scopes() -> None:
    auth = RouteAuth(provider="main", scopes=ScopeRule(any_of=("admin", "ops")))
    check_route(auth, {"scp": ["ops"]})
    with pytest.raises(InsufficientScope):
        check_route(auth, {"scp": ["dev"]})


def test_claim_rule_failure_is_a_claim_rule_reason() -> None:
    auth = RouteAuth(provider="main", claims=(rule("tenant", "equals", "acme"), rule("email_verified", "equals", True)))
    check_route(auth, PAYLOAD)
    with pytest.raises(InsufficientScope) as caught:
        check_route(auth, {**PAYLOAD, "tenant": "evil"})
    assert caught.value.reason is Reason.CLAIM_RULE
    assert "tenant" in caught.value.detail


# -- scope strings split on SP alone (RFC 6749 §3.3) ----------------------------------------
def _separators_that_are_not_sp() -> list[str]:
    """Every character some splitter might take for a separator: Unicode whitespace
    (str.isspace), separators (Zs, Zl, Zp), controls (Cc) and format characters (Cf, e.g.
    ZERO WIDTH SPACE, BOM), but SP itself."""
    import sys
    import unicodedata

    found = [
        chr(c)
        for c in range(sys.maxunicode + 1)
        if chr(c).isspace() or unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp", "Cc", "Cf")
    ]
    found.remove(" ")
    return found


_NOT_SP = _separators_that_are_not_sp()


def test_the_separator_battery_holds_the_usual_suspects() -> None:
    for char in "\t\n\v\f\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2003\u200b\u2028\u2029\u202f\u205f\u3000\ufeff":
        assert char in _NOT_SP, hex(ord(char))


@pytest.mark.parametrize("claim", ["scope", "scp"])
def test_no_character_but_sp_separates_scopes(claim: str) -> None:
    admin = RouteAuth(provider="main", scopes=ScopeRule(all_of=("admin",)))
    read = RouteAuth(provider="main", scopes=ScopeRule(any_of=("read",)))
    for char in _NOT_SP:
        payload = {claim: f"read{char}admin"}
        assert scopes_of(payload) == {f"read{char}admin"}, hex(ord(char))
        for auth in (admin, read):
            with pytest.raises(InsufficientScope):
                check_route(auth, payload)
        # Around a real separator too: the scope next to it is not trimmed into another.
        assert scopes_of({claim: f"read {char}admin"}) == {"read", f"{char}admin"}, hex(ord(char))
        assert scopes_of({claim: f"read admin{char}"}) == {"read", f"admin{char}"}, hex(ord(char))


@pytest.mark.parametrize(
    "payload, scopes",
    [
        ({"scope": "read  admin"}, {"read", "admin"}),  # more than one SP: no empty scope either
        ({"scope": "   read admin   "}, {"read", "admin"}),
        ({"scope": " "}, set()),
        ({"scope": ""}, set()),
        ({"scope": "read\t admin"}, {"read\t", "admin"}),
        ({"scp": ["read admin"]}, {"read admin"}),  # a list item is one scope, never split
        ({"scp": [" admin"]}, {" admin"}),
        ({"scp": ["admin\t"]}, {"admin\t"}),
        ({"scp": ["", "ok"]}, {"ok"}),
        ({"scp": [1, None, True, 2.5, ["admin"], {"admin": True}, "ok"]}, {"ok"}),  # non-strings grant nothing
        ({"scope": {"admin": True}}, set()),
        ({"scope": None, "scp": "a b"}, {"a", "b"}),
        ({"scope": ["admin"], "scp": "read"}, {"admin", "read"}),
    ],
)
def test_scope_edge_cases(payload: dict, scopes: set) -> None:
    assert scopes_of(payload) == scopes


def test_a_list_item_holding_a_space_grants_neither_half() -> None:
    for claim in ("scope", "scp"):
        with pytest.raises(InsufficientScope):
            check_route(RouteAuth(provider="main", scopes=ScopeRule(all_of=("admin",))), {claim: ["read admin"]})


# -- which claims a cached token keeps ---------------------------------------------------------
def _config(tmp_path: Any, jwk: dict[str, Any], *, revocation: bool = False, payload_header: bool = False) -> Any:
    import json as _json

    import yaml

    from proxy.config.builder import parse

    jwks = tmp_path / "jwks.json"
    jwks.write_text(_json.dumps({"keys": [jwk]}))
    headers: dict[str, Any] = {"claims": {"sub": "X-User-Id", "realm_access.roles": "X-Roles"}}
    if payload_header:
        headers["payload"] = "X-Jwt-Payload"
    provider = {"issuer": "https://a", "audiences": ["api"], "jwks_file": str(jwks), "algorithms": ["RS256"]}
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:8080",
        "admin": "127.0.0.1:9901",
        "upstream": {"url": "http://127.0.0.1:9"},
        "providers": {"main": {**provider, "headers": headers}, "other": {**provider, "issuer": "https://b"}},
        "routes": [
            {
                "name": "admin",
                "match": {"path_prefix": "/admin"},
                "auth": {
                    "provider": "main",
                    "claims": [{"claim": "admin", "present": False}, {"claim": "org.id", "equals": 7}],
                },
            },
            {
                "name": "scoped",
                "match": {"path_prefix": "/s"},
                "auth": {"provider": "main", "scopes": {"all_of": ["read"]}},
            },
            {
                "name": "own",
                "match": {"path_prefix": "/o"},
                "auth": {"provider": "main"},
                "headers": {"claims": {"email": "X-Email"}},
            },
            {
                "name": "theirs",
                "match": {"path_prefix": "/"},
                "auth": {"provider": "other", "claims": [{"claim": "tenant", "equals": "t"}]},
            },
        ],
    }
    if revocation:
        doc["revocation"] = {"file": str(tmp_path / "revoked.json")}
    return parse(yaml.safe_dump(doc))


def test_a_cached_token_keeps_every_claim_a_route_a_header_map_or_the_revocation_list_reads(
    tmp_path: Any, rsa_key: Any
) -> None:
    from proxy.auth.rules import claims_read

    jwk = dict(rsa_key.public_jwk)
    settings = _config(tmp_path, jwk)
    kept = claims_read(settings, "main")
    # Rules (the first name of a path: `present: false` must still see `admin`), scopes, both
    # maps (the provider's and a route's own), and what the proxy always reads.
    assert kept == {"admin", "org", "scope", "scp", "sub", "realm_access", "email", "iss", "exp"}
    assert claims_read(settings, "other") == {"tenant", "iss", "sub", "exp"}, "another provider's routes are theirs"
    assert claims_read(_config(tmp_path, jwk, revocation=True), "main") >= {"jti", "sub", "iss", "iat"}  # type: ignore[operator]
    assert claims_read(_config(tmp_path, jwk, payload_header=True), "main") is None, "the whole payload is forwarded"
    # What the routes decide and render on the kept claims is what they do on all of them.
    from proxy.request.identity import claim_headers

    payloads = [
        {"sub": "u", "admin": True, "org": {"id": 7}, "scope": "read", "email": "e", "jti": "j", "extra": 1},
        {"sub": "u", "org": {"id": 7}, "scp": ["read"], "realm_access": {"roles": ["a", "b"]}, "iss": "https://a"},
        {"sub": "u", "org": {"id": 8}, "x": {"admin": 1}},
    ]
    for payload in payloads:
        trimmed = {name: value for name, value in payload.items() if name in kept}  # type: ignore[operator]
        for route in settings.routes:
            if route.auth is None or route.auth.provider != "main":
                continue

            def outcome(claims: dict[str, Any], auth: Any = route.auth) -> str:
                try:
                    check_route(auth, claims)
                except InsufficientScope as refused:
                    return str(refused.reason)
                return "admitted"

            assert outcome(trimmed) == outcome(payload), (route.name, payload)
            header_map = route.headers or settings.providers["main"].headers
            assert claim_headers(trimmed, header_map) == claim_headers(payload, header_map)
