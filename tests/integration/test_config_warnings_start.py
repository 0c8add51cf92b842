"""A config that protects nothing starts, and says so once in the start log.

`check-config` prints the same warning (tests/unit/config/test_config_messages.py); here it is the
operator who only reads the logs of `run`, and the request the warning is about is real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of
from tests.support.process import running
from tests.support.upstream import start_upstream


async def test_a_config_whose_every_route_is_auth_none_starts_and_logs_one_warning(
    aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = (
        f'upstream: {{url: "{upstream.url}"}}\n'
        f'providers:\n  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{jwks_server.url()}"}}}}\n'
        "routes:\n  - {match: {path_prefix: /public/}, auth: none}\n  - {match: {path_prefix: /}, auth: none}\n"
        "drain_timeout: 1s\n"
    )
    async with running(tmp_path, text, stdout=False) as run:
        async with aiohttp.ClientSession() as session:
            # What the warning is about: no token, and the upstream answers.
            async with session.get(f"{run.url}/orders/1") as response:
                assert response.status == 200
        assert await run.stop(timeout=15) == 0
    path = run.config
    logged = [line for line in run.err.decode().splitlines() if "no route needs a token" in line]
    assert len(logged) == 1, run.err.decode()
    assert f"{path}:4: warning: routes: no route needs a token (every route is `auth: none`)" in logged[0]
    assert "WARNING" in logged[0]
