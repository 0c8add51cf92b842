"""The revocation check in the request path: which routes check it, a reload, the metrics.

A real sidecar on loopback (tests/integration/conftest.py's `sidecar`) with a file store: the
list's rules are written as `jwt-sidecar revoke` writes them (the store's own writer), and the
sidecar's own file watch picks them up. What a user relies on: a route or provider with
`revocation: false` admits a revoked token and every other route refuses it; an optional route
refuses a revoked token as it refuses any bad one; a config reload that leaves `revocation:` as
it was keeps the same list (nothing reloaded), one that changes it switches to the new store,
and one that removes it stops checking; the age and size of the list are on /metrics.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.auth.revocation import make_rule
from proxy.auth.revocationstore import write_rules_file
from proxy.ops.reload import reload
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.support.raw import bounded_by

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
  trusted:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    revocation: false
routes:
  - {{name: health, match: {{path_prefix: /health/}}, auth: {{provider: main, revocation: false}}}}
  - {{name: internal, match: {{path_prefix: /internal/}}, auth: {{provider: trusted}}}}
  - {{name: maybe, match: {{path_prefix: /maybe/}}, auth: {{provider: main, optional: true}}}}
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
revocation: {{file: "{{revoked}}"}}
"""


def revoke_sub(path: Path, sub: str) -> None:
    write_rules_file(str(path), [make_rule(sub=sub, expires=time.time() + 3600)], time.time())


async def status(sidecar: Any, path: str, token: str) -> int:
    async with await sidecar.get(path, headers={"Authorization": f"Bearer {token}"}) as response:
        await response.read()
        return int(response.status)


async def until(sidecar: Any, path: str, token: str, wanted: int) -> None:
    for _ in range(100):  # the file is checked twice a second: bounded at 5 s
        if await status(sidecar, path, token) == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never answered {wanted}")


@bounded_by(60)
async def test_routes_and_providers_that_opt_out_admit_a_revoked_token_the_others_refuse_it(
    sidecar: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    revoked = tmp_path / "revoked.yaml"
    s = await sidecar(CONFIG, revoked=str(revoked))
    token = mint({"sub": "mallory"}, key=rsa_key)
    for path in ("/api/x", "/maybe/x", "/health/x", "/internal/x"):
        assert await status(s, path, token) == 200  # now cached
    revoke_sub(revoked, "mallory")
    await until(s, "/api/x", token, 401)
    assert await status(s, "/maybe/x", token) == 401  # optional: no token is fine, a revoked one is not
    assert await status(s, "/health/x", token) == 200  # the route opts out
    assert await status(s, "/internal/x", token) == 200  # the provider opts out
    plans = s.runtime.snapshot.plans
    assert plans["health"].revocation is None and plans["internal"].revocation is None
    assert plans["api"].revocation is s.runtime.revocation is not None


def gauges(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("jwt_sidecar_revocation_"):
            for sample in family.samples:
                found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@bounded_by(60)
async def test_the_lists_size_and_age_are_on_metrics(sidecar: Any, rsa_key: TestKey, tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.yaml"
    s = await sidecar(CONFIG, revoked=str(revoked))
    revoke_sub(revoked, "a")
    revoke_sub(revoked, "b")
    token = mint({"sub": "a"}, key=rsa_key)
    await until(s, "/api/x", token, 401)
    found = gauges(s.runtime.metrics.render()[0].decode())
    assert found["jwt_sidecar_revocation_rules"] == {(("store", "file"),): 2.0}
    [age] = found["jwt_sidecar_revocation_age_seconds"].values()
    assert 0 <= age < 5


@bounded_by(90)
async def test_a_reload_keeps_the_list_unless_revocation_changes(
    sidecar: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    revoke_sub(first, "alice")
    revoke_sub(second, "bob")
    s = await sidecar(CONFIG, revoked=str(first))
    runtime = s.runtime
    config = Path(runtime.config_path)
    alice, bob = mint({"sub": "alice"}, key=rsa_key), mint({"sub": "bob"}, key=rsa_key)
    assert (await status(s, "/api/x", alice), await status(s, "/api/x", bob)) == (401, 200)

    # Another setting changes: the same follower (nothing read again, no gap).
    store = runtime.revocation
    config.write_text(config.read_text().replace("realm: api", "realm: api2"))
    assert await reload(runtime)
    assert runtime.revocation is store and runtime.snapshot.plans["api"].revocation is store
    assert await status(s, "/api/x", alice) == 401

    # Another file: a new follower, loaded before the new config serves; the old one stopped.
    config.write_text(config.read_text().replace(str(first), str(second)))
    assert await reload(runtime)
    assert runtime.revocation is not store and runtime.revocation.path == str(second)
    assert store._closing  # noqa: SLF001 - the replaced follower no longer runs
    assert (await status(s, "/api/x", alice), await status(s, "/api/x", bob)) == (200, 401)

    # No `revocation:` at all: nothing is checked, and the follower is gone.
    replaced = runtime.revocation
    config.write_text(config.read_text().replace(f'revocation: {{file: "{second}"}}\n', ""))
    assert await reload(runtime)
    assert runtime.revocation is None and runtime.snapshot.plans["api"].revocation is None
    assert await status(s, "/api/x", bob) == 200
    assert replaced is not None and replaced._closing  # noqa: SLF001
