"""`workers: N`: N proxy processes sharing the listening port, one supervisor answering for them.

Owns: starting the workers (each `jwt-sidecar run` with `JWT_SIDECAR_WORKER` set, binding the
proxy port with SO_REUSEPORT so the kernel spreads connections), the admin listener on the
supervisor (`/metrics` aggregated from prometheus-client's multiprocess files by
telemetry's `WorkersCollector`, plus the
process_* metrics of the supervisor and of each live worker, labelled `worker`; `/readyz` true
only while every worker is alive and ready, its open-file limit raised as in server.py),
passing SIGHUP on and SIGTERM/SIGINT down
(each worker drains itself), and the multiprocess directory's life. A worker that dies
unexpectedly is started again after a back-off (`_FIRST_DELAY`, doubling up to `_MAX_DELAY`)
while the others keep serving; when workers keep dying (`_GIVE_UP` deaths within
`_WINDOW` seconds) the whole set stops with exit status 1, so the platform restarts the
container. Before any worker starts, what they need from the machine is checked once (the
proxy port free to share, the admin port, a temporary directory; startup.py): a missing one
is one line and exit status 1, not workers started again and again. The supervisor is a
process of its own making: `run` checks the config, then replaces itself (`become_supervisor`,
same pid and descriptors) with a fresh interpreter that is handed the few settings a
supervisor needs and imports none of the config builder, the key code or the request path
(`main`; it runs on asyncio's own loop; its resident memory is in bench/FIGURES.md).
Does not own: serving requests (server.py runs each worker) or any metric's meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder

from ..base import oplog
from ..base.oplog import event
from ..config.settings import Listen, Settings
from ..http.causes import cause
from ..telemetry.families import WORKERS_READY as _READY_FAMILY
from ..telemetry.metrics import ProcessesCollector, WorkersCollector
from .admin import admin_server
from .limits import hold_standard_descriptors, quiet_accept_errors, raise_fd_limit
from .startup import StartupError, bind_for, check_stdout, metrics_directory, why

__all__ = ["SUPERVISOR_ENV", "WORKERS_READY", "WORKER_ENV", "become_supervisor", "main", "supervise"]

WORKER_ENV = "JWT_SIDECAR_WORKER"
SUPERVISOR_ENV = "JWT_SIDECAR_SUPERVISOR"
"""Set by `become_supervisor` to the settings the supervisor needs (JSON): `python -m proxy`
then runs `main` instead of the command line, and `main` takes it out of the environment
before any worker is started."""
WORKERS_READY = _READY_FAMILY.name
log = logging.getLogger("jwt_sidecar.workers")
T = TypeVar("T")

_FIRST_DELAY = 0.25
"""Seconds before a dead worker is started again; doubled for each further death in `_WINDOW`."""
_MAX_DELAY = 10.0
_GIVE_UP = 5
"""Worker deaths within `_WINDOW` seconds (all workers together) that stop the whole set:
one that dies on every start (a config that no longer loads, a crash at start-up) gets
there in about ten seconds, while an occasional death is only ever restarted."""
_WINDOW = 60.0


def become_supervisor(settings: Settings, *, config_path: str) -> NoReturn:
    """Become the supervisor of `settings.workers` workers: this process (its config checked,
    its warnings logged) is replaced by a fresh interpreter running `main`, with the same pid,
    descriptors and command line, so that the supervisor holds none of what loading the config
    imported (the builder, cryptography, the request path: ~15 MiB it would never use)."""
    needed = {
        "config_path": config_path,
        "source": settings.source,
        "listen": [settings.listen.host, settings.listen.port],
        "admin": [settings.admin.host, settings.admin.port],
        "access_log": settings.access_log,
        "workers": settings.workers,
        "drain_delay": settings.drain_delay,
        "drain_timeout": settings.drain_timeout,
        "log_format": settings.log_format,
        "log_level": settings.log_level,
    }
    argv = [sys.executable, "-m", "proxy", "run", "--config", config_path]
    argv += ["--log-format", settings.log_format, "--log-level", settings.log_level]
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # what is buffered would be lost with this image
    os.execve(sys.executable, argv, {**os.environ, SUPERVISOR_ENV: json.dumps(needed)})


def main() -> int:
    """The supervisor's process, made by `become_supervisor`: its exit status.

    A start that fails here for a reason that is the operator's to fix (a port in use, no
    temporary directory) is one line, as `run` words it (cli.py): text on stderr, or a
    `startup_failed` JSON line."""
    needed = json.loads(os.environ.pop(SUPERVISOR_ENV))
    settings = Settings(
        source=needed["source"],
        providers={},
        listen=Listen(host=needed["listen"][0], port=needed["listen"][1]),
        admin=Listen(host=needed["admin"][0], port=needed["admin"][1]),
        access_log=needed["access_log"],
        workers=needed["workers"],
        drain_delay=needed["drain_delay"],
        drain_timeout=needed["drain_timeout"],
        log_format=needed["log_format"],
        log_level=needed["log_level"],
    )
    oplog.configure(settings.log_level, settings.log_format, sys.stderr)
    prometheus_client.disable_created_metrics()  # as `run` does (cli.py)
    # /dev/null on a closed 0-2, so that neither a socket of ours nor a worker's stdin/stdout
    # (inherited as descriptors 0-2) is one of them.
    hold_standard_descriptors()
    try:
        # asyncio's own loop, not uvloop: the supervisor serves a few admin requests, and
        # uvloop's library is 2.4 MiB of its resident memory (bench/FIGURES.md).
        return asyncio.run(supervise(settings, config_path=needed["config_path"]))
    except StartupError as error:
        if oplog.writes_json():
            event(logging.getLogger("jwt_sidecar"), logging.ERROR, "startup_failed", "%(error)s", error=str(error))
        else:
            print(f"jwt-sidecar: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place: a stop, not a crash
        return 130


async def supervise(settings: Settings, *, config_path: str) -> int:
    count = settings.workers
    # The proxy port is tried and let go: without SO_REUSEPORT, so that a port another set of
    # workers holds (with it) counts as in use too, rather than its traffic being split with
    # ours. The admin port is the supervisor's to keep. The workers need a stdout of their own.
    check_stdout(settings)
    sockets = bind_for(settings)
    for sock in sockets.listen:
        sock.close()
    try:
        directory = metrics_directory()  # /tmp: writable even with a read-only root
    except StartupError:
        sockets.close()
        raise
    # The admin port is the supervisor's; the workers inherit the raised limit (and log it).
    raise_fd_limit()
    quiet_accept_errors(asyncio.get_running_loop())
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}

    async def spawn(index: int) -> asyncio.subprocess.Process:
        # A restarted worker reads the config file as it is now, like a reload would.
        # The supervisor's log format and level (its command line may have overridden the file's).
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--config",
            config_path,
            "--log-format",
            settings.log_format,
            "--log-level",
            settings.log_level,
            env={**env, WORKER_ENV: str(index)},
        )

    async def respawn(index: int, delay: float) -> asyncio.subprocess.Process:
        await asyncio.sleep(delay)
        return await spawn(index)

    procs: list[asyncio.subprocess.Process] = []
    try:
        for index in range(count):
            procs.append(await spawn(index))
    except OSError as error:  # fd or process limits: nothing can serve, so nothing may keep running
        _signal_all(procs, signal.SIGKILL)
        await asyncio.gather(*(proc.wait() for proc in procs))
        sockets.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise StartupError(f"cannot start the worker processes: {why(error)}") from None
    restarting: dict[int, int | None] = {}  # worker index -> the exit status it is restarting from
    registry = CollectorRegistry()
    registry.register(WorkersCollector(directory))

    def processes() -> list[tuple[str, int]]:
        # Live workers only: a dead one's pid may already name another process.
        return [("supervisor", os.getpid())] + [(str(i), p.pid) for i, p in enumerate(procs) if p.returncode is None]

    registry.register(ProcessesCollector(processes))
    draining = False

    def readiness() -> tuple[bool, str]:
        if draining:
            return False, "draining: shutting down"
        if restarting:
            return False, "restarting " + ", ".join(
                f"worker {i} (exited with {status})" for i, status in sorted(restarting.items())
            )
        if any(p.returncode is not None for p in procs):
            return False, "a worker has exited"
        try:
            ready = _settled(lambda: _gauge(registry, WORKERS_READY))
        except Exception:  # noqa: BLE001 - /readyz answers, whatever the files hold
            event(log, logging.WARNING, "readiness_unknown", "reading the workers' readiness failed", exc_info=True)
            return False, "the workers' readiness could not be read"
        if ready < count:
            return False, f"{int(ready)} of {count} workers ready"
        return True, "ready"

    def render(accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return _settled(lambda: encoder(registry)), content_type

    admin = admin_server(readiness=readiness, render=render)
    for sock in sockets.admin:
        await admin.listen(sock=sock, backlog=128)
    event(
        log,
        logging.INFO,
        "workers_started",
        "%(workers)d workers on %(listen)s; admin on %(admin)s",
        workers=count,
        listen=str(settings.listen),
        admin=str(settings.admin),
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _signal_all(procs, signal.SIGHUP))
    exits: dict[asyncio.Future[int], int] = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(procs)}
    restarts: dict[asyncio.Task[asyncio.subprocess.Process], int] = {}
    deaths: deque[float] = deque()
    stopping = asyncio.ensure_future(stop.wait())
    status = 0
    try:
        while True:
            waiting: list[asyncio.Future[Any]] = [stopping, *exits, *restarts]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                break
            for task in [t for t in done if t in restarts]:
                index = restarts.pop(task)
                try:
                    procs[index] = task.result()
                except OSError as error:  # no process can be started (fd or memory limits): give up
                    event(
                        log,
                        logging.ERROR,
                        "worker_died",
                        "worker %(worker)d could not be started again: %(cause)s; stopping the set",
                        worker=index,
                        cause=cause(error),
                    )
                    status = 1
                    break
                exits[asyncio.ensure_future(procs[index].wait())] = index
                restarting.pop(index, None)
                event(
                    log,
                    logging.INFO,
                    "worker_restarted",
                    "worker %(worker)d started again (pid %(pid)d)",
                    worker=index,
                    pid=procs[index].pid,
                )
            if status:
                break
            for exit_ in [f for f in done if f in exits]:
                index = exits.pop(exit_)
                dead = procs[index]
                # Its live gauges (ready, in flight) must stop counting; its counters stay summed.
                multiprocess.mark_process_dead(dead.pid, directory)
                now = loop.time()
                deaths.append(now)
                while deaths[0] < now - _WINDOW:
                    deaths.popleft()
                if len(deaths) >= _GIVE_UP:
                    event(
                        log,
                        logging.ERROR,
                        "worker_died",
                        "worker %(worker)d (pid %(pid)d) exited with %(status)s: %(deaths)d worker deaths within "
                        "%(window)gs; stopping the set",
                        worker=index,
                        pid=dead.pid,
                        status=dead.returncode,
                        deaths=len(deaths),
                        window=_WINDOW,
                    )
                    status = 1
                    break
                delay = min(_FIRST_DELAY * 2 ** (len(deaths) - 1), _MAX_DELAY)
                event(
                    log,
                    logging.ERROR,
                    "worker_died",
                    "worker %(worker)d (pid %(pid)d) exited with %(status)s; starting it again in %(delay)gs (the "
                    "others keep serving)",
                    worker=index,
                    pid=dead.pid,
                    status=dead.returncode,
                    delay=delay,
                )
                restarting[index] = dead.returncode
                restarts[asyncio.ensure_future(respawn(index, delay))] = index
            if status:
                break
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        draining = True
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        for task, index in restarts.items():  # one that had started its worker before the cancel: stop it too
            if not task.cancelled() and task.exception() is None:
                procs[index] = task.result()
                exits[asyncio.ensure_future(procs[index].wait())] = index
                restarting.pop(index, None)
        # Each worker drains its own in-flight requests on SIGTERM; give them that long.
        _signal_all(procs, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*exits, return_exceptions=True), settings.drain_delay + settings.drain_timeout + 5
            )
        _signal_all(procs, signal.SIGKILL)
        await asyncio.gather(*exits, return_exceptions=True)
        stopping.cancel()
        for proc in procs:
            multiprocess.mark_process_dead(proc.pid, directory)
        await admin.shutdown(1.0)  # its answers are written at once: idle keep-alive connections only
        shutil.rmtree(directory, ignore_errors=True)
    # A worker stopped while waiting to be restarted is not a failure of the stop.
    if (
        any(p.returncode not in (0, -signal.SIGTERM) for i, p in enumerate(procs) if i not in restarting)
        and status == 0
    ):
        status = 1
    return status


def _settled(read: Callable[[], T]) -> T:
    """`read()` of the multiprocess files, once more if it fails: a worker starting right now
    may have created its file without its first value (prometheus-client then raises)."""
    try:
        return read()
    except Exception:  # noqa: BLE001
        time.sleep(0.01)
        return read()


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
