"""`workers: N`: N proxy processes sharing the listening port, one supervisor answering for them.

Owns: starting the workers (each `jwt-sidecar run` with `JWT_SIDECAR_WORKER` set, binding the
proxy port with SO_REUSEPORT so the kernel spreads connections), the admin listener on the
supervisor (`/metrics` aggregated with prometheus-client's multiprocess mode, `/readyz` true
only while every worker is alive and ready), passing SIGHUP on and SIGTERM/SIGINT down
(each worker drains itself), and the multiprocess directory's life. A worker that dies
unexpectedly stops the whole set with exit status 1, so the platform restarts the container.
Does not own: serving requests (server.py runs each worker) or any metric's meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile

from aiohttp import web
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder

from .admin import create_admin_app
from .config import Settings

__all__ = ["WORKER_ENV", "WORKERS_READY", "supervise"]

WORKER_ENV = "JWT_SIDECAR_WORKER"
WORKERS_READY = "jwt_sidecar_workers_ready"
log = logging.getLogger("jwt_sidecar.workers")


async def supervise(settings: Settings, *, config_path: str) -> int:
    count = settings.workers
    directory = tempfile.mkdtemp(prefix="jwt-sidecar-metrics-")  # /tmp: writable even with a read-only root
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "run", "--config", config_path,
                                             env={**env, WORKER_ENV: str(index)})
        for index in range(count)
    ]
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    draining = False

    def readiness() -> tuple[bool, str]:
        if draining:
            return False, "draining: shutting down"
        if any(p.returncode is not None for p in procs):
            return False, "a worker has exited"
        ready = _gauge(registry, WORKERS_READY)
        if ready < count:
            return False, f"{int(ready)} of {count} workers ready"
        return True, "ready"

    def render(accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    admin = web.AppRunner(create_admin_app(readiness=readiness, render=render), handle_signals=False, access_log=None)
    await admin.setup()
    await web.TCPSite(admin, settings.admin.host, settings.admin.port).start()
    log.info("%d workers on %s; admin on %s", count, settings.listen, settings.admin)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _signal_all(procs, signal.SIGHUP))
    exits = [asyncio.ensure_future(p.wait()) for p in procs]
    stopping = asyncio.ensure_future(stop.wait())
    status = 0
    try:
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopping not in done:
            log.error("a worker exited unexpectedly; stopping the others")
            status = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        draining = True
        # Each worker drains its own in-flight requests on SIGTERM; give them that long.
        _signal_all(procs, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*exits, return_exceptions=True),
                                   settings.drain_delay + settings.drain_timeout + 5)
        _signal_all(procs, signal.SIGKILL)
        await asyncio.gather(*exits, return_exceptions=True)
        stopping.cancel()
        for proc in procs:
            multiprocess.mark_process_dead(proc.pid, directory)
        await admin.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    if any(p.returncode not in (0, -signal.SIGTERM) for p in procs) and status == 0:
        status = 1
    return status


def _signal_all(procs: list[asyncio.subprocess.Process], sig: int) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def _gauge(registry: CollectorRegistry, name: str) -> float:
    for family in registry.collect():
        if family.name == name:
            return sum(sample.value for sample in family.samples if sample.name == name)
    return 0.0
