"""`jwt-sidecar demo`: the whole picture on loopback in one command.

Owns: a throwaway signing key made at start, a tiny issuer that serves its JWK Set where the
config's demo provider looks for it, an echo upstream where the config sends traffic, the
sidecar itself (the real `server.serve`, with the given config), and the tokens and curl
lines it prints (with a `revocation:` in the config, a `jwt-sidecar revoke` line and the curl
it turns into a 401; a revocation file is the demo's own: the sidecar serves a temporary copy
of the config, so a relative file starts empty each time). Also its four ports: each is the
config's unless given on the command line, and one of the config's that is taken gives way to
a free one (then that copy has the ports chosen); a port given that is taken stops the
demo (startup.py's one line). Printed commands name `jwt-sidecar` by its absolute path.
Does not own: any proxy behaviour; everything it shows is the real path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.resources
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..config import builder as config
from ..config.settings import Listen, Provider, RemoteJwks, Settings
from ..ops.server import serve
from ..ops.startup import Sockets, StartupError, bind, why
from .keygen import generate, mint

__all__ = ["OPTIONS", "ROLES", "DemoInfo", "command", "default_config_path", "run_demo"]

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
    command: str = "jwt-sidecar"
    """How to run `jwt-sidecar` without activating its virtual environment."""
    config: str = "config.yaml"
    """The config the sidecar serves (a copy with the ports it chose, when it moved any)."""
    places: tuple[str, ...] = ()
    """One line per listener: what it is, its URL, and which taken port it replaced."""
    revocation: bool = False
    """Whether the config keeps a revocation file: then the demo shows a revocation too."""

    def instructions(self) -> str:
        return "\n".join(
            [
                "",
                "jwt-sidecar demo is running:",
                *(f"  {place}" for place in self.places),
                "",
                "In another terminal:",
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
                "  # every check, one by one",
                f"  {self.command} token explain --config {shlex.quote(self.config)} $TOKEN",
                "",
                *(
                    [
                        "  # revoke alice's tokens: within a second the same curl is refused (401, reason revoked)",
                        f"  {self.command} revoke --sub alice --ttl 1h --config {shlex.quote(self.config)}",
                        f'  curl -si -H "Authorization: Bearer $TOKEN" {self.base}/api/hello',
                        "",
                    ]
                    if self.revocation
                    else []
                ),
                "Ctrl-C stops everything.",
                "",
            ]
        )


def command() -> str:
    """The `jwt-sidecar` this process runs, as a path that works without activating its venv:
    the script installed next to this Python, else this Python with `-m proxy`."""
    script = Path(sys.executable).parent / "jwt-sidecar"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m proxy"


def _demo_provider(settings: Settings) -> Provider:
    for provider in settings.providers.values():
        if isinstance(provider.keys, RemoteJwks) and provider.keys.url and _loopback(provider.keys.url):
            return provider
    raise config.ConfigError(
        [
            config.ConfigIssue(
                settings.source,
                None,
                "providers",
                "the demo needs a provider whose jwks.url is on loopback (127.0.0.1), as in the repository's config.yaml",
            )
        ]
    )


def _jwks_url(provider: Provider) -> str:
    """The JWKS URL of the provider `_demo_provider` chose, which has one."""
    assert isinstance(provider.keys, RemoteJwks) and provider.keys.url is not None
    return provider.keys.url


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "upstream": "jwt-sidecar demo echo",
            "method": request.method,
            "path": request.raw_path,
            "identity": {k: v for k, v in request.headers.items() if k.lower().startswith(("x-user-", "x-jwt-"))},
            "headers": dict(request.headers),
            "body_bytes": len(body),
        }
    )


ROLES = ("listen", "admin", "issuer", "upstream")
"""The demo's listeners, as `run_demo(ports=...)` names them: the sidecar, its admin endpoints,
the issuer serving the JWK Set, the echo upstream. Their default ports are the config's."""
OPTIONS = {"listen": "--port", "admin": "--admin-port", "issuer": "--issuer-port", "upstream": "--upstream-port"}
_CONFIG_KEYS = {"listen": "listen", "admin": "admin", "issuer": "jwks.url", "upstream": "upstream.url"}


def _addresses(settings: Settings, provider: Provider) -> dict[str, Listen]:
    issuer, upstream = urlsplit(_jwks_url(provider)), urlsplit(settings.upstream.url)
    return {
        "listen": settings.listen,
        "admin": settings.admin,
        "issuer": Listen(host=issuer.hostname or "127.0.0.1", port=issuer.port or 80),
        "upstream": Listen(host=upstream.hostname or "127.0.0.1", port=upstream.port or 80),
    }


def _bind(role: str, address: Listen, explicit: bool, avoid: set[int]) -> list[socket.socket]:
    """The port asked for on the command line, or else the config's, or else (when that one is
    in use) a free one: a demo should start where common dev ports are taken. The next ports
    up are tried first (8081 for 8080: easy to read), except those in `avoid` (the other
    listeners'), then any free one the system gives."""
    try:
        return bind(address, OPTIONS[role] if explicit else _CONFIG_KEYS[role])
    except StartupError as error:
        if explicit or error.errno != errno.EADDRINUSE:
            raise
    for port in range(address.port + 1, min(address.port + 10, 65536)):
        if port in avoid:
            continue
        try:
            return bind(Listen(host=address.host, port=port), _CONFIG_KEYS[role])
        except StartupError as error:
            if error.errno != errno.EADDRINUSE:
                raise
    for _ in range(10):  # `localhost` may be two addresses, each given its own free port
        sockets = bind(Listen(host=address.host, port=0), _CONFIG_KEYS[role])
        port = sockets[0].getsockname()[1]
        if all(sock.getsockname()[1] == port for sock in sockets):
            return sockets
        for sock in sockets:
            sock.close()
        try:
            return bind(Listen(host=address.host, port=port), _CONFIG_KEYS[role])
        except StartupError as error:
            if error.errno != errno.EADDRINUSE:
                raise
    raise StartupError(f"found no free port on {address.host} for the demo's {role}")


def _with_ports(text: str, moves: dict[Listen, int]) -> str:
    """The config's text with each moved address (as written: `127.0.0.1:8080`, also inside
    `http://127.0.0.1:8090/`) on its new port, in one pass so one move never feeds another."""
    spelled = {str(old): str(Listen(host=old.host, port=port)) for old, port in moves.items()}
    pattern = "|".join(re.escape(old) for old in spelled)
    return re.sub(rf"(?<![\w.\-\[:])(?:{pattern})(?!\d)", lambda m: spelled[m.group(0)], text)


def _origin(address: Listen) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"http://{Listen(host=host, port=address.port)}"


async def run_demo(
    config_path: Path,
    *,
    stop: asyncio.Event | None = None,
    announce: Callable[[str], None] = print,
    ports: Mapping[str, int] | None = None,
) -> None:
    """Run the demo until `stop` (or SIGINT/SIGTERM). `ports` (keys from `ROLES`) must be had
    exactly; every other listener takes its config port, or a free one when that is in use."""
    ports = ports or {}
    settings = config.load(config_path)
    provider = _demo_provider(settings)
    if not _loopback(settings.upstream.url):
        raise config.ConfigError(
            [
                config.ConfigIssue(
                    settings.source, None, "upstream.url", "the demo runs its echo upstream on loopback; use 127.0.0.1"
                )
            ]
        )
    # Every port is had (bound and listening) before anything starts, so none can be lost to
    # another process between choosing it and using it.
    wanted = _addresses(settings, provider)
    bound: dict[str, list[socket.socket]] = {}
    runners: list[web.AppRunner] = []
    directory: str | None = None
    try:
        avoid = {ports.get(role, wanted[role].port) for role in ROLES}
        # The ports asked for first: a config port that is one of them gives way, not the other way round.
        for role in sorted(ROLES, key=lambda role: role not in ports):
            address = Listen(host=wanted[role].host, port=ports.get(role, wanted[role].port))
            bound[role] = _bind(role, address, role in ports, avoid)
        chosen = {role: bound[role][0].getsockname()[1] for role in ROLES}
        moves = {wanted[role]: chosen[role] for role in ROLES if chosen[role] != wanted[role].port}
        served_path = config_path
        # A revocation file named relative to the config: the demo's own, in its copy's folder,
        # empty at each start (a revocation from an earlier demo must not refuse today's tokens,
        # and the package's folder is no place to write).
        own_list = settings.revocation is not None and settings.revocation.file is not None
        if moves or own_list:
            # The sidecar serves (and reloads, and `token explain` and `revoke` read) a copy with
            # the ports it has.
            try:
                directory = tempfile.mkdtemp(prefix="jwt-sidecar-demo-")
                served_path = Path(directory) / "config.yaml"
                text = config_path.read_text(encoding="utf-8")
                served_path.write_text(_with_ports(text, moves) if moves else text, encoding="utf-8")
            except OSError as error:
                raise StartupError(
                    f"the demo cannot write its copy of {config_path} (its ports, its own revocation list) to the "
                    f"temporary directory: {why(error)}; set TMPDIR to a writable directory"
                ) from None
            settings = config.load(served_path)
            provider = _demo_provider(settings)
            now_at = _addresses(settings, provider)
            for role in ROLES:
                if now_at[role].port != chosen[role]:
                    raise StartupError(
                        f"the demo's {role} is on port {chosen[role]}, but {wanted[role]} is not "
                        f"written that way in {config_path}; give {_CONFIG_KEYS[role]} as "
                        f"host:port, or free port {wanted[role].port}"
                    )
        key = generate("RS256", DEMO_KID)

        async def serve_jwks(request: web.Request) -> web.Response:
            return web.json_response({"keys": [key.public_jwk]})

        issuer_app = web.Application()
        issuer_app.router.add_get(urlsplit(_jwks_url(provider)).path, serve_jwks)
        upstream_app = web.Application(client_max_size=0)
        upstream_app.router.add_route("*", "/{tail:.*}", _echo)
        for app, role in ((issuer_app, "issuer"), (upstream_app, "upstream")):
            runner = web.AppRunner(app, access_log=None)
            runners.append(runner)
            await runner.setup()
            for sock in bound[role]:
                await web.SockSite(runner, sock).start()
        now = time.time()

        def token(scope: str) -> str:
            return mint(
                private_key_pem=key.private_pem,
                secret=None,
                alg="RS256",
                kid=DEMO_KID,
                iss=provider.issuers[0],
                aud=[provider.audiences[0]],
                sub="alice",
                ttl_seconds=3600,
                claims={"email": "alice@example.com", "email_verified": True, "scope": scope},
                now=now,
            )

        at = _addresses(settings, provider)

        def place(name: str, role: str, url: str, note: str = "") -> str:
            moved = f"{wanted[role].port} was taken" if role not in ports and chosen[role] != wanted[role].port else ""
            notes = "; ".join(n for n in (note, moved) if n)
            return f"{name:<9}{url}" + (f"   ({notes})" if notes else "")

        info = DemoInfo(
            base=_origin(at["listen"]),
            user_token=token("orders:read"),
            admin_token=token("orders:read admin"),
            command=command(),
            config=str(served_path.resolve()),
            places=(
                place("sidecar", "listen", _origin(at["listen"])),
                place("admin", "admin", _origin(at["admin"]) + "/readyz"),
                place("issuer", "issuer", _jwks_url(provider)),
                place("upstream", "upstream", settings.upstream.url, "echoes what it receives"),
                f"{'config':<9}{served_path.resolve()}"
                + (
                    f"   (a copy of {config_path} with these ports)"
                    if moves
                    else f"   (a copy of {config_path} with a revocation list of its own)"
                    if own_list
                    else ""
                ),
            ),
            revocation=settings.revocation is not None,
        )
        stop = stop or asyncio.Event()
        sockets = Sockets(listen=bound.pop("listen"), admin=bound.pop("admin"))
        serving = asyncio.create_task(serve(settings, config_path=str(served_path), stop=stop, sockets=sockets))
        try:
            await _wait_ready(settings, serving)
        except StartupError:
            stop.set()
            with contextlib.suppress(Exception):
                await serving
            raise
        if not serving.done():  # not stopped (Ctrl-C) while it was starting
            announce(info.instructions())
        await serving
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for sockets_of_role in bound.values():
            for sock in sockets_of_role:
                sock.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


async def _wait_ready(settings: Settings, serving: asyncio.Task[None]) -> None:
    url = _origin(settings.admin) + "/readyz"
    reason = "no answer"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            if serving.done():
                serving.result()  # raises what stopped it, if anything did
                return
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
                    reason = (await response.json(content_type=None)).get("reason", reason)
            except (aiohttp.ClientError, ValueError, AttributeError):
                pass
            await asyncio.sleep(0.1)
    # A config with a second provider whose issuer cannot be reached, say.
    raise StartupError(f"the demo's sidecar was not ready after 10s: {reason}")
