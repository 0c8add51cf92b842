"""Metrics, readiness, reload and the SIGTERM drain, on the real proxy."""

from __future__ import annotations

import asyncio
import json
import secrets
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.ops.reload import reload
from proxy.telemetry.accesslog import AccessLog
from tests.conftest import AUDIENCE, ISSUER, FakeClock, TestKey, jwks_of, mint, refused_port
from tests.integration.conftest import BASE_CONFIG
from tests.support.jwks_server import JwksServer, start_jwks_server
from tests.support.process import running


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def scrape(s: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with s.client.get(s.admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_requests_are_counted_by_route_decision_and_reason(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    for headers in ({}, bearer(mint(key=rsa_key)), bearer(mint(key=rsa_key)), bearer(mint({"aud": "x"}, key=rsa_key))):
        async with await s.get("/orders", headers=headers):
            pass
    async with await s.get("/public/%2Fx"):
        pass
    samples = await scrape(s)

    def requests(**labels: str) -> float:
        key = ("jwt_sidecar_requests_total", tuple(sorted(labels.items())))
        return samples.get(key, 0.0)

    assert requests(route="api", method="GET", decision="allowed", reason="", status="2xx") == 2
    assert requests(route="api", method="GET", decision="denied", reason="token_missing", status="4xx") == 1
    assert requests(route="api", method="GET", decision="denied", reason="audience", status="4xx") == 1
    assert requests(route="(none)", method="GET", decision="rejected", reason="bad_path", status="4xx") == 1
    assert samples[("jwt_sidecar_jwks_keys", (("provider", "main"),))] == 1
    assert samples[("jwt_sidecar_provider_ready", (("provider", "main"),))] == 1
    assert samples[("jwt_sidecar_token_cache_requests_total", (("result", "miss"),))] >= 2
    assert samples[("jwt_sidecar_auth_duration_seconds_count", (("route", "api"),))] == 4
    assert samples[("jwt_sidecar_upstream_duration_seconds_count", (("route", "api"),))] == 2
    assert samples[("jwt_sidecar_in_flight_requests", ())] == 0


async def test_requests_the_parser_refuses_are_counted_and_logged(sidecar: Any, capsys: Any) -> None:
    # They never reach a route, but a flood of them must show on dashboards and in the log.
    s = await sidecar()
    s.runtime.access_log = AccessLog(sys.stdout.buffer, interval=0.01)
    for request in (
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",  # 431
        b"GET /x HTTP/1.1\r\n\r\n",  # no Host: 400
        b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n",
    ):  # 505
        reader, writer = await asyncio.open_connection(URL(s.url).host, URL(s.url).port)
        writer.write(request)
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    samples = await scrape(s)
    counted = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "jwt_sidecar_requests_total" and dict(labels)["reason"] == "malformed_request"
    }
    assert counted == {
        (
            ("decision", "rejected"),
            ("method", "other"),
            ("reason", "malformed_request"),
            ("route", "(none)"),
            ("status", "4xx"),
        ): 2.0,
        (
            ("decision", "rejected"),
            ("method", "other"),
            ("reason", "malformed_request"),
            ("route", "(none)"),
            ("status", "5xx"),
        ): 1.0,
    }
    await asyncio.sleep(0.05)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted(line["status"] for line in lines) == [400, 431, 505]
    assert all(line["reason"] == "malformed_request" and line["route"] == "(none)" for line in lines)


async def test_a_501_for_a_transfer_coding_is_the_clients_malformed_request_in_the_5xx_class(sidecar: Any) -> None:
    # README, Metrics: `status` is the class of the status sent; the 501 is the client's doing,
    # so it is told apart from our and the upstream's failures by decision and reason.
    s = await sidecar()
    for coding in (b"gzip, chunked", b"deflate, chunked"):  # a coding before chunked (gzip alone: 400)
        reader, writer = await asyncio.open_connection(URL(s.url).host, URL(s.url).port)
        writer.write(b"POST /public/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 501 "), answer
    samples = await scrape(s)
    counted = {
        labels: value for (name, labels), value in samples.items() if name == "jwt_sidecar_requests_total" and value
    }
    assert counted == {
        (
            ("decision", "rejected"),
            ("method", "other"),
            ("reason", "malformed_request"),
            ("route", "(none)"),
            ("status", "5xx"),
        ): 2.0,
    }
    assert s.upstream.seen == []


async def test_health_and_readiness(sidecar: Any) -> None:
    s = await sidecar()
    async with s.client.get(s.admin_url + "/healthz") as response:
        assert response.status == 200
    async with s.client.get(s.admin_url + "/readyz") as response:
        assert response.status == 200 and (await response.json())["ready"] is True
    # The admin endpoints are not on the proxied port: there they are just paths, routed and checked.
    async with await s.get("/metrics") as response:
        assert response.status == 401


async def test_not_ready_until_keys_arrive_then_ready_without_traffic(
    sidecar: Any, jwks_server: Any, rsa_key: TestKey, clock: FakeClock
) -> None:
    jwks_server.mode = "fail"  # the issuer is down when the sidecar starts
    s = await sidecar(clock=clock)
    async with s.client.get(s.admin_url + "/readyz") as response:
        body = await response.json()
    assert response.status == 503 and "main" in body["reason"], body
    async with await s.get("/orders", headers=bearer(mint(key=rsa_key))) as response:
        assert response.status == 503 and response.headers["Retry-After"]
    s.jwks.mode = "ok"
    # Without keys the refresh retries every min_refresh_interval (1 s here), on the injected
    # clock: no request triggers it, the clock moving on does.
    assert await clock.sleeping() == 1.0
    async with s.client.get(s.admin_url + "/readyz") as response:
        assert response.status == 503
    clock.advance(1.0)
    for _ in range(300):
        async with s.client.get(s.admin_url + "/readyz") as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.02)
    assert response.status == 200
    async with await s.get("/orders", headers=bearer(mint(key=rsa_key))) as response:
        assert response.status == 200


async def test_reload_applies_a_valid_config_and_keeps_the_old_one_on_an_invalid(
    sidecar: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    s = await sidecar()
    path = Path(s.runtime.config_path)
    token = mint(key=rsa_key)
    async with await s.get("/public/x") as response:
        assert response.status == 200
    # Valid: /public/ now needs a token too.
    path.write_text(path.read_text().replace("    auth: none\n", "    auth: {provider: main}\n"))
    assert await reload(s.runtime) is True
    async with await s.get("/public/x") as response:
        assert response.status == 401
    async with await s.get("/public/x", headers=bearer(token)) as response:
        assert response.status == 200
    # Invalid: refused, logged, counted; the previous config keeps serving.
    path.write_text(path.read_text().replace("providers:", "providers:\n  broken: {issuer: i}\n", 1))
    assert await reload(s.runtime) is False
    async with await s.get("/public/x") as response:
        assert response.status == 401
    samples = await scrape(s)
    assert samples[("jwt_sidecar_config_reloads_total", (("result", "success"),))] == 1
    assert samples[("jwt_sidecar_config_reloads_total", (("result", "failure"),))] == 1
    # The unchanged provider kept its key source: no refetch was needed.
    assert s.jwks.requests["/jwks.json"] == 1


async def test_run_reloads_on_file_change_and_sighup_and_drains_on_sigterm(
    aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    from tests.conftest import jwks_of
    from tests.support.upstream import start_upstream

    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = (
        BASE_CONFIG.replace("{upstream}", upstream.url)
        .replace("{jwks}", jwks_server.url())
        .replace("timeout: 2s", "timeout: 10s")
        + "drain_timeout: 5s\n"
    )
    async with running(tmp_path, text) as run:
        config_file, base, admin_base = run.config, run.url, run.admin_url
        text = config_file.read_text()
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/public/x") as response:
                assert response.status == 200
            # A file change is picked up without a signal (the watcher polls).
            config_file.write_text(text.replace("    auth: none\n", "    auth: {provider: main}\n"))
            for _ in range(60):
                async with session.get(base + "/public/x") as response:
                    if response.status == 401:
                        break
                await asyncio.sleep(0.1)
            assert response.status == 401
            # SIGHUP reloads too.
            config_file.write_text(text)
            run.send_signal(signal.SIGHUP)
            for _ in range(60):
                async with session.get(base + "/public/x") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert response.status == 200
            # SIGTERM with a request in flight: it finishes, new connections are refused, exit 0.
            in_flight = asyncio.create_task(session.get(base + "/slow?seconds=1.5", headers=bearer(mint(key=rsa_key))))
            await asyncio.sleep(0.5)
            run.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as fresh:
                try:
                    async with fresh.get(admin_base + "/readyz") as response:
                        assert response.status == 503
                except aiohttp.ClientConnectionError:
                    pass  # the admin listener may already be gone: also not ready
                try:
                    async with fresh.get(base + "/public/x") as response:
                        raise AssertionError(f"accepted a new request while draining: {response.status}")
                except aiohttp.ClientConnectionError:
                    pass
            response = await asyncio.wait_for(in_flight, 10)
            assert response.status == 200
            response.release()
        assert await run.exited(10) == 0
        lines = [line for line in run.out.decode().splitlines() if line.startswith("{")]
        assert any('"route":"public"' in line and '"status":200' in line for line in lines)
        assert all("Bearer" not in line and "eyJ" not in line for line in lines), "the access log never holds a token"


# A reload during an issuer outage (issue 10, item 14): key sources are identified by their
# key settings alone, a replaced source serves until its successor has keys, and a reload
# never makes a ready sidecar unready.


async def ready(s: Any) -> tuple[int, dict[str, Any]]:
    async with s.client.get(s.admin_url + "/readyz") as response:
        return response.status, await response.json()


async def statuses(s: Any, key: TestKey, count: int = 20, path: str = "/orders") -> list[int]:
    """Answers to `count` distinct tokens (distinct, so no answer comes from the token cache:
    a `jti` of their own, so two calls within one second of `iat` do not repeat a token)."""
    found = []
    for index in range(count):
        claims = {"sub": f"user-{index}", "jti": secrets.token_hex(8)}
        async with await s.get(path, headers=bearer(mint(claims, key=key))) as response:
            found.append(response.status)
    return found


async def take_down(jwks: Any) -> None:
    """The issuer's JWKS host goes away: connections to it are refused from now on."""
    await jwks.server.close()


async def test_a_reload_that_changes_only_leeway_during_an_issuer_outage_keeps_the_keys(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await sidecar()
    source = s.runtime.snapshot.keyring["main"]
    assert await statuses(s, rsa_key, 3) == [200] * 3
    await take_down(s.jwks)
    path = Path(s.runtime.config_path)
    path.write_text(path.read_text().replace("    audiences:", "    leeway: 5s\n    audiences:"))
    assert await reload(s.runtime) is True
    assert s.runtime.snapshot.settings.providers["main"].leeway == 5
    assert await statuses(s, rsa_key) == [200] * 20
    assert await ready(s) == (200, {"ready": True, "reason": "ready"})
    assert s.runtime.snapshot.keyring["main"] is source, "same key settings: the same source, no refetch"
    assert s.jwks.requests["/jwks.json"] == 1
    # The other checks did change: a token 20 s past its exp is now outside the leeway.
    late = mint({"exp": int(time.time()) - 20}, key=rsa_key)
    async with await s.get("/orders", headers=bearer(late)) as response:
        assert response.status == 401


async def test_every_non_key_change_to_a_provider_keeps_its_key_source(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    source = s.runtime.snapshot.keyring["main"]
    await take_down(s.jwks)
    path = Path(s.runtime.config_path)
    original = path.read_text()
    changes = [
        ("    audiences:", "    leeway: 1s\n    audiences:"),
        ("    audiences: [api://orders]", "    audiences: [api://orders, api://other]"),
        ("      claims: {sub: X-User-Id,", "      claims: {sub: X-Subject,"),
        ("    audiences:", "    required_claims: [exp, iat]\n    audiences:"),
        ("    audiences:", "    max_token_age: 1h\n    audiences:"),
        ("    issuer: https://issuer.test", "    issuer: [https://issuer.test, https://other.test]"),
    ]
    for old, new in changes:
        assert old in original, old
        path.write_text(original.replace(old, new, 1))
        assert await reload(s.runtime) is True, new
        assert s.runtime.snapshot.keyring["main"] is source, new
        assert await statuses(s, rsa_key, 3) == [200] * 3, new
        assert (await ready(s))[0] == 200
    assert not source._closed


async def test_a_reload_that_changes_algorithms_reindexes_the_held_keys_without_the_issuer(
    sidecar: Any, rsa_key: TestKey, ec_key: TestKey
) -> None:
    s = await sidecar(
        BASE_CONFIG.replace("min_refresh_interval: 1s}", "min_refresh_interval: 1s}\n    algorithms: [RS256]")
    )
    s.jwks.document = jwks_of(rsa_key, ec_key)
    await s.runtime.snapshot.keyring["main"]._fetch()  # the issuer published an EC key too
    assert await statuses(s, ec_key, 1) == [401]  # ES256 is not allowed yet
    await take_down(s.jwks)
    path = Path(s.runtime.config_path)
    path.write_text(path.read_text().replace("algorithms: [RS256]", "algorithms: [RS256, ES256]"))
    assert await reload(s.runtime) is True
    assert await statuses(s, ec_key, 5) == [200] * 5
    assert await statuses(s, rsa_key, 5) == [200] * 5
    assert (await ready(s))[0] == 200
    # And narrowed again: the EC key no longer verifies anything.
    path.write_text(path.read_text().replace("algorithms: [RS256, ES256]", "algorithms: [RS256]"))
    assert await reload(s.runtime) is True
    assert await statuses(s, ec_key, 2) == [401] * 2
    assert await statuses(s, rsa_key, 2) == [200] * 2


async def test_a_reload_to_a_dead_jwks_url_serves_the_old_keys_until_the_new_host_has_keys(
    sidecar: Any, aiohttp_server: Any, rsa_key: TestKey, rsa_key_2: TestKey, clock: FakeClock
) -> None:
    s = await sidecar(clock=clock)
    first = s.runtime.snapshot.keyring["main"]
    path = Path(s.runtime.config_path)
    original = path.read_text()
    old_url = s.jwks.url()
    # Two reloads in a row to hosts that are down: the keys of the first source still serve.
    # The second host comes up later on its port: held until then (bound, not listening, so
    # refused), and with SO_REUSEADDR so that the newcomer can bind it beside this socket.
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    dead, next_dead = refused_port(), held.getsockname()[1]
    for port in (dead, next_dead):
        path.write_text(original.replace(old_url, f"http://127.0.0.1:{port}/jwks.json"))
        assert await reload(s.runtime) is True
        assert await statuses(s, rsa_key, 10) == [200] * 10
        status, body = await ready(s)
        assert status == 200 and body["ready"] is True, body
    replacement = s.runtime.snapshot.keyring["main"]
    assert replacement is not first and replacement.fallback is not None
    # The old issuer goes down too: its last good keys still serve.
    await take_down(s.jwks)
    assert await statuses(s, rsa_key, 5) == [200] * 5
    # The new host comes up, with the new issuer's key: the new source swaps in by itself.
    newcomer = JwksServer(jwks_of(rsa_key_2))
    with held:
        newcomer.server = await aiohttp_server(newcomer.app(), port=next_dead)
    # Holding no keys, the new source retries every min_refresh_interval (1 s here), on the
    # injected clock: its next retry is now, and then only the fetch over loopback is waited for.
    assert await clock.sleeping() <= 1.0
    clock.advance(1.0)
    for _ in range(500):
        if replacement.fallback is None and replacement.keyset.size:
            break
        await asyncio.sleep(0.01)
    assert replacement.fallback is None, "the new source never swapped in"
    assert await statuses(s, rsa_key_2, 5) == [200] * 5
    assert await statuses(s, rsa_key, 5) == [401] * 5, "the old keys no longer verify anything"
    await asyncio.sleep(0.05)  # the release closes the replaced sources in the background
    assert first._closed and first._refresher.done(), "the first source was closed"
    assert (await ready(s))[0] == 200


async def test_a_new_key_source_that_has_keys_replaces_the_old_one_at_once(
    sidecar: Any, aiohttp_server: Any, rsa_key: TestKey, rsa_key_2: TestKey, tmp_path: Path
) -> None:
    """The old keys serve only while the new source has none: never beside the new ones."""
    s = await sidecar()
    first = s.runtime.snapshot.keyring["main"]
    rotated = await start_jwks_server(aiohttp_server, jwks_of(rsa_key_2))
    path = Path(s.runtime.config_path)
    path.write_text(path.read_text().replace(s.jwks.url(), rotated.url()))
    assert await reload(s.runtime) is True
    assert s.runtime.snapshot.keyring["main"].fallback is None
    assert await statuses(s, rsa_key_2, 3) == [200] * 3
    assert await statuses(s, rsa_key, 3) == [401] * 3
    assert first._closed
    # A leaked HMAC secret replaced by another: tokens signed with the old one fail at once.
    # (each ends in a letter: a secret file's line ending is stripped, so one ending in CR or LF
    # read a byte short, too short for HS512, 2 runs in 256)
    old_secret, new_secret = secrets.token_bytes(63) + b"o", secrets.token_bytes(63) + b"n"
    secret_file = tmp_path / "hs.key"
    secret_file.write_bytes(old_secret)
    text = path.read_text().replace(
        f'jwks: {{url: "{rotated.url()}", min_refresh_interval: 1s}}', f'secret: {{file: "{secret_file}"}}'
    )
    path.write_text(text)
    assert await reload(s.runtime) is True
    hs = [mint({"sub": f"hs-{i}"}, secret=old_secret) for i in range(2)]
    for token in hs:
        async with await s.get("/orders", headers=bearer(token)) as response:
            assert response.status == 200
    secret_file.write_bytes(new_secret)
    path.write_text(text + "\n")  # the file that names the secret changed too: a reload
    assert await reload(s.runtime) is True
    for token in [mint({"sub": "hs-new"}, secret=old_secret), *hs]:
        async with await s.get("/orders", headers=bearer(token)) as response:
            assert response.status == 401
    async with await s.get("/orders", headers=bearer(mint(secret=new_secret))) as response:
        assert response.status == 200


async def test_a_reload_to_another_discovery_issuer_is_a_new_source(sidecar: Any, rsa_key: TestKey) -> None:
    """With discovery, the issuers vouch for the jwks_uri: changing them means a new look-up."""
    s = await sidecar()
    path = Path(s.runtime.config_path)
    discovery = s.jwks.url("/.well-known/openid-configuration")
    path.write_text(
        path.read_text().replace(
            f'jwks: {{url: "{s.jwks.url()}", min_refresh_interval: 1s}}', f'discovery: "{discovery}"'
        )
    )
    assert await reload(s.runtime) is True
    source = s.runtime.snapshot.keyring["main"]
    assert source.fallback is None and source.keyset.size == 1  # discovery worked at once
    assert await statuses(s, rsa_key, 2) == [200] * 2
    looked_up = s.jwks.requests["/.well-known/openid-configuration"]
    path.write_text(path.read_text().replace("issuer: https://issuer.test", "issuer: [https://issuer.test, x]"))
    assert await reload(s.runtime) is True
    replacement = s.runtime.snapshot.keyring["main"]
    assert replacement is not source and replacement.discovery_fetches == 1
    assert s.jwks.requests["/.well-known/openid-configuration"] == looked_up + 1
    assert await statuses(s, rsa_key, 2) == [200] * 2
    # Same issuers again, other algorithms: the discovered keys are re-indexed, no look-up.
    path.write_text(path.read_text().replace("discovery:", "algorithms: [RS256, PS256]\n    discovery:"))
    assert await reload(s.runtime) is True
    assert s.runtime.snapshot.keyring["main"].discovery_fetches == 0
    assert await statuses(s, rsa_key, 2) == [200] * 2


async def test_a_removed_providers_key_source_is_closed_and_never_fetches_again(
    sidecar: Any, jwks_server: Any, aiohttp_server: Any, rsa_key: TestKey, clock: FakeClock
) -> None:
    other = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    two = BASE_CONFIG.replace(
        "routes:",
        f"  other:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n"
        f'    jwks: {{url: "{other.url()}", cache_ttl: 1s, min_refresh_interval: 1s}}\n'
        "routes:",
    )
    s = await sidecar(two, clock=clock)
    removed = s.runtime.snapshot.keyring["other"]
    assert removed.ready
    path = Path(s.runtime.config_path)
    path.write_text(
        path.read_text().replace("  other:\n", "  gone_from_here:\n").split("  gone_from_here:")[0]
        + "routes:"
        + path.read_text().split("routes:", 1)[1]
    )
    assert await reload(s.runtime) is True
    assert "other" not in s.runtime.snapshot.keyring.sources
    assert removed._closed and removed._refresher.done()
    fetched, main_fetched = other.requests["/jwks.json"], jwks_server.requests["/jwks.json"]
    # Far past every refresh interval (the refresh sleeps on the injected clock): the kept
    # provider refreshes, which shows the clock moved the loops on; the removed one does not.
    await clock.sleeping()
    clock.advance(3600)
    deadline = time.monotonic() + 5
    while jwks_server.requests["/jwks.json"] == main_fetched and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert jwks_server.requests["/jwks.json"] == main_fetched + 1
    await asyncio.sleep(0.05)
    assert other.requests["/jwks.json"] == fetched


async def test_a_provider_a_reload_adds_without_keys_does_not_make_the_sidecar_unready(
    sidecar: Any, rsa_key: TestKey
) -> None:
    s = await sidecar()
    path = Path(s.runtime.config_path)
    text = path.read_text().replace(
        "routes:",
        f"  late:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n"
        f'    jwks: {{url: "http://127.0.0.1:{refused_port()}/jwks.json", '
        "timeout: 1s, min_refresh_interval: 1s}\nroutes:",
    )
    text = text.replace(
        "  - name: optional",
        "  - name: late\n    match: {path_prefix: /late/}\n    auth: {provider: late}\n  - name: optional",
    )
    path.write_text(text)
    assert await reload(s.runtime) is True
    status, body = await ready(s)
    assert status == 200 and "late" in body["reason"], body
    assert await statuses(s, rsa_key, 3) == [200] * 3
    assert await statuses(s, rsa_key, 1, path="/late/x") == [503]


# Drain without dropping (issue 10, item 17): a SIGTERM under steady keep-alive load loses no
# request that was sent on an established connection.


@dataclass
class LoadResults:
    answered: Counter = field(default_factory=Counter)
    """Complete answers, by status."""
    told_to_close: int = 0
    """Answers that carried `Connection: close` (the client then opens a new connection)."""
    closed_before_send: int = 0
    """Connections we found closed by the sidecar before writing a request on them: safe to retry."""
    refused: int = 0
    """Connection attempts that failed: nothing was sent."""
    between_connections: int = 0
    """Clients refused after SIGTERM whose last connection they had closed themselves (its
    `per_connection` requests done): they held no connection the drain could tell to close."""
    lost: list[str] = field(default_factory=list)
    """Requests written to a connection that ended without a complete answer."""
    errors: list[str] = field(default_factory=list)


def read_http_answer(sock: socket.socket) -> tuple[int, bool]:
    """(status, whether it said Connection: close) of one Content-Length-framed answer; EOFError when cut."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"the connection ended after {len(data)} bytes of the answer's head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [line.split(":", 1) for line in lines[1:]]
    length = int(next(v for n, v in fields if n.strip().lower() == "content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"the connection ended after {len(body)} of {length} body bytes")
        body += chunk
    close = any(n.strip().lower() == "connection" and v.strip().lower() == "close" for n, v in fields)
    return int(lines[0].split(" ")[1]), close


def keep_alive_client(
    port: int,
    request: bytes,
    results: LoadResults,
    stop: threading.Event,
    term_sent: threading.Event,
    *,
    most: int,
    until: float,
    per_connection: int,
) -> None:
    """Requests back to back on a keep-alive connection, `per_connection` of them (then the
    client closes it and opens another, so some connections are always just accepted), or
    fewer when told to close."""
    sock: socket.socket | None = None
    sent = 0
    on_this = 0
    closed_it_myself = False
    try:
        while sent < most and time.monotonic() < until and not stop.is_set():
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    on_this = 0
                except OSError:
                    results.refused += 1
                    if term_sent.is_set():
                        results.between_connections += closed_it_myself
                        return  # the listener is closed: the drain is under way
                    time.sleep(0.01)
                    continue
            # Did the sidecar close this connection before our request? Then nothing is lost
            # (RFC 9112 §9.3.1: a client may retry a request it never sent).
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                try:
                    early = sock.recv(1, socket.MSG_PEEK)
                except OSError:
                    early = b""
                if early:
                    results.errors.append(f"bytes before any request: {early!r}")
                    return
                results.closed_before_send += 1
                sock.close()
                sock = None
                continue
            sent += 1
            try:
                sock.sendall(request)
                status, close = read_http_answer(sock)
            except (OSError, EOFError) as error:
                results.lost.append(
                    f"{type(error).__name__}: {error} (after SIGTERM: {term_sent.is_set()}, "
                    f"answers before on this connection: {on_this})"
                )
                sock.close()
                sock = None
                continue
            results.answered[status] += 1
            on_this += 1
            if close or on_this >= per_connection:
                results.told_to_close += close
                closed_it_myself = not close
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()


@pytest.mark.parametrize("drain_delay", [0.0, 1.0])
async def test_sigterm_under_steady_keep_alive_load_loses_no_request(
    drain_delay: float, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    from tests.support.upstream import start_upstream

    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
    text += f"access_log: false\ndrain_timeout: 5s\ndrain_delay: {drain_delay}s\n"
    request = f"GET /status/200 HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {mint(key=rsa_key)}\r\n\r\n".encode()
    results = LoadResults()
    stop, term_sent = threading.Event(), threading.Event()
    async with running(tmp_path, text, stdout=False) as run:
        port, admin = run.listen, run.admin_url
        assert port is not None
        until = time.monotonic() + 15
        clients = [
            threading.Thread(
                target=keep_alive_client,
                args=(port, request, results, stop, term_sent),
                kwargs={"most": 3000, "until": until, "per_connection": 1 + index % 4 * 10},
                daemon=True,
            )
            for index in range(12)
        ]
        try:
            for client in clients:
                client.start()
            await asyncio.sleep(1.0)  # steady load
            before = sum(results.answered.values())
            run.send_signal(signal.SIGTERM)
            term_sent.set()
            if drain_delay:
                await asyncio.sleep(drain_delay / 3)
                async with aiohttp.ClientSession() as session:
                    async with session.get(admin + "/readyz") as response:
                        assert response.status == 503  # not ready...
                    # ...but a client the platform still sends here is served, and told to go.
                    async with session.get(f"http://127.0.0.1:{port}/public/x") as response:
                        assert response.status == 200 and response.headers["Connection"] == "close"
            assert await run.exited(15) == 0
            stop.set()
            for client in clients:
                await asyncio.to_thread(client.join, 10)
            assert not any(client.is_alive() for client in clients)
            stderr = run.err.decode()
            assert "Traceback" not in stderr
            assert results.errors == []
            assert results.lost == [], f"{len(results.lost)} requests lost: {results.lost[:3]}\n{stderr}"
            assert set(results.answered) == {200}, (results, stderr)
            assert before >= 50, f"too little load to show anything: {before} answers"
            # Every client that held a connection when the drain began was told to close it; one
            # that had just closed its own (per_connection reached) and found the listener gone
            # had nothing to be told (with drain_delay 0 the listener closes at once).
            assert results.told_to_close + results.between_connections >= 12, "every connection was told to close"
            if drain_delay:
                # Served during the delay: many connections, each told to close after one answer.
                assert sum(results.answered.values()) - before >= 12
        finally:
            stop.set()


async def test_a_sighup_while_draining_neither_kills_nor_reloads(
    aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    # Worker 0 passes every SIGHUP on, and a config reloader may send one at any time: one
    # arriving during the drain must leave the requests in flight to finish and exit 0.
    from tests.support.upstream import start_upstream

    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
    text += "access_log: false\ndrain_timeout: 5s\ndrain_delay: 1s\n"
    async with running(tmp_path, text, stdout=False) as run:
        port = run.listen
        run.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        run.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/public/x") as response:
                assert response.status == 200 and response.headers["Connection"] == "close"
        assert await run.exited(15) == 0
        stderr = run.err.decode()
        assert "Traceback" not in stderr and "reload" not in stderr.lower(), stderr


async def test_a_config_change_while_the_first_keys_load_is_reloaded_once_serving(
    jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    # The config was read before the first key fetch, which may take its timeout: a change of
    # the file meanwhile must not wait for the next change to be picked up.
    jwks_server.document = jwks_of(rsa_key)
    jwks_server.mode, jwks_server.delay = "slow", 1.5
    text = BASE_CONFIG.replace("{upstream}", "http://127.0.0.1:9").replace("{jwks}", jwks_server.url())
    text += "access_log: false\n"
    async with running(tmp_path, text, ready=None, stdout=False) as run:
        for _ in range(300):  # until the first fetch is under way (the config read)
            if jwks_server.requests:
                break
            await asyncio.sleep(0.05)
        assert jwks_server.requests, "no key fetch began"
        run.config.write_text(run.config.read_text() + "# changed while the keys load\n")
        await run.ready("/readyz")
        for _ in range(100):  # the watcher polls every 2 s
            if b"config reloaded" in run.err:
                break
            await asyncio.sleep(0.1)
        assert b"config reloaded" in run.err, run.err.decode()
