"""A config that protects nothing starts, and says so once in the start log.

`check-config` prints the same warning (tests/unit/config/test_config_messages.py); here it is the
operator who only reads the logs of `run`, and the request the warning is about is real.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of
from tests.integration.test_lifecycle import free_port, wait_ready
from tests.support.upstream import start_upstream

REPO = Path(__file__).parents[2]


async def test_a_config_whose_every_route_is_auth_none_starts_and_logs_one_warning(
    aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    listen, admin = free_port(), free_port()
    path = tmp_path / "config.yaml"
    path.write_text(
        f'upstream: {{url: "{upstream.url}"}}\n'
        f'providers:\n  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{jwks_server.url()}"}}}}\n'
        "routes:\n  - {match: {path_prefix: /public/}, auth: none}\n  - {match: {path_prefix: /}, auth: none}\n"
        f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\ndrain_timeout: 1s\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"http://127.0.0.1:{admin}/readyz", proc)
            # What the warning is about: no token, and the upstream answers.
            async with session.get(f"http://127.0.0.1:{listen}/orders/1") as response:
                assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    logged = [line for line in err.decode().splitlines() if "no route needs a token" in line]
    assert len(logged) == 1, err.decode()
    assert f"{path}:4: warning: routes: no route needs a token (every route is `auth: none`)" in logged[0]
    assert "WARNING" in logged[0]
