"""A route's own `upstream`: its URL, with the top-level upstream's limits for what it leaves out.

A route that names its own upstream `url` must not quietly get the built-in body limit and
timeouts instead of the ones the config sets at the top level (README: `routes[].upstream`).
"""

from __future__ import annotations

from typing import Any

from tests.conftest import AUDIENCE, ISSUER, TestKey, mint

CONFIG = f"""\
upstream: {{url: "{{upstream}}", max_body: 1KB, timeout: 2s}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - {{name: own, match: {{path_prefix: /own/}}, auth: {{provider: main}}, upstream: {{url: "{{upstream}}/base"}}}}
  - {{name: own-limit, match: {{path_prefix: /big/}}, auth: {{provider: main}},
      upstream: {{url: "{{upstream}}", max_body: 4KB}}}}
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""


async def test_a_routes_own_upstream_keeps_the_top_level_body_limit(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar(CONFIG)
    headers = {"Authorization": f"Bearer {mint(key=rsa_key)}"}
    for path in ("/own/upload", "/upload"):
        async with await s.request("POST", path, data=b"x" * 2000, headers=headers) as response:
            assert response.status == 413, path
    assert s.upstream.seen == []
    # Within the limit, the route's own URL (with its base path) is the one asked.
    async with await s.request("POST", "/own/upload", data=b"x" * 500, headers=headers) as response:
        assert response.status == 200
    assert s.upstream.last().raw_path == "/base/own/upload"
    # A key the route sets itself is its own.
    async with await s.request("POST", "/big/upload", data=b"x" * 2000, headers=headers) as response:
        assert response.status == 200
    route = {r.name: r for r in s.runtime.settings.routes}
    assert (route["own"].upstream.timeout, route["own-limit"].upstream.timeout) == (2.0, 2.0)
