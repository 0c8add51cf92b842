"""tests/support/process.py itself: the cleanup kills the sidecar's process group only while
that group can still be its own."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support import process
from tests.support.raw import bounded_by

CONFIG = (
    "realm: api\nupstream: {url: 'http://127.0.0.1:9'}\n"
    "providers:\n  main: {issuer: https://i.test, audiences: [api], jwks: {url: 'http://127.0.0.1:9/jwks'}}\n"
    "routes:\n  - {name: p, match: {path_prefix: /}, auth: none}\n"
)


@bounded_by(60)
async def test_a_stopped_sidecar_s_group_is_never_signalled_again(tmp_path: Path, monkeypatch: Any) -> None:
    # Once the process is reaped and every process that held its output has exited, its pid (the
    # group's id) is free for the kernel to give to another process, maybe another group's
    # leader: a SIGKILL to the group then would kill strangers (the machine's pid_max may be 32768).
    config = CONFIG
    signalled: list[int] = []
    real = os.killpg

    def killpg(pgid: int, sig: int) -> None:
        signalled.append(pgid)
        real(pgid, sig)

    monkeypatch.setattr(os, "killpg", killpg)
    async with process.running(tmp_path, config) as run:
        assert await run.stop(signal.SIGTERM) == 0
    assert signalled == [], "no group signalled after the sidecar and its output had ended"


@bounded_by(60)
async def test_a_running_sidecar_is_killed_with_its_group(tmp_path: Path, monkeypatch: Any) -> None:
    config = CONFIG
    signalled: list[int] = []
    real = os.killpg

    def killpg(pgid: int, sig: int) -> None:
        signalled.append(pgid)
        real(pgid, sig)

    monkeypatch.setattr(os, "killpg", killpg)
    async with process.running(tmp_path, config) as run:
        pid = run.pid
    assert signalled == [pid]
    assert run.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
