"""Through the real proxy: allow and deny per route kind, with the exact answers a client gets."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import TestKey, mint


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_valid_token_reaches_upstream_with_identity_headers(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    token = mint({"email": "ann@example.com", "roles": ["dev", "ops"], "org": {"id": 7}}, key=rsa_key)
    async with await s.get("/orders/1?x=1&y=%20", headers=bearer(token)) as response:
        assert response.status == 200
        assert len(response.headers["X-Request-Id"]) == 32
    seen = s.upstream.last()
    assert seen.raw_path == "/orders/1?x=1&y=%20"
    assert seen.header("X-User-Id") == "user-42"
    assert seen.header("X-User-Email") == "ann@example.com"
    assert seen.header("X-User-Roles") == "dev,ops"
    assert json.loads(seen.header("X-User-Org")) == {"id": 7}
    assert seen.header("Authorization") is None, "the token is not forwarded by default"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Request-Id") == response.headers["X-Request-Id"]


async def test_no_token_is_401_with_a_bare_challenge(sidecar: Any) -> None:
    s = await sidecar()
    async with await s.get("/orders") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
        # The body claims no error either (RFC 6750 §3.1): the client sent no token to be invalid.
        assert await response.json() == {}
    assert s.upstream.seen == []


async def test_bad_token_is_401_invalid_token_with_a_fixed_description(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    token = mint({"exp": 1000, "iat": 0}, key=rsa_key)
    async with await s.get("/orders", headers=bearer(token)) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == (
            'Bearer realm="api", error="invalid_token", error_description="The access token expired"'
        )
        body = await response.text()
    assert token not in body and "user-42" not in body
    assert s.upstream.seen == []


async def test_missing_scope_is_403_insufficient_scope_naming_the_scope(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    token = mint({"scope": "read", "email_verified": True}, key=rsa_key)
    async with await s.get("/admin/users", headers=bearer(token)) as response:
        assert response.status == 403
        assert response.headers["WWW-Authenticate"] == (
            'Bearer realm="api", error="insufficient_scope", '
            'error_description="The access token lacks a required scope", scope="admin"'
        )
    ok = mint({"scope": "read admin", "email_verified": True}, key=rsa_key)
    async with await s.get("/admin/users", headers=bearer(ok)) as response:
        assert response.status == 200


async def test_claim_rule_failure_is_403(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    token = mint({"scope": "admin", "email_verified": False}, key=rsa_key)
    async with await s.get("/admin/users", headers=bearer(token)) as response:
        assert response.status == 403
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


async def test_public_route_needs_no_token(sidecar: Any) -> None:
    s = await sidecar()
    async with await s.get("/public/info") as response:
        assert response.status == 200
    assert s.upstream.last().header("X-User-Id") is None


async def test_optional_route_passes_without_a_token_but_checks_one_that_is_there(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await sidecar()
    async with await s.get("/maybe/x") as response:
        assert response.status == 200
    assert s.upstream.last().header("X-User-Id") is None
    async with await s.get("/maybe/x", headers=bearer(mint(key=rsa_key))) as response:
        assert response.status == 200
    assert s.upstream.last().header("X-User-Id") == "user-42"
    async with await s.get("/maybe/x", headers=bearer(mint({"aud": "other"}, key=rsa_key))) as response:
        assert response.status == 401


async def test_method_outside_the_route_falls_through_to_the_next_route(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    # /admin/ allows GET and POST only; DELETE falls through to the catch-all `api` route.
    async with await s.request("DELETE", "/admin/users", headers=bearer(mint(key=rsa_key))) as response:
        assert response.status == 200


async def test_no_matching_route_is_404(sidecar: Any) -> None:
    yaml = """\
        upstream: {url: "{upstream}"}
        providers: {main: {issuer: i, audiences: [a], jwks: {url: "{jwks}"}}}
        routes: [{match: {path_prefix: /only/}, auth: none}]
        """
    s = await sidecar(yaml)
    async with await s.get("/elsewhere") as response:
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"


async def test_a_route_overrides_upstream_token_sources_and_headers(
    sidecar: Any, rsa_key: TestKey, aiohttp_server: Any
) -> None:
    from tests.conftest import AUDIENCE, ISSUER
    from tests.support.upstream import start_upstream

    legacy = await start_upstream(aiohttp_server)
    yaml = f"""\
        upstream: {{url: "{{upstream}}"}}
        providers:
          main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
        routes:
          - name: legacy
            match: {{path_prefix: /legacy/}}
            auth: {{provider: main}}
            upstream: {{url: "{legacy.url}/base"}}
            token_sources: [{{cookie: session}}]
            headers: {{claims: {{sub: X-Remote-User}}}}
          - name: api
            match: {{path_prefix: /}}
            auth: {{provider: main}}
        """
    s = await sidecar(yaml)
    token = mint(key=rsa_key)
    async with await s.get("/legacy/a?b=1", headers={"Cookie": f"session={token}; theme=dark"}) as response:
        assert response.status == 200
    seen = legacy.last()
    assert seen.raw_path == "/base/legacy/a?b=1", "the route's upstream, with its base path"
    assert seen.header("X-Remote-User") == "user-42" and seen.header("X-User-Id") is None
    assert seen.header("Cookie") == "theme=dark", "the token cookie is removed, the others kept"
    assert s.upstream.seen == []
    # The route's token sources replace the provider's: a Bearer header is not looked at there.
    async with await s.get("/legacy/a", headers=bearer(token)) as response:
        assert response.status == 401
    async with await s.get("/other", headers=bearer(token)) as response:
        assert response.status == 200
    assert s.upstream.last().header("X-User-Id") == "user-42"
