"""A running sidecar exports exactly the families of proxy/telemetry/families.py, one process or `workers: 2`.

The real `jwt-sidecar run` in a subprocess (as a container runs it: `_created` samples off),
with a remote JWKS provider and the token cache on, answers one request of each outcome; its
admin `/metrics` must hold every declared family with the declared type, help, sample names
and label sets, and nothing else. The same requests through `workers: 2` must read the same
on the supervisor: the same families and labels, and the same counts where the counts do not
depend on which worker took a connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TestKey, jwks_of, mint
from tests.integration.conftest import BASE_CONFIG
from tests.support.families import scrape_problems
from tests.support.process import running
from tests.support.raw import bounded_by
from tests.support.upstream import start_upstream

# A short upstream timeout, so /slow gives a 504 (decision upstream_error) quickly.
CONFIG = BASE_CONFIG.replace("timeout: 2s", "timeout: 250ms")
assert CONFIG != BASE_CONFIG
# A route of two providers, for jwt_sidecar_provider_requests_total (ahead of the catch-all `api`).
CONFIG = CONFIG.replace(
    "routes:\n",
    '  other:\n    issuer: https://other.test\n    audiences: [x]\n    jwks: {url: "{jwks}"}\nroutes:\n',
).replace(
    "  - name: api\n",
    "  - name: several\n    match: {path_prefix: /several/}\n    auth: {providers: [main, other]}\n  - name: api\n",
)
assert "providers: [main, other]" in CONFIG and "  other:" in CONFIG

Key = tuple[str, tuple[tuple[str, str], ...]]


async def run(tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, workers: int) -> str:
    """Start `run`, send one request of each outcome, and return a scrape that has them all."""
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
    text += "drain_timeout: 5s\n"
    # A revocation list (empty), so its families have samples too.
    text += f"revocation: {{file: {tmp_path / f'revoked-{workers}.yaml'}}}\n"
    if workers:
        text += f"workers: {workers}\n"
    token = {"Authorization": f"Bearer {mint(key=rsa_key)}"}
    async with running(tmp_path, text, name=f"config-{workers}.yaml", stdout=False) as run:
        async with aiohttp.ClientSession() as session:
            for target, headers, status in (
                ("/orders", token, 200),  # allowed (a cache miss, then ...)
                ("/orders", token, 200),  # ... a hit, where the same worker takes it)
                ("/orders", {}, 401),  # denied
                ("/public/%2Fx", {}, 400),  # rejected, route "(none)"
                ("/slow?seconds=1", token, 504),  # upstream_error
                ("/several/x", token, 200),  # allowed by the provider the iss chose
            ):
                # A new connection each time, so `workers: 2` spreads them.
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(f"{run.url}{target}", headers=headers) as response:
                        assert response.status == status, target
            # Workers copy their numbers into the shared files every second: wait for all six.
            for _ in range(100):
                async with session.get(f"{run.admin_url}/metrics") as response:
                    assert response.status == 200
                    scrape = await response.text()
                if counts(scrape).get(("requests", ())) == 6:
                    break
                await asyncio.sleep(0.1)
        await run.stop()
    return scrape


def counts(text: str) -> dict[Key, float | None]:
    """What a scrape says that does not depend on which worker took which connection: every
    request count, every histogram's observation count and its bucket bounds, the reload
    counts, the in-flight gauge, and the token cache's lookups (hits and misses together).
    None for series whose value is not compared (their labels are)."""
    found: dict[Key, float | None] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key: Key = (sample.name, tuple(sorted(sample.labels.items())))
            if family.name in ("jwt_sidecar_requests", "jwt_sidecar_config_reloads", "jwt_sidecar_in_flight_requests"):
                found[key] = sample.value
            elif family.type == "histogram":
                found[key] = sample.value if sample.name.endswith("_count") else None
            if family.name == "jwt_sidecar_requests":
                found[("requests", ())] = (found.get(("requests", ())) or 0) + sample.value
            if family.name == "jwt_sidecar_token_cache_requests":
                found[("cache lookups", ())] = (found.get(("cache lookups", ())) or 0) + sample.value
    return found


@pytest.fixture
async def one_process(tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey) -> AsyncIterator[str]:
    yield await run(tmp_path, aiohttp_server, jwks_server, rsa_key, workers=0)


@bounded_by(60)
async def test_one_process_exports_exactly_the_declared_families(one_process: str) -> None:
    assert scrape_problems(one_process, workers=False) == []


@bounded_by(90)
async def test_two_workers_export_the_declared_families_with_the_same_counts(
    one_process: str, tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    supervisor = await run(tmp_path, aiohttp_server, jwks_server, rsa_key, workers=2)
    assert scrape_problems(supervisor, workers=True) == []
    single, shared = counts(one_process), counts(supervisor)
    assert single[("requests", ())] == 6
    assert single[("cache lookups", ())] == 4  # the three allowed requests and the slow one
    assert shared == single


def test_the_scrape_check_catches_what_a_scrape_must_not_hold() -> None:
    declared_ok = (
        "# HELP jwt_sidecar_in_flight_requests Requests being handled right now.\n"
        "# TYPE jwt_sidecar_in_flight_requests gauge\n"
        "jwt_sidecar_in_flight_requests 0.0\n"
    )
    problems = scrape_problems(declared_ok, workers=False)
    assert "declared, not exported: jwt_sidecar_requests_total" in problems
    assert not [p for p in problems if "in_flight" in p]
    for text, complaint in (
        (declared_ok.replace("in_flight_requests 0.0", 'in_flight_requests{route="x"} 0.0'), "labels ['route']"),
        (declared_ok.replace("right now.", "right now"), "help 'Requests being handled right now'"),
        (
            declared_ok.replace("gauge", "counter").replace("requests 0.0", "requests_total 0.0"),
            "exported as a counter",
        ),
        (
            "# TYPE jwt_sidecar_auth_duration_seconds_mirrored_sum counter\n"
            "jwt_sidecar_auth_duration_seconds_mirrored_sum_total 1.0\n",
            "exported, not declared",
        ),
        ("# TYPE jwt_sidecar_workers_ready gauge\njwt_sidecar_workers_ready 2.0\n", "exported, not declared"),
    ):
        assert any(complaint in p for p in scrape_problems(text, workers=False)), (complaint, text)
