"""`workers: N`: processes sharing the port, metrics aggregated on worker 0's admin port.

The set is worker 0 (the process `run` started, which is also the set's supervisor) and its
forked children, workers 1..N-1 (ops/workers.py): with `workers: 2`, one child."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.workers import SET_ENV
from tests.conftest import TestKey, jwks_of, mint
from tests.integration.conftest import BASE_CONFIG
from tests.support.process import ENV, REPO, Run, children, running
from tests.support.upstream import start_upstream


async def start(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> AbstractAsyncContextManager[Run]:
    """`run` with `workers: 2` in front of a real upstream, ready (the context stops it)."""
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
    return running(tmp_path, text + "workers: 2\ndrain_timeout: 5s\n", stdout=False)


async def test_two_workers_serve_one_port_and_report_one_set_of_metrics(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    async with await start(tmp_path, aiohttp_server, jwks_server, rsa_key) as run:
        base, admin = run.url, run.admin_url
        async with aiohttp.ClientSession() as session:
            workers = children(run.pid)
            assert len(workers) == 1  # worker 1; worker 0 is run.pid itself
            token = mint(key=rsa_key)
            # New connections each time, so the kernel spreads them over both workers.
            for _ in range(40):
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(base + "/orders", headers={"Authorization": f"Bearer {token}"}) as r:
                        assert r.status == 200
            await asyncio.sleep(1.5)  # workers publish their scrape-time metrics every second
            async with session.get(admin + "/metrics") as response:
                text = await response.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
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
        assert await run.stop() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


async def test_a_set_of_three_is_worker_0_and_two_forked_workers(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
    async with running(tmp_path, text + "workers: 3\ndrain_timeout: 5s\n", stdout=False) as run:
        workers = children(run.pid)
        assert len(workers) == 2
        async with aiohttp.ClientSession() as session:
            async with session.get(run.admin_url + "/metrics") as response:
                text = await response.text()
        ready = [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "jwt_sidecar_workers_ready"
        ]
        assert ready == [3]
        assert await run.stop() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


async def test_when_worker_0_dies_the_others_drain_and_exit_rather_than_serve_orphaned(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    async with await start(tmp_path, aiohttp_server, jwks_server, rsa_key) as run:
        # Worker 1 first dies and is started again (a fresh process: it is handed the pipe).
        [forked] = children(run.pid)
        os.kill(forked, signal.SIGKILL)
        await run.wait_for("worker 1 started again")
        await run.ready()
        workers = children(run.pid)
        assert len(workers) == 1 and workers[0] != forked
        # SIGKILL: worker 0 can tell no one. Its end of the pipe closes with it; worker 1 sees
        # the end of file and stops as SIGTERM would stop it (its exit ends the shared output).
        assert await run.stop(signal.SIGKILL, timeout=30) == -signal.SIGKILL
        for _ in range(100):  # its output has ended: it is in its last steps of exiting
            try:
                if "zombie" in Path(f"/proc/{workers[0]}/status").read_text():
                    break
            except OSError:
                break  # gone, reaped by init
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("worker 1 still runs with worker 0 gone")
        stderr = run.err.decode()
        assert "worker 0 has gone: stopping this worker too" in stderr, stderr[-3000:]
        assert re.search(r"draining: accepting for 0s more", stderr), stderr[-3000:]


async def test_ctrl_c_to_the_process_group_drains_every_worker_once(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    async with await start(tmp_path, aiohttp_server, jwks_server, rsa_key) as run:
        # A terminal's Ctrl-C: SIGINT to every process of the group; worker 0 passes a SIGTERM
        # on as well. Worker 1 takes the second signal as the same stop: it drains and says so.
        os.killpg(run.pid, signal.SIGINT)
        assert await run.exited(30) == 0
    stderr = run.err.decode()
    assert len(re.findall(r"(?m)^.*\bstopped$", stderr)) == 2, stderr[-3000:]


def test_worker_0_whose_config_broke_during_the_re_exec_leaves_no_metrics_directory(tmp_path: Path) -> None:
    # `run` checked the config and re-executed itself as worker 0 (workers.py `become_first`);
    # the file broke in between: one line, exit 1, and the set's directory is gone.
    directory = tmp_path / "metrics"
    directory.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text("workers: 2\nlisten: [not, an, address]\n")
    env = {**ENV, SET_ENV: str(directory), "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert not directory.exists()


async def readyz(session: aiohttp.ClientSession, admin: str) -> tuple[int, str]:
    async with session.get(admin + "/readyz") as response:
        return response.status, (await response.json())["reason"]


async def test_a_killed_worker_is_started_again_while_the_other_keeps_serving(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    token = {"Authorization": f"Bearer {mint(key=rsa_key)}"}
    async with await start(tmp_path, aiohttp_server, jwks_server, rsa_key) as run:
        base, admin = run.url, run.admin_url
        async with aiohttp.ClientSession() as session:
            before = children(run.pid)
            assert len(before) == 1
            os.kill(before[0], signal.SIGKILL)
            # Worker 0 (the set's supervisor) notices, and says so until the new worker is ready.
            for _ in range(100):
                status, reason = await readyz(session, admin)
                if status == 503:
                    break
                await asyncio.sleep(0.05)
            assert status == 503 and ("restarting worker 1" in reason or "1 of 2 workers ready" in reason), reason
            # Meanwhile every request is answered, by the worker that is left (new connections
            # each time: the kernel would otherwise keep one on the same worker).
            answered_while_restarting = 0
            for _ in range(200):
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(base + "/orders", headers=token) as response:
                        assert response.status == 200
                answered_while_restarting += 1
                if (await readyz(session, admin))[0] == 200:
                    break
            assert answered_while_restarting >= 3
            await run.ready()
            after = children(run.pid)
            assert len(after) == 1 and before[0] not in after  # worker 0, run.pid, served throughout
            for _ in range(10):
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(base + "/orders", headers=token) as response:
                        assert response.status == 200
        assert await run.stop() == 0, "a restarted set stops cleanly"


async def test_a_worker_that_dies_on_every_start_stops_the_set_with_status_1(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    async with await start(tmp_path, aiohttp_server, jwks_server, rsa_key) as run:
        # The config file is broken (the running workers refuse to reload it and keep
        # serving); then a worker dies: every new one fails to load the file and exits.
        path = run.config
        path.write_text(path.read_text().replace("providers:", "providers:\n  broken: {issuer: i}\n", 1))
        workers = children(run.pid)
        os.kill(workers[0], signal.SIGKILL)
        # Worker 0, still serving, stopped too: it is the process `run` started.
        assert await run.exited(60) == 1
        stderr = run.err.decode()
        # Four restarts; repeat lines are limited to one a second, the rest counted on the next.
        restarts = [line for line in stderr.splitlines() if "starting it again in" in line]
        suppressed = sum(
            int(m.group(1)) for line in restarts if (m := re.search(r"\((\d+) similar suppressed\)$", line))
        )
        assert len(restarts) + suppressed == 4, stderr[-3000:]
        assert "5 worker deaths within 60s; stopping the set" in stderr, stderr[-3000:]


async def test_a_stop_while_a_worker_waits_to_be_restarted_is_a_clean_stop(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    async with await start(tmp_path, aiohttp_server, jwks_server, rsa_key) as run:
        path = run.config
        path.write_text(path.read_text().replace("providers:", "providers:\n  broken: {issuer: i}\n", 1))
        workers = children(run.pid)
        os.kill(workers[0], signal.SIGKILL)  # its restarts fail: the set is between two of them
        await asyncio.sleep(1.0)
        assert await run.stop() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        stderr = run.err.decode()
        assert "starting it again in" in stderr and "Traceback" not in stderr and "never awaited" not in stderr
