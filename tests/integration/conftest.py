"""The real proxy on loopback, between a real recording upstream and a real JWKS server.

`sidecar(yaml)` builds the config from YAML text (with `{upstream}` and `{jwks}` filled in;
`clock=` a FakeClock to move key refreshes on without waiting),
starts the proxy on its own HTTP/1.1 server on loopback (as `jwt-sidecar run` serves it)
and its admin endpoints on their own server (as `run` serves them), and returns
a `Sidecar` with a client session. Tokens are minted per test with `tests.conftest.mint`.
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
from tests.support.upstream import Upstream, start_upstream

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
