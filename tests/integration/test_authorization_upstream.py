"""The client's Authorization reaches the upstream of a route with auth only as the token the
route checked, forwarded: never unchecked beside the token of another source.

`forward_token: true` on a cookie- or query-only route used to forward the checked cookie
token and the client's own `Authorization` (a Basic password or a Bearer token nobody
verified); with `forward_token: false`, and on an optional route without a token, the
client's Authorization went on too. Now, on a route with auth, Authorization goes on only
when it held the checked token and `forward_token` is on; the token of another source stays
where it came from (`forward_token: true`) or is removed. A public route passes Authorization
on as sent. Against the real proxy and a recording upstream.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.integration.test_security import get

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    headers: {{claims: {{sub: X-User-Id}}}}
routes:
  - {{name: cookie-fwd, match: {{path_prefix: /cf/}}, auth: {{provider: main}}, token_sources: [{{cookie: at}}],
     headers: {{claims: {{sub: X-User-Id}}, forward_token: true}}}}
  - {{name: query-fwd, match: {{path_prefix: /qf/}}, auth: {{provider: main}}, token_sources: [{{query: at}}],
     headers: {{claims: {{sub: X-User-Id}}, forward_token: true}}}}
  - {{name: header-fwd, match: {{path_prefix: /hf/}}, auth: {{provider: main}}, token_sources: [{{header: X-Api-Token}}],
     headers: {{claims: {{sub: X-User-Id}}, forward_token: true}}}}
  - {{name: cookie, match: {{path_prefix: /c/}}, auth: {{provider: main}}, token_sources: [{{cookie: at}}]}}
  - {{name: header, match: {{path_prefix: /h/}}, auth: {{provider: main}}, token_sources: [{{header: X-Api-Token}}]}}
  - {{name: bearer-or-cookie, match: {{path_prefix: /bc/}}, auth: {{provider: main}},
     token_sources: [bearer, {{cookie: at}}], headers: {{claims: {{sub: X-User-Id}}, forward_token: true}}}}
  - {{name: bearer-fwd, match: {{path_prefix: /bf/}}, auth: {{provider: main}},
     headers: {{claims: {{sub: X-User-Id}}, forward_token: true}}}}
  - {{name: optional, match: {{path_prefix: /opt/}}, auth: {{provider: main, optional: true}}}}
  - {{name: optional-cookie, match: {{path_prefix: /oc/}}, auth: {{provider: main, optional: true}},
     token_sources: [{{cookie: at}}]}}
  - {{name: public, match: {{path_prefix: /public/}}, auth: none}}
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""
UNCHECKED = ["Basic dXNlcjpwYXNz", "Bearer x.y.z"]


@pytest.mark.parametrize("unchecked", UNCHECKED, ids=["basic", "bearer"])
@pytest.mark.parametrize(
    ("path", "carry"),
    [
        ("/cf/x", "cookie"),
        ("/qf/x", "query"),
        ("/hf/x", "header"),
        ("/c/x", "cookie"),
        ("/h/x", "header"),
        ("/bc/x", "cookie"),
    ],
    ids=["cookie-forward", "query-forward", "header-forward", "cookie", "header", "bearer-or-cookie-forward"],
)
async def test_a_token_from_another_source_never_takes_an_unchecked_authorization_along(
    sidecar: Any, rsa_key: TestKey, path: str, carry: str, unchecked: str
) -> None:
    s = await sidecar(CONFIG)
    token = mint({"sub": "checked"}, key=rsa_key)
    headers = [("Authorization", unchecked)]
    target = path
    if carry == "cookie":
        headers.append(("Cookie", f"at={token}; lang=en"))
    elif carry == "header":
        headers.append(("X-Api-Token", token))
    else:
        target = f"{path}?at={token}"
    status, _, _ = await get(s, target, headers)
    if path == "/bc/x" and unchecked.startswith("Bearer"):
        # A route that reads both: Bearer and a cookie are two tokens, refused before anything goes on.
        assert status == 400 and s.upstream.seen == []
        return
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("X-User-Id") == "checked"
    assert seen.header("Authorization") is None, "an Authorization we did not check reached the upstream"
    # A query token is removed whatever forward_token says (a URL ends up in logs).
    forwarded = path.startswith(("/cf/", "/hf/", "/bc/"))
    where = {"cookie": seen.header("Cookie") or "", "header": seen.header("X-Api-Token") or "", "query": seen.raw_path}
    assert (token in where[carry]) is forwarded, "forward_token keeps the checked token where it came from"


@pytest.mark.parametrize("path", ["/bf/x", "/orders/1"], ids=["forward_token", "default"])
async def test_on_a_bearer_route_authorization_is_the_checked_token_or_nothing(
    sidecar: Any, rsa_key: TestKey, path: str
) -> None:
    s = await sidecar(CONFIG)
    token = mint({"sub": "checked"}, key=rsa_key)
    status, _, _ = await get(s, path, [("Authorization", f"Bearer {token}")])
    assert status == 200
    expected = f"Bearer {token}" if path == "/bf/x" else None
    assert s.upstream.last().header("Authorization") == expected


@pytest.mark.parametrize("unchecked", UNCHECKED, ids=["basic", "bearer"])
@pytest.mark.parametrize("path", ["/opt/x", "/oc/x"], ids=["optional-bearer", "optional-cookie"])
async def test_an_optional_route_without_a_token_passes_no_unchecked_authorization(
    sidecar: Any, path: str, unchecked: str
) -> None:
    s = await sidecar(CONFIG)
    status, _, _ = await get(s, path, [("Authorization", unchecked)])
    if path == "/opt/x" and unchecked.startswith("Bearer"):
        # On a route that reads Bearer tokens, a Bearer token is checked: x.y.z is refused.
        assert status == 401 and s.upstream.seen == []
        return
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("Authorization") is None and seen.header("X-User-Id") is None


@pytest.mark.parametrize("unchecked", UNCHECKED, ids=["basic", "bearer"])
async def test_a_public_route_passes_authorization_on_as_sent(sidecar: Any, unchecked: str) -> None:
    s = await sidecar(CONFIG)
    status, _, _ = await get(s, "/public/x", [("Authorization", unchecked), ("X-User-Id", "spoofed")])
    assert status == 200
    seen = s.upstream.last()
    assert seen.header("Authorization") == unchecked, "a public route is the upstream's own business"
    assert seen.header("X-User-Id") is None, "the strip list still applies"
