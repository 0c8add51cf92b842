"""`workers: N`: worker 0's /metrics has CPU and memory of every process, and one admin line.

The real `run` with `workers: 2`, in a subprocess: process_* series labelled `worker`
("0", "1") whose figures are each process's own (start times matched against
/proc/PID/stat of the pid the test finds for each worker), and a stderr that names the admin
port once, from worker 0 that owns it (the set's supervisor: ops/workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TestKey
from tests.integration.test_readme_metrics import exported, readme_metrics
from tests.integration.test_workers import start
from tests.support.process import Run, children
from tests.support.raw import bounded_by

PROCESS_FAMILIES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
)


def start_time(pid: int) -> float:
    """When `pid` started, in seconds since the epoch, as /proc says (proc(5): field 22, in ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
    )
    return boot + float(fields[19]) / os.sysconf("SC_CLK_TCK")


def workers(first: int) -> dict[str, int]:
    """Worker index -> pid, for a set of two: worker 0 is `first` (the process `run` started),
    worker 1 its live child (forked, or started again: then its environment names it; a killed
    one not yet reaped has no environ)."""
    found = {"0": first}
    for pid in children(first):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        named = [item.partition(b"=")[2].decode() for item in environ if item.startswith(b"JWT_SIDECAR_WORKER=")]
        found[named[0] if named else "1"] = pid  # a forked worker has worker 0's environ: the set's other one
    return found


async def process_samples(session: aiohttp.ClientSession, admin: str) -> dict[tuple[str, str], float]:
    """(sample name, worker label) -> value, for every process_* sample of one scrape; every
    metric of the scrape is in the README's Metrics table."""
    async with session.get(admin + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert exported(text) - readme_metrics() == set(), "exported, not in the README's Metrics table"
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("process_"):
                assert set(sample.labels) == {"worker"}, sample  # never an unlabelled sum of nothing
                found[(sample.name, sample.labels["worker"])] = sample.value
    return found


class Supervised:
    """`run` with `workers: 2` in a subprocess (tests/support/process.py reads its stderr all
    along; the workers write to the same pipe: EOF once every process has exited)."""

    def __init__(self, run: Run) -> None:
        self.run, self.proc, self.base, self.admin = run, run.proc, run.url, run.admin_url

    def workers(self) -> dict[str, int]:
        return workers(self.proc.pid)

    async def stop(self) -> str:
        """SIGTERM, and the whole stderr once everything has exited (with status 0)."""
        assert await self.run.stop() == 0
        return self.run.err.decode()


@contextlib.asynccontextmanager
async def supervised(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> AsyncIterator[tuple[Supervised, aiohttp.ClientSession]]:
    async with await start(tmp_path, aiohttp_server, jwks_server, rsa_key) as run:
        async with aiohttp.ClientSession() as session:
            yield Supervised(run), session


@bounded_by(90)
async def test_every_process_exports_its_own_cpu_and_memory(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    began = time.time()
    async with supervised(tmp_path, aiohttp_server, jwks_server, rsa_key) as (run, session):
        pids = run.workers()
        assert set(pids) == {"0", "1"} and pids["0"] == run.proc.pid
        samples = await process_samples(session, run.admin)
        assert set(samples) == {(name, label) for name in PROCESS_FAMILIES for label in pids}
        now = time.time()
        for label, pid in pids.items():

            def value(name: str) -> float:
                return samples[(name, label)]  # noqa: B023 - used at once, in this iteration

            # Each series is its own process's, not one process's figures three times.
            assert abs(value("process_start_time_seconds") - start_time(pid)) < 0.02, label
            assert began - 2 <= value("process_start_time_seconds") <= now, label
            assert 5 * 2**20 < value("process_resident_memory_bytes") < 2**30, label
            assert value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"), label
            # A forked worker's CPU time starts at 0 at the fork, and in clock ticks (10 ms) it
            # may not have used one yet; worker 0 has loaded the config and the keys.
            cpu = value("process_cpu_seconds_total")
            assert (cpu > 0 if label == "0" else cpu >= 0) and cpu <= (now - began + 1) * (os.cpu_count() or 1), label
            assert 3 <= value("process_open_fds") <= value("process_max_fds"), label

        # A worker started again is read under its new pid, keeping its label.
        os.kill(pids["1"], signal.SIGKILL)
        for _ in range(200):  # bounded: the restart back-off is 0.25 s, the start about a second
            current = run.workers()
            if current.get("1") not in (None, pids["1"]):
                async with session.get(run.admin + "/readyz") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
        assert current["1"] != pids["1"]
        samples = await process_samples(session, run.admin)
        assert abs(samples[("process_start_time_seconds", "1")] - start_time(current["1"])) < 0.02
        assert {label for _, label in samples} == {"0", "1"}
        await run.stop()


@bounded_by(60)
async def test_the_admin_port_is_logged_once_by_worker_0_that_owns_it(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    async with supervised(tmp_path, aiohttp_server, jwks_server, rsa_key) as (run, _):
        stderr = await run.stop()
    address = run.admin.removeprefix("http://")
    admin_lines = [line for line in stderr.splitlines() if "admin on" in line or address in line]
    assert len(admin_lines) == 1, stderr
    assert f"2 workers on {run.base.removeprefix('http://')}; admin on {address}" in admin_lines[0]
    # Each worker still says what it serves, once, under its own name.
    serving = re.findall(r"worker (\d+) \(pid \d+\) proxying 127\.0\.0\.1:\d+ -> http://", stderr)
    assert sorted(serving) == ["0", "1"], stderr
