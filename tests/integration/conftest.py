"""The real proxy on loopback, between a real recording upstream and a real JWKS server.

`sidecar(yaml)` builds the config from YAML text (with `{upstream}` and `{jwks}` filled in;
`clock=` a FakeClock to move key refreshes on without waiting),
starts the proxy on its own HTTP/1.1 server on loopback (as `jwt-sidecar run` serves it)
and its admin endpoints on their own server (as `run` serves them), and returns
a `Sidecar` with a client session. Tokens are minted per test with `tests.conftest.mint`.

The event loop (`pytest_asyncio_loop_factories` below; tests/support/loops.py): every async test
here runs on uvloop, which `jwt-sidecar run` uses wherever it is installed (a regular dependency
on Linux and macOS: what users run). The tests of the wire that serve the proxy in this process
(the `sidecar` fixture, in the modules of `BOTH_LOOPS`: the server, the upstream client, bodies,
the splice, smuggling, limits, memory) run on asyncio's own loop as well, the loop `run` falls
back to without uvloop; a test id then ends in `[uvloop]` or `[asyncio]`. A test whose proxy is
a `run` subprocess serves on uvloop whatever the test's loop, so it is run once.

Why not every test on both loops: measured on a shared 2-core machine (loaded by other runs,
so +-1 min), the suite took 6:10 on asyncio's loop alone (1,323 tests), 7:21 on uvloop alone,
9:41 on both (2,493 tests: about +3.5 min, taking `.ci/run`, 6.5 min on a fresh clone, to its
10 min budget with nothing to spare) and 6:42 this way (1,929 tests). The CPU time of a run is
a third of its wall time (the suite mostly waits on timeouts and subprocesses), so pytest-xdist
might pay on 2 cores; it was not tried: it is no dependency, and the session's Redis, the
subprocesses and the fixed timeouts would need auditing for two workers first.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.base.clock import Clock
from proxy.config import builder as config
from proxy.http.http1 import Server
from proxy.ops.admin import admin_server
from proxy.request.app import Proxy
from proxy.request.runtime import Runtime
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of
from tests.support.jwks_server import JwksServer
from tests.support.loops import LoopFactory, loops
from tests.support.upstream import Upstream, start_upstream

# The modules whose in-process tests (the `sidecar` fixture) also run on asyncio's own loop.
BOTH_LOOPS = frozenset(
    {
        "test_answer_again",
        "test_answer_splice_review",
        "test_answer_spliced",
        "test_connection_close",
        "test_authorization_upstream",
        "test_client_address_headers",
        "test_forward_from_head",
        "test_forward_now",
        "test_forward_now_strays",
        "test_forward_plan",
        "test_forwarding",
        "test_framing_headers",
        "test_http1_attacks",
        "test_limits",
        "test_memory",
        "test_request_flow",
        "test_security",
        "test_upload_counted",
        "test_upload_spliced",
        "test_upstream_strays",
        "test_wire_review",
    }
)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, LoopFactory]:
    """uvloop for every async test; asyncio's loop too for the wire tests served in-process."""
    if item.path.stem in BOTH_LOOPS and "sidecar" in getattr(item, "fixturenames", ()):
        return loops("uvloop", "asyncio")
    return loops("uvloop")


BASE_CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s, max_body: 1MB}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email, roles: X-User-Roles, org: X-User-Org}}
routes:
  - name: public
    match: {{path_prefix: /public/}}
    auth: none
  - name: admin
    match: {{path_prefix: /admin/, methods: [GET, POST]}}
    auth:
      provider: main
      scopes: {{all_of: [admin]}}
      claims:
        - {{claim: email_verified, equals: true}}
  - name: optional
    match: {{path_prefix: /maybe/}}
    auth: {{provider: main, optional: true}}
  - name: api
    match: {{path_prefix: /}}
    auth: {{provider: main}}
"""


@dataclass
class Sidecar:
    url: str
    admin_url: str
    client: aiohttp.ClientSession
    upstream: Upstream
    jwks: JwksServer
    runtime: Runtime
    proxy: Proxy

    async def get(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.client.get(self.url + path, allow_redirects=False, **kwargs)

    async def request(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.client.request(method, self.url + path, allow_redirects=False, **kwargs)


@pytest.fixture
async def sidecar(
    aiohttp_server: Any, jwks_server: JwksServer, rsa_key: TestKey, tmp_path: Any
) -> AsyncIterator[Callable[..., Awaitable[Sidecar]]]:
    sessions: list[aiohttp.ClientSession] = []
    proxies: list[Proxy] = []
    servers: list[Server] = []

    async def make(yaml_text: str = BASE_CONFIG, *, clock: Clock | None = None, **extra: str) -> Sidecar:
        jwks_server.document = jwks_of(rsa_key)
        upstream = await start_upstream(aiohttp_server)
        text = textwrap.dedent(yaml_text).replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
        for key, value in extra.items():
            text = text.replace("{" + key + "}", value)
        path = tmp_path / "config.yaml"
        path.write_text(text)
        settings = config.load(path)
        proxy = Proxy(settings, config_path=str(path), clock=clock)
        await proxy.start()
        proxies.append(proxy)
        proxy_server = proxy.server()
        servers.append(proxy_server)
        await proxy_server.listen("127.0.0.1", 0)
        host, port = proxy_server.sockets[0]
        runtime = proxy.runtime
        admin = admin_server(readiness=runtime.readiness, render=runtime.metrics.render)
        servers.append(admin)
        await admin.listen("127.0.0.1", 0)
        admin_host, admin_port = admin.sockets[0]
        # auto_decompress off and no cookie jar: see the bytes and headers exactly as sent.
        client = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        sessions.append(client)
        return Sidecar(
            url=f"http://{host}:{port}",
            admin_url=f"http://{admin_host}:{admin_port}",
            client=client,
            upstream=upstream,
            jwks=jwks_server,
            runtime=runtime,
            proxy=proxy,
        )

    yield make
    for server in servers:
        await server.shutdown(0)
    for session in sessions:
        await session.close()
    for proxy in proxies:
        await proxy.close()
