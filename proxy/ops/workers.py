"""`workers: N`: N proxy processes on one port, the first of them also the set's supervisor.

Owns: the layout of the set and its life. `run` checks the config, makes the multiprocess
metrics directory and replaces itself (`become_first`: same pid and descriptors) with a fresh
interpreter that has `PROMETHEUS_MULTIPROC_DIR` in its environment (where every worker, a
restarted one too, writes its metrics: telemetry/multiproc.py). That process, worker 0, loads the config
once, binds every socket of the set (one SO_REUSEPORT listener per worker, so the kernel
spreads connections as it does for Envoy's workers; the admin port), freezes what it holds
for the collector (`gc.freeze()`) and forks workers 1..N-1 before any event loop, epoll or
signal descriptor exists (`run_set`): the workers share its pages copy-on-write, so the set is
N processes and no supervisor of its own (its memory is in bench/FIGURES.md, "Memory of
one process and of `workers: 2`"). Worker 0 then serves like the others and is the set's supervisor (`Set`):
the admin listener (`/metrics` aggregated from the multiprocess files, prometheus-client's
format, by telemetry's `WorkersCollector`, plus the process_* metrics of each live worker, labelled
`worker`; `/readyz` true only while every worker is alive and ready), SIGHUP passed on,
SIGTERM/SIGINT passed on (each worker drains itself, worker 0 waits for them before its admin
port closes), and the multiprocess directory's life.

A worker other than 0 that dies unexpectedly is started again after a back-off
(`_FIRST_DELAY`, doubling up to `_MAX_DELAY`) while the others keep serving; the new one is a
fresh `jwt-sidecar run` (not a fork: worker 0 by then has a running loop, threads and
descriptors a child must not inherit), which reads the config file as it is now and binds its
own SO_REUSEPORT listener. When workers keep dying (`_GIVE_UP` deaths within `_WINDOW`
seconds) the whole set stops with exit status 1, so the platform restarts the container.
When worker 0 dies, the set ends, as Envoy's does when its main process goes: every worker
holds the read end of a pipe whose only write end is worker 0's (`PARENT_FD_ENV`); its end of
file (whatever killed worker 0, SIGKILL included) makes each worker drain and exit, so none
is left serving orphaned, and the container (whose main process worker 0 is) is restarted.
Before anything is forked, what the set needs from the machine is checked once (the ports,
the temporary directory, stdout; startup.py): a missing one is one line and exit status 1.
Does not own: serving requests (server.py runs each worker) or any metric's meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from ..base import oplog, outlet
from ..base.oplog import event
from ..config.settings import Settings
from ..http.causes import cause
from ..telemetry import multiproc
from ..telemetry.exposition import Registry, choose
from ..telemetry.families import WORKERS_READY as _READY_FAMILY
from ..telemetry.metrics import ProcessesCollector, WorkersCollector
from .startup import Sockets, StartupError, bind, bind_for, check_stdout, metrics_directory

__all__ = [
    "PARENT_FD_ENV",
    "SET_ENV",
    "WORKERS_READY",
    "WORKER_ENV",
    "Set",
    "abandon_set",
    "become_first",
    "in_set",
    "parent_fd",
    "run_set",
]

WORKER_ENV = "JWT_SIDECAR_WORKER"
"""This worker's index, in a worker that worker 0 started again (`jwt-sidecar run` then serves
as one worker of the set) and, once forked, in each worker's own environment."""
SET_ENV = "JWT_SIDECAR_WORKERS_DIR"
"""Set by `become_first` to the set's multiprocess metrics directory: the image it execs is
worker 0 (`run_set`)."""
PARENT_FD_ENV = "JWT_SIDECAR_PARENT_FD"
"""In a restarted worker: the descriptor of the pipe whose end of file says worker 0 has gone."""
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
_POLL = 0.1
"""Seconds between checks of a worker's exit where the kernel has no pidfd (not Linux)."""

Serve = Callable[[Sockets, "Set | None", "int | None"], Coroutine[Any, Any, None]]
"""server.py's `serve` of one worker: its sockets, the set (worker 0 only) and the pipe to watch."""
Runner = Callable[[Coroutine[Any, Any, None]], Any]


def in_set() -> bool:
    """Is this process worker 0 of a set, made by `become_first`?"""
    return bool(os.environ.get(SET_ENV))


def _remove_tree(directory: str) -> None:
    """The set's metrics directory, gone with everything in it, whatever fails."""
    import shutil  # (here: `shutil` brings `bz2` and `lzma`, ~0.6 MiB of every running sidecar)

    shutil.rmtree(directory, ignore_errors=True)


def abandon_set() -> None:
    """Worker 0 will not start (its config no longer loads): remove the set's metrics directory
    `become_first` made. Nothing to do in any other process."""
    directory = os.environ.get(SET_ENV)
    if directory:
        _remove_tree(directory)


def parent_fd() -> int | None:
    """In a restarted worker: the pipe to watch for worker 0's end (`PARENT_FD_ENV`)."""
    value = os.environ.get(PARENT_FD_ENV, "")
    return int(value) if value.isdigit() else None


def become_first(settings: Settings, *, config_path: str) -> NoReturn:
    """Become worker 0 of `settings.workers`: this process (its config checked, its warnings
    logged) is replaced by a fresh interpreter running `jwt-sidecar run` again, with the same
    pid, descriptors and command line, whose environment names the set's metrics directory."""
    check_stdout(settings)
    directory = metrics_directory()  # /tmp: writable even with a read-only root
    argv = [sys.executable, "-m", "proxy", "run", "--config", config_path]
    argv += ["--log-format", settings.log_format, "--log-level", settings.log_level]
    env = {**os.environ, SET_ENV: directory, multiproc.DIRECTORY_ENV: directory}
    env.pop(WORKER_ENV, None)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # what is buffered would be lost with this image
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        _remove_tree(directory)
        raise


def run_set(settings: Settings, *, config_path: str, serve: Serve, runner: Runner) -> int:
    """Worker 0 of the set (made by `become_first`): bind, fork the others, serve; the exit status.

    Raises `StartupError`, with nothing forked, when a port cannot be had."""
    directory = os.environ[SET_ENV]
    count = max(settings.workers, 1)
    try:
        sockets = _bind(settings, count)
    except StartupError:
        _remove_tree(directory)
        raise
    # A restarted worker is a fresh `run`: its own listener, this directory, no SET_ENV.
    os.environ.pop(SET_ENV)
    _name(0)
    gone, alive = os.pipe()  # the workers' read ends see end of file once worker 0 is gone
    os.set_inheritable(gone, True)  # kept by a restarted worker's exec (its number in PARENT_FD_ENV)
    _before_fork()
    children: list[_Child] = []
    for index in range(1, count):
        own = sockets.listen[index]
        pid = os.fork()
        if pid == 0:  # the worker: it never returns from here
            os.close(alive)
            for sock in (*sockets.listen, *sockets.admin):
                if sock is not own:
                    sock.close()
            _worker(index, serve, Sockets(listen=[own]), gone, runner)
        children.append(_Child(index, pid))
    for sock in sockets.listen[1:]:
        sock.close()  # each worker's own now
    the_set = Set(settings, directory=directory, config_path=config_path, children=children, gone=gone)
    try:
        runner(serve(Sockets(listen=sockets.listen[:1], admin=sockets.admin), the_set, None))
    finally:
        sockets.close()
        status = the_set.wind_up()
        os.close(alive)
        _remove_tree(directory)
    return status


def _bind(settings: Settings, count: int) -> Sockets:
    # The proxy port is tried first without SO_REUSEPORT and let go, so that a port another
    # set of workers holds (with it) counts as in use too, rather than its traffic being
    # split with ours. Then one listener per worker, and the admin port, worker 0's to keep.
    check_stdout(settings)
    for sock in bind(settings.listen, "listen"):
        sock.close()
    sockets = bind_for(settings, proxy_reuse_port=True)
    try:
        for _ in range(1, count):
            sockets.listen += bind(settings.listen, "listen", reuse_port=True)
    except StartupError:
        sockets.close()
        raise
    return sockets


def _before_fork() -> None:
    """What a fork needs: one thread, no event loop and no signal wakeup descriptor (a worker
    makes its own), nothing buffered twice; then the collector's freeze, so that what exists
    now (modules, the config) is never traversed again and its pages stay shared. A frozen
    object dropped later is still freed by its reference count; only a cycle among them (the
    first config's, once a reload replaced it) would stay."""
    if threading.active_count() != 1:
        raise RuntimeError("workers must be forked before any thread exists")
    previous = signal.set_wakeup_fd(-1)
    if previous != -1:
        signal.set_wakeup_fd(previous)
        raise RuntimeError("workers must be forked before any signal wakeup descriptor exists")
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    gc.collect()
    gc.freeze()  # bench/FIGURES.md, "Memory of one process and of `workers: 2`"
    _trim()


def _trim() -> None:
    """Give the heap's free pages back to the system before the fork (glibc's `malloc_trim`):
    what loading the config freed would otherwise be resident in every worker (RSS counts a
    page in each process that maps it). Where there is no glibc, nothing is done."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def _name(index: int) -> None:
    """This process is worker `index`: its environment and its JSON log lines say so."""
    os.environ[WORKER_ENV] = str(index)
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, oplog.JsonFormatter):
            handler.setFormatter(oplog.JsonFormatter(index))


def _worker(index: int, serve: Serve, sockets: Sockets, gone: int, runner: Runner) -> NoReturn:
    """A forked worker: serve until stopped (or worker 0 is gone), then exit with its status."""
    status = 1
    try:
        _name(index)
        runner(serve(sockets, None, gone))
        status = 0
    except BaseException:  # noqa: BLE001 - a worker never returns into worker 0's code
        with contextlib.suppress(Exception):
            event(log, logging.ERROR, "worker_failed", "worker %(worker)d failed", worker=index, exc_info=True)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        outlet.drain_all(1.0)  # the lines its writer threads still hold (os._exit skips atexit)
        os._exit(status)


@dataclass
class _Child:
    index: int
    pid: int
    returncode: int | None = None
    pidfd: int | None = None


class Set:
    """Worker 0's other job: the supervisor of workers 1..N-1, inside its own loop.

    server.py's `serve` calls `started` once it serves, `hup` on SIGHUP, `stop` when it starts
    to drain and `finish` before its admin port closes; `readiness` and `render` are the admin
    port's. `wind_up`, after the loop, makes sure no worker outlives worker 0's return."""

    def __init__(self, settings: Settings, *, directory: str, config_path: str, children: list[_Child], gone: int):
        self.settings = settings
        self.count = max(settings.workers, 1)
        self.directory = directory
        self.config_path = config_path
        self.children = {child.index: child for child in children}
        self.status = 0
        self._gone = gone
        self._restarting: dict[int, int | None] = {}  # worker index -> the exit status it restarts from
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._deaths: deque[float] = deque()
        self._stopping = False
        self._stop: Callable[[], None] = lambda: None
        self._mirror: Callable[[], None] = lambda: None
        self._exited: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.registry = Registry()
        self.registry.register(WorkersCollector(directory))
        self.registry.register(ProcessesCollector(self.processes))

    # -- serve's calls ---------------------------------------------------------------------

    def started(self, *, stop: Callable[[], None], mirror: Callable[[], None]) -> None:
        """Worker 0 serves: watch the others; `stop()` ends worker 0 (so the set) when they keep
        dying; `mirror()` copies worker 0's own metrics into the files before a scrape."""
        self._loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        self._stop, self._mirror = stop, mirror
        for child in self.children.values():
            self._watch(child)
        self._check_exited()
        event(
            log,
            logging.INFO,
            "workers_started",
            "%(workers)d workers on %(listen)s; admin on %(admin)s",
            workers=self.count,
            listen=str(self.settings.listen),
            admin=str(self.settings.admin),
        )

    def hup(self) -> None:
        self._signal(signal.SIGHUP)

    def stop(self) -> None:
        """Worker 0 drains: so do the others (each on its own), and none is started again.

        Once: a worker takes a second SIGTERM, arriving once its drain has begun, as a kill."""
        if self._stopping:
            return
        self._stopping = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._signal(signal.SIGTERM)

    async def finish(self) -> None:
        """Wait for the others to have drained (as long as a drain may take), then kill the rest."""
        self.stop()
        self._check_exited()  # none left (one waiting to be started again, say): no wait
        if self._exited is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), self.settings.drain_delay + self.settings.drain_timeout + 5)
        self._signal(signal.SIGKILL)
        while self._live():
            await asyncio.sleep(0.01)
            for child in self._live():
                self._reap(child)

    def processes(self) -> list[tuple[str, int]]:
        # Live workers only: a dead one's pid may already name another process.
        return [("0", os.getpid())] + [(str(c.index), c.pid) for c in self.children.values() if c.returncode is None]

    def readiness(self, own: tuple[bool, str]) -> tuple[bool, str]:
        if not own[0]:
            return own if own[1].startswith("draining") else (False, f"worker 0: {own[1]}")
        if self._stopping:
            return False, "draining: shutting down"
        if self._restarting:
            return False, "restarting " + ", ".join(
                f"worker {i} (exited with {status})" for i, status in sorted(self._restarting.items())
            )
        if any(child.returncode is not None for child in self.children.values()):
            return False, "a worker has exited"
        try:
            self._mirror()
            ready = _settled(lambda: _gauge(self.registry, WORKERS_READY))
        except Exception:  # noqa: BLE001 - /readyz answers, whatever the files hold
            event(log, logging.WARNING, "readiness_unknown", "reading the workers' readiness failed", exc_info=True)
            return False, "the workers' readiness could not be read"
        if ready < self.count:
            return False, f"{int(ready)} of {self.count} workers ready"
        return True, "ready"

    def render(self, accept: str | None) -> tuple[bytes, str]:
        self._mirror()  # worker 0's own requests up to now, not as of its last second
        encoder, content_type = choose(accept)
        return _settled(lambda: encoder(list(self.registry.collect()))), content_type

    def wind_up(self) -> int:
        """After worker 0's loop (whatever ended it): no worker is left running; the set's status."""
        live = self._live()
        if live:  # worker 0 returned before `finish` (a start abandoned or failed)
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + self.settings.drain_delay + self.settings.drain_timeout + 5
            while self._live() and time.monotonic() < deadline:
                time.sleep(0.01)
                for child in self._live():
                    self._reap(child, forget=False)
            self._signal(signal.SIGKILL)
            for child in self._live():
                _, status = os.waitpid(child.pid, 0)
                child.returncode = os.waitstatus_to_exitcode(status)
        for child in self.children.values():
            if child.pidfd is not None:
                os.close(child.pidfd)
                child.pidfd = None
            multiproc.mark_process_dead(child.pid, self.directory)
        multiproc.mark_process_dead(os.getpid(), self.directory)
        # A worker stopped while waiting to be restarted is not a failure of the stop.
        failed = any(
            c.returncode not in (0, -signal.SIGTERM) for c in self.children.values() if c.index not in self._restarting
        )
        return 1 if failed and self.status == 0 else self.status

    # -- the others' lives -----------------------------------------------------------------

    def _live(self) -> list[_Child]:
        return [child for child in self.children.values() if child.returncode is None]

    def _signal(self, sig: int) -> None:
        for child in self._live():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    def _watch(self, child: _Child) -> None:
        assert self._loop is not None
        try:
            child.pidfd = os.pidfd_open(child.pid)  # readable once the process has exited
        except (AttributeError, OSError):  # not Linux (or no such process any more): poll
            self._loop.call_later(_POLL, self._poll, child)
            self._reap(child)
        else:
            self._loop.add_reader(child.pidfd, self._reap, child)

    def _poll(self, child: _Child) -> None:
        if child.returncode is None and self._reap(child) is None and self._loop is not None:
            self._loop.call_later(_POLL, self._poll, child)

    def _reap(self, child: _Child, *, forget: bool = True) -> int | None:
        """The child's exit status if it has exited (then handled once), else None."""
        if child.returncode is not None:
            return child.returncode
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, 255 << 8
        if pid == 0:
            return None
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.pidfd is not None:
            if self._loop is not None and forget:
                self._loop.remove_reader(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None
        if forget:
            self._died(child)
        return child.returncode

    def _check_exited(self) -> None:
        if self._exited is not None and not self._live():
            self._exited.set()

    def _died(self, child: _Child) -> None:
        # Its live gauges (ready, in flight) must stop counting; its counters stay summed.
        multiproc.mark_process_dead(child.pid, self.directory)
        self._check_exited()
        if self._stopping or self.status:
            return
        assert self._loop is not None
        now = self._loop.time()
        self._deaths.append(now)
        while self._deaths[0] < now - _WINDOW:
            self._deaths.popleft()
        if len(self._deaths) >= _GIVE_UP:
            event(
                log,
                logging.ERROR,
                "worker_died",
                "worker %(worker)d (pid %(pid)d) exited with %(status)s: %(deaths)d worker deaths within "
                "%(window)gs; stopping the set",
                worker=child.index,
                pid=child.pid,
                status=child.returncode,
                deaths=len(self._deaths),
                window=_WINDOW,
            )
            self._give_up()
            return
        delay = min(_FIRST_DELAY * 2 ** (len(self._deaths) - 1), _MAX_DELAY)
        event(
            log,
            logging.ERROR,
            "worker_died",
            "worker %(worker)d (pid %(pid)d) exited with %(status)s; starting it again in %(delay)gs (the "
            "others keep serving)",
            worker=child.index,
            pid=child.pid,
            status=child.returncode,
            delay=delay,
        )
        self._restarting[child.index] = child.returncode
        self._timers[child.index] = self._loop.call_later(delay, self._respawn, child.index)

    def _give_up(self) -> None:
        self.status = 1
        self._stop()

    def _respawn(self, index: int) -> None:
        """A fresh `jwt-sidecar run` as worker `index`: it reads the config file as it is now,
        like a reload would, with worker 0's log format and level (its command line may have
        overridden the file's)."""
        self._timers.pop(index, None)
        if self._stopping:
            return
        argv = [sys.executable, "-m", "proxy", "run", "--config", self.config_path]
        argv += ["--log-format", self.settings.log_format, "--log-level", self.settings.log_level]
        env = {**os.environ, WORKER_ENV: str(index), PARENT_FD_ENV: str(self._gone)}
        try:
            pid = os.posix_spawn(sys.executable, argv, env, setsigmask=())
        except OSError as error:  # no process can be started (fd or memory limits): give up
            event(
                log,
                logging.ERROR,
                "worker_died",
                "worker %(worker)d could not be started again: %(cause)s; stopping the set",
                worker=index,
                cause=cause(error),
            )
            self._give_up()
            return
        child = self.children[index] = _Child(index, pid)
        self._restarting.pop(index, None)
        self._exited = asyncio.Event()
        self._watch(child)
        event(
            log,
            logging.INFO,
            "worker_restarted",
            "worker %(worker)d started again (pid %(pid)d)",
            worker=index,
            pid=pid,
        )


def _settled(read: Callable[[], T]) -> T:
    """`read()` of the multiprocess files, once more if it fails (a file being replaced under
    us, say: telemetry/multiproc.py reads a file a worker has only just made as empty)."""
    try:
        return read()
    except Exception:  # noqa: BLE001
        time.sleep(0.01)
        return read()


def _gauge(registry: Registry, name: str) -> float:
    for family in registry.collect():
        if family.name == name:
            return sum(sample.value for sample in family.samples if sample.name == name)
    return 0.0
