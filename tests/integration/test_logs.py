"""Operator logs under failure: `jwt-sidecar run` with its JWKS host down, flooded with requests."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import TestKey, jwks_of, mint, refused_port
from tests.integration.conftest import BASE_CONFIG
from tests.support.process import running
from tests.support.upstream import start_upstream

REQUESTS = 300
SUPPRESSED = re.compile(r" \(([\d,]+) similar suppressed\)$")


async def flood(
    tmp_path: Path, upstream_url: str, jwks_url: str, rsa_key: TestKey, log_level: str
) -> tuple[list[str], list[int], float]:
    """Run the sidecar, send REQUESTS tokens over about 2.5 s, then one more after a pause,
    stop it; its stderr lines, the statuses, and how many seconds the sidecar ran."""
    text = BASE_CONFIG.replace("{upstream}", upstream_url).replace("{jwks}", jwks_url) + "access_log: false\n"
    statuses: list[int] = []
    started = time.monotonic()
    # Up (healthz); ready or not depends on the keys.
    async with running(tmp_path, text, "--log-level", log_level, ready="/healthz", stdout=False) as run:
        token = mint(key=rsa_key)
        async with aiohttp.ClientSession() as session:
            for _batch in range(10):
                for _ in range(REQUESTS // 10):
                    async with session.get(
                        f"{run.url}/orders", headers={"Authorization": f"Bearer {token}"}
                    ) as response:
                        statuses.append(response.status)
                await asyncio.sleep(0.25)
            await asyncio.sleep(1.1)  # past the window: the next line carries the count so far
            async with session.get(f"{run.url}/orders", headers={"Authorization": f"Bearer {token}"}) as response:
                statuses.append(response.status)
        assert await run.stop() == 0
        ran = time.monotonic() - started
    return run.err.decode().splitlines(), statuses, ran


async def flood_with_the_issuer_down(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey, log_level: str
) -> tuple[list[str], list[int], float]:
    """`flood` with nothing listening at the JWKS URL."""
    upstream = await start_upstream(aiohttp_server)
    return await flood(tmp_path, upstream.url, f"http://127.0.0.1:{refused_port()}/jwks.json", rsa_key, log_level)


async def test_an_issuer_outage_writes_a_handful_of_lines_not_one_per_request(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey
) -> None:
    lines, statuses, ran = await flood_with_the_issuer_down(tmp_path, aiohttp_server, rsa_key, "INFO")
    assert statuses == [503] * (REQUESTS + 1)
    # Start, the failed fetches (at most one line a second), drain, stop: nothing per request.
    fetches = [line for line in lines if "key fetch failed" in line]
    assert fetches and all("no keys held: requests for this provider get 503" in line for line in fetches)
    assert len(fetches) <= ran + 1, "\n".join(lines)
    # Besides the fetches, only start-up and stop lines (the route-table warning, the fd limit,
    # the listeners, drain, stop): a handful, never one per request.
    others = [line for line in lines if "key fetch failed" not in line]
    assert len(others) <= 6, "\n".join(lines)
    assert not any("Traceback" in line for line in lines)


async def test_repeats_are_limited_to_one_a_second_and_counted(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey
) -> None:
    # At DEBUG every refused request is logged: the same kind of line, limited, and counted.
    lines, statuses, ran = await flood_with_the_issuer_down(tmp_path, aiohttp_server, rsa_key, "DEBUG")
    assert statuses == [503] * (REQUESTS + 1)
    refused = [line for line in lines if " refused: no_keys: " in line]
    # Over 3.6 s at least: one line per second of them at most.
    assert 2 <= len(refused) <= ran + 1, "\n".join(refused)
    counts = [int(m.group(1).replace(",", "")) if (m := SUPPRESSED.search(line)) else 0 for line in refused]
    assert counts[0] == 0 and all(counts[1:]), refused
    # Every refusal is accounted for: written, or counted on a later line of its kind.
    assert len(refused) + sum(counts) == REQUESTS + 1
    assert len(lines) <= 10 * (ran + 1), f"{len(lines)} lines in {ran:.1f} s"


async def test_an_upstream_outage_writes_a_line_a_second_with_the_count(
    tmp_path: Path, jwks_server: Any, rsa_key: TestKey
) -> None:
    # Every request is refused 502 and logged as a WARNING: limited, and every one counted.
    jwks_server.document = jwks_of(rsa_key)
    lines, statuses, ran = await flood(
        tmp_path, f"http://127.0.0.1:{refused_port()}", jwks_server.url(), rsa_key, "INFO"
    )
    assert statuses == [502] * (REQUESTS + 1)
    refused = [line for line in lines if " refused: " in line]
    assert refused and len(refused) <= ran + 1, "\n".join(lines)
    counts = [int(m.group(1).replace(",", "")) if (m := SUPPRESSED.search(line)) else 0 for line in refused]
    assert len(refused) + sum(counts) == REQUESTS + 1, "\n".join(refused)
    assert len(lines) <= 2 * (ran + 1) + 3, "\n".join(lines)
