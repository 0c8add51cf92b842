"""The running process: listeners, signals, reload triggers and a graceful drain.

Owns: binding the proxy and admin listeners (first, through startup.py: a port that cannot
be had ends the start in one line, nothing started; a SIGTERM/SIGINT while the first keys
load ends it too, exit 0), the open-file limit raised at start and the
connection limit that follows from it (limits.py), SIGTERM/SIGINT (readiness goes false and
answers carry `Connection: close`; after `drain_delay` the listener stops accepting, and
connections get `drain_timeout` to finish what they were sent; exit 0),
SIGHUP and file changes (reload), the start-up's objects frozen out of the garbage collector
once started (`freeze_start_up`), and uvloop (a regular dependency where it runs; asyncio's
own loop where it is missing). Mirrors uvicorn's `Server.shutdown`: a short run of steps, one comment each.
With `workers: N`, each worker is served here on the sockets worker 0 bound; in worker 0 the
set's supervisor (workers.py `Set`) is told when it serves, on SIGHUP and when it drains, and
answers the admin port. Does not own: what a request does (app.py), what a reload does
(reload.py), or the set's layout and life (workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ..base import oplog, outlet
from ..config.settings import Settings
from ..http.causes import shown
from ..request.app import Proxy
from ..request.runtime import Runtime
from ..telemetry import multiproc
from ..telemetry.accesslog import AccessLog
from ..telemetry.families import WORKERS_READY as WORKERS_READY_FAMILY
from .admin import admin_server
from .limits import default_max_connections, hold_standard_descriptors, quiet_accept_errors, raise_fd_limit
from .reload import file_signature, reload, watch
from .startup import Sockets, bind_for, check_multiproc_dir, check_stdout
from .workers import WORKER_ENV, Set, become_first, in_set, parent_fd, run_set

__all__ = ["configure_logging", "freeze_start_up", "run", "run_worker", "serve"]

log = logging.getLogger("jwt_sidecar")
_ADMIN_DRAIN = 1.0
"""Seconds the admin listener's last connections get once the proxy has drained (its answers
are written at once: only a probe's or a scraper's idle keep-alive connection is waited for)."""
_LOG_DRAIN = 2.0
"""Seconds the access log's held lines get at the end of the drain (half that for the operator
log's last lines): a reader that stopped reading must not hold the exit up (base/outlet.py)."""


def _worker_index() -> int | str:
    """This worker's index among `workers: N` (a JSON number in its log lines), or "?"."""
    index = os.environ.get(WORKER_ENV, "")
    return int(index) if index.isdigit() else "?"


def configure_logging(level: str = "INFO", log_format: str = "text", *, worker: int | None = None) -> None:
    """Operator logs on stderr as text or JSON lines (oplog.py), one line per kind per second
    (logthrottle.py); the access log is accesslog.py's, on stdout. `worker`: this process's
    index among `workers: N`, a member of its JSON lines."""
    oplog.configure(level, log_format, sys.stderr, worker=worker)


async def serve(
    settings: Settings,
    *,
    config_path: str | None,
    stop: asyncio.Event | None = None,
    watch_interval: float = 2.0,
    worker: bool = False,
    sockets: Sockets | None = None,
    supervisor: Set | None = None,
    parent: int | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain and return.

    As one of `workers: N` (`worker=True`): the proxy port is shared (SO_REUSEPORT), metrics go
    to the multiprocess files, and only worker 0 (`supervisor`, the set it supervises) has an
    admin listener; the others stop as SIGTERM would stop them when the pipe `parent` (a
    descriptor) reaches its end, worker 0 being gone (workers.py).
    `sockets`: listeners the caller bound already (the demo, the set); by default they are bound here.
    Raises `StartupError` (startup.py), before anything has started, when a port cannot be had.
    """
    stop = stop or asyncio.Event()
    # Ports first: one in use (or below 1024, or on an address not ours) ends the start here,
    # before any key is fetched and before a line says we served.
    check_stdout(settings)
    if not worker:  # a worker's directory is the set's, made by `run` (workers.py)
        check_multiproc_dir()
    sockets = sockets or bind_for(settings, proxy_reuse_port=worker, admin=not worker)
    try:
        await _serve(settings, config_path, stop, watch_interval, worker, sockets, supervisor, parent)
    finally:
        sockets.close()  # the servers closed their own; this closes them if a server never started


def _ignore() -> None:
    """SIGHUP while draining: nothing to reload."""


async def _serve(
    settings: Settings,
    config_path: str | None,
    stop: asyncio.Event,
    watch_interval: float,
    worker: bool,
    sockets: Sockets,
    supervisor: Set | None,
    parent: int | None,
) -> None:
    # Then descriptors: a container starts with a soft limit of 1024 and a far higher hard one.
    nofile = raise_fd_limit()
    max_connections = settings.max_connections or default_max_connections(nofile)
    oplog.event(
        log,
        logging.INFO,
        "fd_limit",
        "open-file limit %(open_files)d; at most %(max_connections)d client connections%(derived)s",
        open_files=nofile,
        max_connections=max_connections,
        derived="" if settings.max_connections else " (derived: (limit - 128) / 2)",
    )
    if settings.max_connections and settings.max_connections > default_max_connections(nofile):
        oplog.event(
            log,
            logging.WARNING,
            "fd_limit_low",
            "max_connections %(max_connections)d leaves too few of the %(open_files)d descriptors for the "
            "admin port and the upstream connections (at most %(at_most)d would): at the limit /healthz "
            "and /readyz may go unanswered",
            max_connections=settings.max_connections,
            open_files=nofile,
            at_most=default_max_connections(nofile),
        )
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    # Serving from here on (after any fork): stdout and stderr are written by a thread each and
    # never waited for (base/outlet.py); in-process callers whose stdout is not the process's
    # own (tests) keep their stream.
    outlet.stdout().detach()
    outlet.stderr().detach()
    own = sys.stdout is sys.__stdout__
    access_log = (AccessLog(outlet.stdout() if own else sys.stdout.buffer)) if settings.access_log else None
    proxy = Proxy(settings, config_path=config_path, access_log=access_log)
    runtime = proxy.runtime
    # A SIGTERM/SIGINT while the first keys load (an issuer that does not answer holds the start
    # up to its timeout) stops the start at once: nothing was served, so nothing is drained.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A SIGHUP while starting (a config reloader, or worker 0 passing one on) must not kill the
    # process by its default action: it is kept, and the reload done once serving begins.
    hups: list[None] = []
    loop.add_signal_handler(signal.SIGHUP, hups.append, None)
    if parent is not None:  # worker 0 gone (its end of the pipe closed): stop as SIGTERM would
        loop.add_reader(parent, _orphaned, loop, parent, stop)
    # The config file as it is before the start (a change while the keys load is reloaded once serving).
    since = file_signature(config_path) if config_path is not None else None
    starting = loop.create_task(proxy.start())  # the clients, first key fetches
    stopped = loop.create_task(stop.wait())
    await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not starting.done() or starting.exception() is not None:
        starting.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await starting  # raises what failed the start, if anything did
        finally:
            await proxy.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if parent is not None:
                loop.remove_reader(parent)
        oplog.event(log, logging.INFO, "start_abandoned", "stopped while starting; nothing was served")
        return
    freeze_start_up()
    server = proxy.server(max_connections=max_connections)
    if supervisor is not None:  # worker 0: the set's admin port
        the_set = supervisor
        admin = admin_server(readiness=lambda: the_set.readiness(runtime.readiness()), render=the_set.render)
    else:
        admin = admin_server(readiness=runtime.readiness, render=runtime.metrics.render)
    watcher: asyncio.Task[None] | None = None
    publisher: asyncio.Task[None] | None = None
    try:
        for sock in sockets.listen:
            await server.listen(sock=sock, backlog=1024)
        if worker:
            publisher = loop.create_task(_publish(runtime))
        for sock in sockets.admin:
            await admin.listen(sock=sock, backlog=128)
        if worker:  # the admin port is worker 0's, and the set says so
            oplog.event(
                log,
                logging.INFO,
                "listening",
                "worker %(index)s (pid %(pid)d) proxying %(listen)s -> %(upstream)s",
                index=_worker_index(),
                pid=os.getpid(),
                listen=str(settings.listen),
                upstream=shown(settings.upstream.url),
            )
        else:
            oplog.event(
                log,
                logging.INFO,
                "listening",
                "proxying %(listen)s -> %(upstream)s; admin on %(admin)s",
                listen=str(settings.listen),
                upstream=shown(settings.upstream.url),
                admin=str(settings.admin),
            )
        reloads: set[asyncio.Task[bool]] = set()

        def on_hup() -> None:
            task = loop.create_task(reload(runtime))
            reloads.add(task)
            task.add_done_callback(reloads.discard)
            if supervisor is not None:
                supervisor.hup()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        watcher = loop.create_task(watch(runtime, interval=watch_interval, since=since))
        if supervisor is not None:
            supervisor.started(stop=stop.set, mirror=runtime.metrics.mirror)
        if hups:  # (one reload for any number of SIGHUPs while starting)
            on_hup()
        await stop.wait()
    finally:
        # Each handler is replaced, never removed and added again: between the two the signal's
        # default action (the process killed) would be in force, and worker 0 passes signals on.
        # A draining process reloads nothing, and a SIGHUP now must not kill it with its
        # requests in flight.
        loop.add_signal_handler(signal.SIGHUP, _ignore)
        if worker and supervisor is None:
            # One of the set's other workers: Ctrl-C signals the whole process group and worker 0
            # passes the stop on as well, so a second signal is the same stop, not a kill (worker
            # 0 bounds this drain: it kills a worker that outlives drain_delay + drain_timeout + 5 s).
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if parent is not None:
            loop.remove_reader(parent)
        if supervisor is not None:
            supervisor.stop()  # the other workers drain at the same time, each on its own
        # 1. Readiness goes false first, so the platform stops sending new requests; each
        #    connection's next answer says `Connection: close`, so clients move elsewhere.
        runtime.draining = True
        server.start_drain()
        oplog.event(
            log,
            logging.INFO,
            "draining",
            "draining: accepting for %(drain_delay)gs more, then up to %(drain_timeout)gs for in-flight requests",
            drain_delay=settings.drain_delay,
            drain_timeout=settings.drain_timeout,
        )
        for task in (watcher, publisher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # 2. Keep accepting while the platform's endpoint removal catches up with readiness
        #    (in Kubernetes it lags by seconds): a client sent here meanwhile is still served.
        if settings.drain_delay > 0:
            await asyncio.sleep(settings.drain_delay)
        # 3. Stop accepting (serving what the listen queue holds), close connections between
        #    requests, wait up to drain_timeout, cut the rest; then the clients and key sources.
        await server.shutdown(settings.drain_timeout)
        if worker:
            runtime.metrics.mirror()  # the requests of its last second, before the worker exits
        await proxy.close()
        if supervisor is not None:  # and the set's /readyz answers "draining" until they have
            await supervisor.finish()
        # 4. The admin listener goes last, so /readyz answers "draining" to the very end.
        await admin.shutdown(_ADMIN_DRAIN)
        if access_log is not None:
            access_log.flush()
            # What a reader that stopped reading has left held: a bounded wait, then it is lost.
            outlet.stdout().drain(_LOG_DRAIN)
        if worker and supervisor is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        oplog.event(log, logging.INFO, "stopped", "stopped")
        outlet.stderr().drain(_LOG_DRAIN / 2)


def freeze_start_up() -> None:
    """The start-up's objects (~37k: modules, the config, the keys, the snapshot) out of every
    later collection: one full collection now (the start-up's own garbage), then `gc.freeze()`.
    They live as long as the process, yet a full collection while serving walked them all:
    27-88 ms on a loaded 2-core VM, in the loop's thread, a stall for every request in flight;
    after the freeze it walks only what was made since (~0.4 ms, bench/FIGURES.md, "Pauses").
    What the start-up made and a reload frees later is still freed by its reference count."""
    gc.collect()
    gc.freeze()


async def _publish(runtime: Runtime, interval: float = 1.0) -> None:
    """A worker's scrape-time metrics and readiness, copied into the multiprocess files."""
    family = WORKERS_READY_FAMILY
    files = multiproc.own()
    kind = multiproc.GAUGES[family.gauge_mode]
    ready = multiproc.key(family.name, family.name, {}, family.help)
    while True:
        try:
            runtime.metrics.mirror()
            files.set(kind, ready, 1 if runtime.readiness()[0] else 0)
            files.commit()
        except Exception:  # never let metrics take a worker down
            oplog.event(log, logging.ERROR, "metrics_failed", "publishing worker metrics failed", exc_info=True)
        await asyncio.sleep(interval)


def _orphaned(loop: asyncio.AbstractEventLoop, fd: int, stop: asyncio.Event) -> None:
    loop.remove_reader(fd)
    oplog.event(log, logging.ERROR, "worker_orphaned", "worker 0 has gone: stopping this worker too")
    stop.set()


def run_worker(settings: Settings, *, config_path: str) -> int:
    """A worker that worker 0 of `workers: N` started again (a fresh process; workers.py)."""
    _loop_runner()(serve(settings, config_path=config_path, worker=True, parent=parent_fd()))
    return 0


def _loop_runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    try:
        import uvloop  # the faster event loop (a regular dependency on Linux and macOS)
    except ImportError:
        return asyncio.run
    hold_standard_descriptors()
    return uvloop.run


def run(settings: Settings, *, config_path: str | None) -> int:
    if config_path is not None and (settings.workers > 1 or in_set()):
        if not in_set():
            become_first(settings, config_path=config_path)  # does not return: the process is replaced
        runner = _loop_runner()  # uvloop imported before the fork: its pages are shared too

        def one(sockets: Sockets, supervisor: Set | None, parent: int | None) -> Coroutine[Any, Any, None]:
            return serve(
                settings, config_path=config_path, worker=True, sockets=sockets, supervisor=supervisor, parent=parent
            )

        return run_set(settings, config_path=config_path, serve=one, runner=runner)
    _loop_runner()(serve(settings, config_path=config_path))
    return 0
