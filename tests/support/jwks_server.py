"""A JWKS server on loopback for tests: rotate keys, fail, answer slowly, count requests.

Owns: an aiohttp app serving `/jwks.json` (a document the test replaces to rotate keys) and
`/.well-known/openid-configuration` (OIDC discovery pointing at that JWKS), with a `mode`
switch for the ways a real issuer goes wrong. Does not own: starting the server (the
`jwks_server` fixture in conftest.py does that with pytest-aiohttp's `aiohttp_server`).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = ["DISCOVERY_PATH", "JWKS_PATH", "MODES", "JwksServer", "start_jwks_server"]

JWKS_PATH = "/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
MODES = ("ok", "fail", "garbage", "slow", "not_a_set")
"""ok: serve the document; fail: HTTP 500; garbage: 200 with non-JSON; slow: sleep `delay`
seconds, then serve; not_a_set: 200 with a JSON object that is no JWK Set."""


class JwksServer:
    """The state a test steers: assign `document`, `mode`, `delay` or `issuer` at any time."""

    def __init__(self, document: dict[str, Any] | None = None, *, issuer: str = "https://issuer.test") -> None:
        self.document: dict[str, Any] = document if document is not None else {"keys": []}
        self.mode = "ok"
        self.delay = 2.0
        self.issuer = issuer
        self.jwks_uri: str | None = None
        """What discovery advertises as `jwks_uri`; None means this server's `/jwks.json`."""
        self.chunked = False
        """Send bodies chunked, without Content-Length (so a reader cannot know the size up front)."""
        self.requests: Counter[str] = Counter()
        """Requests seen per path (all of them, whatever the mode)."""
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._jwks)
        app.router.add_get(DISCOVERY_PATH, self._discovery)
        return app

    def url(self, path: str = JWKS_PATH) -> str:
        if self.server is None:
            raise RuntimeError("the JWKS server is not started")
        return str(self.server.make_url(path))

    async def _answer(self, request: web.Request, body: Callable[[], Any]) -> web.StreamResponse:
        self.requests[request.path] += 1
        mode = self.mode
        if mode not in MODES:
            raise AssertionError(f"unknown JwksServer mode {mode!r}; use one of {MODES}")
        if mode == "fail":
            return web.Response(status=500, text="internal error")
        if mode == "garbage":
            return web.Response(status=200, text="<html>not json</html>", content_type="application/json")
        if mode == "not_a_set":
            return web.json_response({"foo": 1})
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if not self.chunked:
            return web.json_response(body())
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = json.dumps(body()).encode()
        for start in range(0, len(data), 64 * 1024):
            await response.write(data[start : start + 64 * 1024])
        await response.write_eof()
        return response

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, lambda: self.document)

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(
            request,
            lambda: {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_uri if self.jwks_uri is not None else self.url(JWKS_PATH),
            },
        )


async def start_jwks_server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    document: dict[str, Any] | None = None,
    **options: Any,
) -> JwksServer:
    """Start a `JwksServer` with pytest-aiohttp's `aiohttp_server` (which also stops it)."""
    jwks = JwksServer(document, **options)
    jwks.server = await aiohttp_server(jwks.app())
    return jwks
