"""`workers: N`: processes sharing the port, metrics aggregated on the supervisor's admin port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TestKey, jwks_of, mint
from tests.integration.conftest import BASE_CONFIG
from tests.integration.test_lifecycle import free_port, wait_ready
from tests.support.upstream import start_upstream

REPO = Path(__file__).parents[2]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


async def start(tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey) -> tuple[Any, str, str]:
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    listen, admin = free_port(), free_port()
    text = (BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
            + f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nworkers: 2\ndrain_timeout: 5s\n")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}"


async def test_two_workers_serve_one_port_and_report_one_set_of_metrics(
        tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey) -> None:
    proc, base, admin = await start(tmp_path, aiohttp_server, jwks_server, rsa_key)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, admin + "/readyz", proc)
            workers = children(proc.pid)
            assert len(workers) == 2
            token = mint(key=rsa_key)
            # New connections each time, so the kernel spreads them over both workers.
            for _ in range(40):
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(base + "/orders", headers={"Authorization": f"Bearer {token}"}) as r:
                        assert r.status == 200
            await asyncio.sleep(1.5)  # workers publish their scrape-time metrics every second
            async with session.get(admin + "/metrics") as response:
                text = await response.text()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        allowed = (("decision", "allowed"), ("method", "GET"), ("reason", ""), ("route", "api"), ("status", "2xx"))
        assert samples[("jwt_sidecar_requests_total", allowed)] == 40
        # Histograms too: each worker's durations reach the files through its mirror.
        for family in ("jwt_sidecar_auth_duration_seconds", "jwt_sidecar_upstream_duration_seconds"):
            assert samples[(f"{family}_count", (("route", "api"),))] == 40
            assert samples[(f"{family}_bucket", (("le", "+Inf"), ("route", "api")))] == 40
            assert samples[(f"{family}_sum", (("route", "api"),))] > 0
        assert samples[("jwt_sidecar_auth_duration_seconds_bucket", (("le", "1.0"), ("route", "api")))] == 40
        assert samples[("jwt_sidecar_workers_ready", ())] == 2
        assert samples[("jwt_sidecar_provider_ready", (("provider", "main"),))] == 1
        hits = samples[("jwt_sidecar_token_cache_requests_total", (("result", "hit"),))]
        misses = samples[("jwt_sidecar_token_cache_requests_total", (("result", "miss"),))]
        assert hits + misses == 40 and misses <= 2, "one miss per worker at most"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_worker_that_dies_stops_the_set_with_status_1(
        tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey) -> None:
    proc, _, admin = await start(tmp_path, aiohttp_server, jwks_server, rsa_key)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, admin + "/readyz", proc)
        os.kill(children(proc.pid)[0], signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 20) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
