"""Route-table warnings and errors where an operator sees them: the startup log, a reload, a refused start.

A request a guarded route does not take (a method it does not list) may land on a later
route with weaker auth; the sidecar starts anyway but says so, naming both routes. A route
that can never match refuses the start, naming its line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.ops.reload import reload
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint
from tests.support.process import running
from tests.support.upstream import start_upstream

CONFIG = f"""\
upstream: {{url: "{{upstream}}"}}
providers:
  main: {{issuer: "{ISSUER}", audiences: ["{AUDIENCE}"], jwks: {{url: "{{jwks}}"}}}}
routes:
  - name: admin
    match: {{path_prefix: /admin/, methods: [GET]}}
    auth: {{provider: main, scopes: {{all_of: [admin]}}}}
  - name: api
    match: {{path_prefix: /}}
    auth: {{provider: main}}
"""
WARNING = (
    "warning: routes[0]: route 'admin' guards /admin and below for GET, HEAD only: every method but GET, HEAD "
    "there fall through to route 'api' (line 8), whose auth is weaker: scope admin is not required."
)


async def test_the_start_log_names_both_routes_and_the_request_it_warns_of_is_real(
    aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url()) + "drain_timeout: 1s\n"
    async with running(tmp_path, text, stdout=False) as run:
        async with aiohttp.ClientSession() as session:
            # What the warning is about: a token without the admin scope may DELETE under /admin/.
            headers = {"Authorization": f"Bearer {mint(key=rsa_key)}"}
            async with session.delete(f"{run.url}/admin/x", headers=headers) as response:
                assert response.status == 200
            async with session.get(f"{run.url}/admin/x", headers=headers) as response:
                assert response.status == 403
        await run.stop(timeout=15)
    path = run.config
    logged = [line for line in run.err.decode().splitlines() if "warning: routes[0]" in line]
    assert len(logged) == 1, run.err.decode()
    assert f"{path}:5: {WARNING}" in logged[0] and "WARNING" in logged[0]


async def test_a_route_that_can_never_match_refuses_the_start_naming_its_line(tmp_path: Path) -> None:
    text = (
        CONFIG.replace("{upstream}", "http://127.0.0.1:1").replace("{jwks}", "http://127.0.0.1:1/jwks")
        + "  - {name: late, match: {path_prefix: /late}, auth: none}\n"
    )
    async with running(tmp_path, text, ready=None, stdout=False) as run:
        assert await run.exited(15) == 1
    path = run.config
    # One problem is one line (startup: `run` says what stops a start in one line).
    assert run.err.decode().splitlines() == [
        f"jwt-sidecar: error: {path}:11: routes[2].match: route 'late' can never match: every request it matches "
        "is taken first by 'api' (line 8); remove it, or move it before them",
    ]


async def test_a_reload_logs_the_warnings_of_the_new_config(sidecar: Any, caplog: pytest.LogCaptureFixture) -> None:
    s = await sidecar(CONFIG.replace("methods: [GET]", "methods: [GET, POST, PUT, PATCH, DELETE]"))
    path = Path(s.runtime.config_path)
    assert s.runtime.settings.warnings != ()  # OPTIONS and the rest still fall through
    path.write_text(path.read_text().replace("methods: [GET, POST, PUT, PATCH, DELETE]", "methods: [GET]"))
    with caplog.at_level(logging.WARNING, logger="jwt_sidecar"):
        assert await reload(s.runtime) is True
    logged = [record.getMessage() for record in caplog.records if "warning: routes[0]" in record.getMessage()]
    assert len(logged) == 1 and f"{path}:5: {WARNING}" in logged[0]
