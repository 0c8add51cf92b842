"""`jwt-sidecar demo`: the whole picture on loopback in one command.

Owns: a throwaway signing key made at start, a tiny issuer that serves its JWK Set where the
config's demo provider looks for it, an echo upstream where the config sends traffic, the
sidecar itself (the real `server.serve`, with the given config), and the tokens and curl
lines it prints. Does not own: any proxy behaviour; everything it shows is the real path.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from . import config
from .config import Provider, RemoteJwks, Settings
from .keygen import generate, mint
from .server import serve

__all__ = ["DemoInfo", "default_config_path", "run_demo"]

DEMO_KID = "demo-key"


def default_config_path() -> Path:
    """./config.yaml when there is one, else the copy shipped inside the package."""
    local = Path("config.yaml")
    if local.is_file():
        return local
    return Path(str(importlib.resources.files("proxy") / "default_config.yaml"))


@dataclass(frozen=True)
class DemoInfo:
    base: str
    user_token: str
    admin_token: str

    def instructions(self) -> str:
        return "\n".join([
            "",
            "jwt-sidecar demo is running. In another terminal:",
            "",
            f"  TOKEN={self.user_token}",
            f"  ADMIN={self.admin_token}",
            "",
            "  # allowed: the echo upstream shows the identity headers the sidecar injected",
            f'  curl -s -H "Authorization: Bearer $TOKEN" {self.base}/api/hello',
            "  # 401: no token",
            f"  curl -si {self.base}/api/hello",
            "  # 403: a valid token without the admin scope",
            f'  curl -si -H "Authorization: Bearer $TOKEN" {self.base}/admin/users',
            "  # allowed on the admin route: this token has the admin scope",
            f'  curl -s -H "Authorization: Bearer $ADMIN" {self.base}/admin/users',
            "  # a spoofed identity header never reaches the upstream",
            f'  curl -s -H "X-User-Id: root" {self.base}/public/info',
            "",
            "  jwt-sidecar token explain $TOKEN    # every check, one by one",
            "",
            "Ctrl-C stops everything.",
            "",
        ])


def _demo_provider(settings: Settings) -> Provider:
    for provider in settings.providers.values():
        if isinstance(provider.keys, RemoteJwks) and provider.keys.url and _loopback(provider.keys.url):
            return provider
    raise config.ConfigError([config.ConfigIssue(
        settings.source, None, "providers",
        "the demo needs a provider whose jwks.url is on loopback (127.0.0.1), as in the repository's config.yaml")])


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "upstream": "jwt-sidecar demo echo",
        "method": request.method,
        "path": request.raw_path,
        "identity": {k: v for k, v in request.headers.items() if k.lower().startswith(("x-user-", "x-jwt-"))},
        "headers": dict(request.headers),
        "body_bytes": len(body),
    })


async def _start(app: web.Application, url: str) -> web.AppRunner:
    parts = urlsplit(url)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, parts.hostname, parts.port or 80).start()
    return runner


async def run_demo(config_path: Path, *, stop: asyncio.Event | None = None,
                   announce: Callable[[str], None] = print) -> None:
    settings = config.load(config_path)
    provider = _demo_provider(settings)
    if not _loopback(settings.upstream.url):
        raise config.ConfigError([config.ConfigIssue(settings.source, None, "upstream.url",
                                                     "the demo runs its echo upstream on loopback; use 127.0.0.1")])
    key = generate("RS256", DEMO_KID)
    jwks_url = provider.keys.url  # type: ignore[union-attr]

    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [key.public_jwk]})

    issuer_app = web.Application()
    issuer_app.router.add_get(urlsplit(jwks_url).path, serve_jwks)
    upstream_app = web.Application(client_max_size=0)
    upstream_app.router.add_route("*", "/{tail:.*}", _echo)
    runners = [await _start(issuer_app, jwks_url), await _start(upstream_app, settings.upstream.url)]
    now = time.time()

    def token(scope: str) -> str:
        return mint(private_key_pem=key.private_pem, secret=None, alg="RS256", kid=DEMO_KID,
                    iss=provider.issuers[0], aud=[provider.audiences[0]], sub="alice", ttl_seconds=3600,
                    claims={"email": "alice@example.com", "email_verified": True, "scope": scope}, now=now)

    host = settings.listen.host if settings.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
    info = DemoInfo(base=f"http://{host}:{settings.listen.port}", user_token=token("orders:read"),
                    admin_token=token("orders:read admin"))
    stop = stop or asyncio.Event()
    try:
        serving = asyncio.create_task(serve(settings, config_path=str(config_path), stop=stop))
        await _wait_ready(settings, serving)
        announce(info.instructions())
        await serving
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _wait_ready(settings: Settings, serving: asyncio.Task[None]) -> None:
    host = settings.admin.host if settings.admin.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{settings.admin.port}/readyz"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            if serving.done():
                serving.result()  # raises what stopped it (a port in use, …)
                return
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the sidecar did not become ready at {url}")
