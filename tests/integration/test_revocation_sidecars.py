"""Revocation in running sidecars: real `jwt-sidecar run` processes, a real Redis, `jwt-sidecar revoke`.

What a user relies on: a token revoked with `jwt-sidecar revoke` is refused (401
`invalid_token`, reason `revoked`) by every sidecar reading the store within a second, a token
already in a sidecar's verified-token cache included; a Redis restart costs no request and
loses no revocation written after it; a Redis down at start serves with `fail: open` and, with
`fail: closed`, answers 503 and says why on `/readyz` until Redis comes up; the file store works
end to end; and every one of `workers: 2` follows the list. Each sidecar is its own process (as
in production), each request a real HTTP request on loopback.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TestKey, jwks_of, mint
from tests.integration.conftest import BASE_CONFIG
from tests.support.process import ENV, REPO, Run, running
from tests.support.raw import bounded_by
from tests.support.redis import RedisServer
from tests.support.upstream import start_upstream


@pytest.fixture
async def sidecars(tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey) -> AsyncIterator[Any]:
    """start(revocation_yaml, name, workers=0) -> a running `jwt-sidecar run` (stopped at the end),
    once /readyz answers (200 when `wait`)."""
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    async with AsyncExitStack() as stack:

        async def start(revocation: str, name: str = "a", *, workers: int = 0, wait: bool = True) -> Run:
            text = BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
            text += "drain_timeout: 2s\naccess_log: false\n"
            text += revocation
            if workers:
                text += f"workers: {workers}\n"
            run = await stack.enter_async_context(running(tmp_path, text, name=f"config-{name}.yaml", ready=None))
            stack.push_async_callback(run.stop)
            await run.ready(status=200 if wait else None)
            return run

        yield start


async def revoke(config: Path, *args: str) -> str:
    """`jwt-sidecar revoke ARGS --config CONFIG`, as an operator runs it; its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "revoke",
        *args,
        "--config",
        str(config),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out, err)
    return out.decode()


async def get(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """One request on a connection of its own (with `workers`, the kernel picks the worker)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(url + "/orders", headers=headers) as response:
            body = await response.read()
            return response.status, json.loads(body) if body.startswith(b"{") else {}


async def until_refused(urls: list[str], token: str, *, within: float) -> float:
    """Seconds until every url refuses `token` as revoked; fails after `within` (bounded polling)."""
    began = time.monotonic()
    waiting = list(urls)
    while waiting:
        for url in list(waiting):
            status, body = await get(url, token)
            if status == 401:
                assert body == {"error": "invalid_token", "error_description": "The access token has been revoked"}
                waiting.remove(url)
            else:
                assert status == 200, (status, body)
        elapsed = time.monotonic() - began
        assert elapsed < within, f"still admitted after {elapsed:.2f}s by {waiting}"
        if waiting:
            await asyncio.sleep(0.02)
    return time.monotonic() - began


async def revoked_count(sidecar: Run) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar.admin_url + "/metrics") as response:
            text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("jwt_sidecar_requests_total{") and 'reason="revoked"' in line
    )


def redis_config(redis: RedisServer, fail: str = "open", max_staleness: str = "2s") -> str:
    return f"revocation: {{redis: {{url: {redis.url}}}, fail: {fail}, max_staleness: {max_staleness}}}\n"


@bounded_by(120)
async def test_two_sidecars_sharing_redis_refuse_a_revoked_token_within_a_second_cached_or_not(
    sidecars: Any, redis: RedisServer, rsa_key: TestKey
) -> None:
    one = await sidecars(redis_config(redis), "one")
    two = await sidecars(redis_config(redis), "two")
    cached = mint({"jti": "cached-1"}, key=rsa_key)
    fresh = mint({"jti": "fresh-1", "sub": "bob"}, key=rsa_key)
    other = mint({"jti": "other-1"}, key=rsa_key)
    for sidecar in (one, two):
        for token in (cached, cached, other):  # the second one is a verified-token cache hit
            assert (await get(sidecar.url, token))[0] == 200
    out = await revoke(one.config, "--jti", "cached-1", "--ttl", "1h")
    assert "revoked in Redis" in out
    elapsed = await until_refused([one.url, two.url], cached, within=1.0)
    assert elapsed < 1.0
    # A token never seen by either sidecar (verified now), revoked by its subject.
    await revoke(two.config, "--sub", "bob", "--ttl", "1h")
    await until_refused([one.url, two.url], fresh, within=1.0)
    # What the list does not name still passes, and the refusals are counted under `revoked`.
    for sidecar in (one, two):
        assert (await get(sidecar.url, other))[0] == 200
        assert await revoked_count(sidecar) >= 2


@bounded_by(150)
async def test_a_redis_restart_mid_traffic_fails_no_request_and_later_revocations_are_seen(
    sidecars: Any, redis: RedisServer, rsa_key: TestKey
) -> None:
    # fail: closed with a short max_staleness: a restart of a few hundred ms must not reach it.
    sidecar = await sidecars(redis_config(redis, "closed", max_staleness="10s"))
    token = mint({"jti": "keep"}, key=rsa_key)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            for _ in range(2000):  # bounded in count; the test stops it earlier
                if stop.is_set():
                    return
                async with session.get(sidecar.url + "/orders", headers=headers) as response:
                    await response.read()
                    statuses.append(response.status)
                await asyncio.sleep(0.005)

    running = asyncio.create_task(traffic())
    await asyncio.sleep(0.5)
    await asyncio.to_thread(redis.restart)  # the same server and port, its data kept (AOF)
    await asyncio.sleep(1.0)
    stop.set()
    await running
    assert len(statuses) > 20 and set(statuses) == {200}, sorted(set(statuses))
    # Revocations written after the restart reach the sidecar once it reconnected (bounded).
    await revoke(sidecar.config, "--jti", "keep", "--ttl", "1h")
    await until_refused([sidecar.url], token, within=15.0)
    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar.admin_url + "/readyz") as response:
            assert response.status == 200


@bounded_by(120)
async def test_redis_down_at_start_fail_open_serves_with_an_empty_list(
    sidecars: Any, redis: RedisServer, rsa_key: TestKey
) -> None:
    redis.stop()
    try:
        sidecar = await sidecars(redis_config(redis, "open"))
        token = mint(key=rsa_key)
        assert (await get(sidecar.url, token))[0] == 200
        async with aiohttp.ClientSession() as session:
            async with session.get(sidecar.admin_url + "/readyz") as response:
                assert response.status == 200
    finally:
        redis.start()


@bounded_by(150)
async def test_redis_down_at_start_fail_closed_is_503_and_not_ready_until_redis_comes_up(
    sidecars: Any, redis: RedisServer, rsa_key: TestKey
) -> None:
    redis.stop()
    try:
        sidecar = await sidecars(redis_config(redis, "closed"), wait=False)
        token = mint(key=rsa_key)
        status, body = await get(sidecar.url, token)
        assert (status, body) == (
            503,
            {
                "error": "temporarily_unavailable",
                "error_description": "The revocation list is unavailable; try again later",
            },
        )
        assert (await get(sidecar.url + "/public"))[0] != 503  # a public route does not check the list
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(sidecar.url + "/orders", headers=headers) as response:
                assert (response.status, response.headers.get("Retry-After")) == (503, "5")
                assert "WWW-Authenticate" not in response.headers  # our outage, not the token's fault
            async with session.get(sidecar.admin_url + "/readyz") as response:
                assert response.status == 503
                reason = (await response.json())["reason"]
        assert reason.startswith(f"the revocation list has not loaded from Redis {redis.url}: Redis unreachable: ")
        assert "connection refused" in reason
    finally:
        redis.start()
    await sidecar.ready()  # recovers on its own (reconnect back-off: a few seconds)
    assert (await get(sidecar.url, token))[0] == 200


@bounded_by(90)
async def test_the_file_store_end_to_end(sidecars: Any, tmp_path: Path, rsa_key: TestKey) -> None:
    sidecar = await sidecars("revocation: {file: revoked.yaml}\n")  # relative to the config; not there yet
    token = mint({"sub": "carol"}, key=rsa_key)
    later = mint({"sub": "carol"}, key=rsa_key, now=time.time() + 5)
    assert (await get(sidecar.url, token))[0] == 200
    assert (await get(sidecar.url, token))[0] == 200  # cached
    out = await revoke(sidecar.config, "--sub", "carol", "--before", "now", "--ttl", "1h")
    assert f"revoked in file {tmp_path / 'revoked.yaml'}" in out
    await until_refused([sidecar.url], token, within=1.5)  # the file is checked twice a second
    # Only the tokens issued before the instant: one issued after it still passes.
    assert (await get(sidecar.url, later))[0] == 200
    # `rules: []` empties the list, and the token passes again.
    (tmp_path / "revoked.yaml").write_text("rules: []\n")
    for _ in range(60):
        if (await get(sidecar.url, token))[0] == 200:
            break
        await asyncio.sleep(0.05)
    assert (await get(sidecar.url, token))[0] == 200


@bounded_by(150)
async def test_each_of_two_workers_follows_the_list(sidecars: Any, redis: RedisServer, rsa_key: TestKey) -> None:
    sidecar = await sidecars(redis_config(redis), workers=2)
    token = mint({"jti": "w-1"}, key=rsa_key)
    # Each request on a connection of its own: the kernel spreads them over both workers, so
    # both hold the token in their cache (20 connections all to one worker: 1 in 500,000).
    for _ in range(20):
        assert (await get(sidecar.url, token))[0] == 200
    await revoke(sidecar.config, "--jti", "w-1", "--ttl", "1h")
    await until_refused([sidecar.url], token, within=1.0)
    for _ in range(20):  # and every connection after, whichever worker takes it
        assert (await get(sidecar.url, token))[0] == 401
