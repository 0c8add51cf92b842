"""A real `jwt-sidecar run` in a subprocess, for the integration tests about the whole command.

`running(tmp_path, text)` writes the config to `tmp_path` (with `listen` and `admin` on free
loopback ports appended when the text names neither), starts `python -m proxy run --config
PATH` from the repository, reads its stdout and stderr all along (so a chatty process never
blocks on a full pipe, and a test can wait for a log line or read what was written so far),
waits until `/readyz` answers 200 (or another admin path, or not at all), and yields a `Run`.
However the test ends, the process and every process of its group (the workers of `workers:
N`) are killed and reaped; `Run.stop()` is the orderly way: a signal, a bounded wait, a kill
and a failure on a timeout.

The process runs in a session of its own, so the cleanup can kill its workers with it; the
signals a test sends go to the pid (the supervisor) alone, as a container runtime sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def free_port() -> int:
    """A loopback port nothing listens on just now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port(text: str, name: str) -> int | None:
    """The port of the top-level `name: host:port` line of a config's text, if it has one."""
    found = re.search(rf"^{name}:\s*[\"']?(?:\[[^\]]*\]|[^\s:\"']*):(\d+)", text, re.MULTILINE)
    return int(found.group(1)) if found else None


async def _pump(stream: asyncio.StreamReader | None, into: bytearray) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        into += chunk


@dataclass
class Run:
    """One running `jwt-sidecar run`: its process, config, ports and output so far."""

    proc: asyncio.subprocess.Process
    config: Path
    listen: int | None
    admin: int | None
    out: bytearray = field(default_factory=bytearray)
    """stdout so far (the access log), as bytes."""
    err: bytearray = field(default_factory=bytearray)
    """stderr so far (the operator log), as bytes."""
    _pumps: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    def _tail(self) -> str:
        return f"stderr ends: {self.stderr()[-3000:]}"

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def ready(self, path: str = "/readyz", *, status: int | None = 200, timeout: float = 30.0) -> None:
        """Poll the admin port's `path` until it answers `status` (any status when None).
        Fails at once if the process exits, and at `timeout`."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"the sidecar exited with {self.proc.returncode}; {self._tail()}")
                try:
                    async with session.get(self.admin_url + path) as response:
                        if status is None or response.status == status:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline:
                    wanted = f" {status}" if status is not None else ""
                    raise AssertionError(f"{path} never answered{wanted} within {timeout} s; {self._tail()}")
                await asyncio.sleep(0.05)

    async def wait_for(
        self, needle: str | Callable[[str], bool], *, timeout: float = 10.0, stream: str = "both"
    ) -> None:
        """Until `needle` is in the output so far ("err", "out" or "both"), or `needle(text)` holds."""
        check = needle if callable(needle) else lambda text: needle in text
        deadline = time.monotonic() + timeout
        while True:
            text = {"err": self.stderr, "out": self.stdout, "both": lambda: self.stderr() + self.stdout()}[stream]()
            if check(text):
                return
            if self.proc.returncode is not None and all(pump.done() for pump in self._pumps):
                raise AssertionError(f"the sidecar exited with {self.proc.returncode} first; {self._tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not written within {timeout} s; {self._tail()}")
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` and wait for the exit (and the end of its output); its status. A process
        still running at `timeout` is killed, with its group, and the test fails."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.exited(timeout, after=signal.Signals(sig).name)

    async def exited(self, timeout: float = 20.0, *, after: str = "") -> int:
        """Wait for the process to end by itself (and its output to end); its status. Killed
        with its group, and the test fails, at `timeout`."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"the sidecar did not stop within {timeout} s {after}; {self._tail()}") from None
        # The output ends when every process holding the pipes (workers too) has exited.
        try:
            await asyncio.wait_for(asyncio.gather(*self._pumps), 10)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"the sidecar's output never ended (a process left behind?); {self._tail()}") from None
        return self.proc.returncode  # type: ignore[return-value]

    async def kill(self) -> None:
        """SIGKILL to the process and its group (workers included), reaped; idempotent.

        The group only while it can still be ours: the process not yet reaped, or something
        still holding its output (a worker left behind, which keeps the group's id in use).
        Once both have ended, the pid may be given to another process, another group's leader
        perhaps (pid_max can be 32768), and a signal to the group would kill strangers."""
        if self.proc.returncode is None or not all(pump.done() for pump in self._pumps):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._pumps, return_exceptions=True), 5)
        for pump in self._pumps:
            pump.cancel()


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """`text` in `tmp_path/name`, with `listen` and `admin` on free loopback ports appended
    when the text sets neither."""
    if _port(text, "listen") is None and _port(text, "admin") is None:
        text += f"listen: 127.0.0.1:{free_port()}\nadmin: 127.0.0.1:{free_port()}\n"
    path = tmp_path / name
    path.write_text(text)
    return path


async def start(
    config: Path,
    *args: str,
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    stdout: bool | int = True,
    stderr: int | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> Run:
    """Start `python -m proxy run --config CONFIG ARGS` (or `command`), its output read all
    along; nothing waited for. `stdout=False` sends stdout to /dev/null; a descriptor (an int)
    for `stdout` or `stderr` is given to the process as it is (and not read here)."""
    argv = list(command) if command is not None else [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        *args,
        cwd=cwd,
        env=ENV if env is None else env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout if type(stdout) is int else asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE if stderr is None else stderr,
        preexec_fn=preexec_fn,
        start_new_session=True,
    )
    text = config.read_text(errors="replace")
    run = Run(proc, config, _port(text, "listen"), _port(text, "admin"))
    run._pumps = [
        asyncio.ensure_future(_pump(proc.stdout, run.out)),
        asyncio.ensure_future(_pump(proc.stderr, run.err)),
    ]
    return run


@asynccontextmanager
async def running(
    tmp_path: Path,
    config: str | Path,
    *args: str,
    ready: str | None = "/readyz",
    name: str = "config.yaml",
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    stdout: bool | int = True,
    stderr: int | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> AsyncIterator[Run]:
    """A running sidecar for the `async with` body: the config text written to `tmp_path/name`
    (a Path is used as it is), started, `ready` (an admin path) answering 200 unless None;
    killed with its group at the end unless the body stopped it."""
    path = config if isinstance(config, Path) else write_config(tmp_path, config, name)
    run = await start(
        path, *args, command=command, env=env, cwd=cwd, stdout=stdout, stderr=stderr, preexec_fn=preexec_fn
    )
    try:
        if ready is not None:
            await run.ready(ready)
        yield run
    finally:
        await run.kill()


def children(pid: int) -> list[int]:
    """The pids of `pid`'s live children (the workers of a supervisor), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found
