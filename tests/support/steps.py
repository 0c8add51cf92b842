"""The request path's real parts, for tests at the level of one request's `Exchange`.

`start_parts` builds a `Proxy` from a real config file (a provider whose keys are a real
`jwks_file` of the test key, a recording upstream on loopback), and starts it: the upstream
pool, the key ring and the first snapshot are the ones the proxy serves from.
`run_step` sends raw request bytes to our own HTTP/1.1 server on loopback, whose handler makes
the request's `Exchange` and runs the step under test on it; it returns the exchange, the
`ProxyError` the step raised (if any) and the raw answer.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.base.errors import ProxyError, TokenMissing
from proxy.config import builder as config
from proxy.http.http1 import Request, Server
from proxy.request.app import Proxy
from proxy.request.exchange import Exchange
from proxy.request.runtime import Runtime
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of
from tests.support.upstream import Upstream, start_upstream

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks_file: {{jwks_file}}
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email}}
routes:
  - name: public
    match: {{path_prefix: /public/}}
    auth: none
  - name: query
    match: {{path_prefix: /q/}}
    auth: {{provider: main}}
    token_sources: [{{query: access_token}}]
  - name: api
    match: {{path_prefix: /api/}}
    auth: {{provider: main}}
"""
"""No catch-all route: /elsewhere matches nothing."""

Step = Callable[[Exchange], Awaitable[None] | type[TokenMissing] | None]


@dataclass
class Parts:
    proxy: Proxy
    upstream: Upstream

    @property
    def runtime(self) -> Runtime:
        return self.proxy.runtime


@dataclass
class Ran:
    """What one request did: its exchange, the error the step raised, and the answer's bytes."""

    exchange: Exchange
    error: ProxyError | None
    answer: bytes
    begun: dict[str, Any] = field(default_factory=dict)
    """What the exchange held when the step returned, before its coroutine (if any) ran."""

    @property
    def status(self) -> int:
        return int(self.answer.split(b" ", 2)[1]) if self.answer else 0


async def start_parts(
    aiohttp_server: Any, tmp_path: Path, key: TestKey, yaml_text: str = CONFIG, *, upstream_url: str | None = None
) -> Parts:
    """`yaml_text` with `{upstream}` the recording upstream's URL (or `upstream_url`) and
    `{jwks_file}` a file holding `key`'s public JWK."""
    upstream = await start_upstream(aiohttp_server)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks_of(key)))
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(yaml_text)
        .replace("{upstream}", upstream_url or upstream.url)
        .replace("{jwks_file}", str(jwks_file))
    )
    proxy = Proxy(config.load(path), config_path=str(path))
    await proxy.start()
    return Parts(proxy, upstream)


def request_bytes(target: str, *fields: str, method: str = "GET") -> bytes:
    lines = "".join(f"{f}\r\n" for f in fields)
    return f"{method} {target} HTTP/1.1\r\nHost: sidecar.test\r\n{lines}Connection: close\r\n\r\n".encode()


async def run_step(parts: Parts, raw: bytes, step: Step, *, seen: tuple[str, ...] = ()) -> Ran:
    """Serve `raw` with a handler that runs `step` on a new `Exchange`; `seen` names the
    exchange's attributes to note as `step` returns (before its coroutine runs)."""
    made: list[Ran] = []

    def answer_error(request: Request, ran: Ran, error: ProxyError) -> None:
        ran.error = error
        request.respond(error.status, None, (), str(error.reason).encode())

    def handler(request: Request) -> Awaitable[None] | None:
        ex = Exchange(request, parts.runtime, "rid-test", time.perf_counter())
        ran = Ran(ex, None, b"")
        made.append(ran)
        try:
            rest = step(ex)
            if rest is TokenMissing:  # `begin` says so without raising (app.py answers it as raised)
                assert ex.plan is not None
                raise TokenMissing(ex.plan.missing)
        except ProxyError as error:
            answer_error(request, ran, error)
            return None
        ran.begun = {name: getattr(ex, name) for name in seen}
        if rest is None:
            return None

        async def finish() -> None:
            try:
                await rest
            except ProxyError as error:
                answer_error(request, ran, error)

        return finish()

    server = Server(handler)
    await server.listen("127.0.0.1", 0)
    try:
        host, port = server.sockets[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await server.shutdown(0)
    (ran,) = made
    ran.answer = answer
    return ran
