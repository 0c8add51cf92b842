"""`jwt-sidecar run` with `log_format: json`: every stderr line is a JSON object that says what happened.

A real sidecar process between real JWKS servers and a real upstream on loopback: its keys
load and rotate, reloads apply and are refused, the config file disappears, issuers fail in
every way a network can; every line of its stderr must parse as JSON, and the events and
their fields must tell an on-call engineer what happened and why, with the access log
(stdout) naming each refused token's reason, route and provider.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.base import oplog
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint, refused_port
from tests.support.jwks_server import start_jwks_server
from tests.support.process import free_port, running
from tests.support.tls import self_signed_context
from tests.support.upstream import start_upstream


def provider(name: str, url: str, timeout: str = "2s") -> str:
    return (
        f"  {name}:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n"
        f'    jwks: {{url: "{url}", min_refresh_interval: 1s, timeout: {timeout}}}\n'
    )


def config_text(upstream: str, providers: str, routes: str, *, listen: int, admin: int, extra: str = "") -> str:
    return (
        f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\n"
        f'upstream: {{url: "{upstream}", timeout: 2s, connect_timeout: 1s}}\n'
        f"providers:\n{providers}routes:\n{routes}{extra}"
    )


@dataclass
class Run:
    proc: asyncio.subprocess.Process
    listen: int
    admin: int
    config: Path
    err: list[dict[str, Any]] = field(default_factory=list)
    out: list[dict[str, Any]] = field(default_factory=list)
    _raw_err: bytearray = field(default_factory=bytearray)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["event"] == name]

    def lines(self) -> list[dict[str, Any]]:
        """Every stderr line so far, each parsed as JSON (a line that is not fails the test)."""
        text = self._raw_err.decode()
        complete = text[: text.rfind("\n") + 1]
        parsed = []
        for line in complete.splitlines():
            try:
                parsed.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON line on stderr: {line!r}") from None
        return parsed

    async def wait_for(
        self, name: str, check: Callable[[dict[str, Any]], bool] = lambda _: True, timeout: float = 10.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.events(name):
                if check(line):
                    return line
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {name} event within {timeout}s; stderr: {self._raw_err.decode()[-3000:]}")


@asynccontextmanager
async def sidecar(tmp_path: Path, text: str, *args: str, listen: int, admin: int) -> AsyncIterator[Run]:
    """`run` with the config `text` (which names `listen` and `admin`), up (/healthz) whether or
    not it has keys; stopped with SIGTERM (status 0) when the body ends, its lines parsed."""
    async with running(tmp_path, text, *args, ready="/healthz") as process:
        run = Run(process.proc, listen, admin, process.config, _raw_err=process.err)
        yield run
        assert await process.stop() == 0
    run.err = run.lines()
    run.out = [json.loads(line) for line in process.out.decode().splitlines()]


# Fields that are counts, durations or ids: JSON numbers, never their text.
NUMBERS = (
    "at_most",
    "deaths",
    "delay",
    "drain_delay",
    "drain_timeout",
    "duration_ms",
    "index",
    "keys",
    "keys_held",
    "line",
    "max_connections",
    "open_files",
    "pid",
    "seconds",
    "skipped",
    "status",
    "target",
    "window",
    "worker",
    "workers",
    "suppressed",
)
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def assert_every_line_is_a_full_json_record(lines: list[dict[str, Any]]) -> None:
    """Each line: the documented members first, an RFC 3339 UTC time, an event of oplog.EVENTS
    at one of its levels (or a library's message), numbers as numbers, tracebacks as a member."""
    assert lines
    for line in lines:
        assert list(line)[:5] == ["time", "level", "logger", "event", "message"], line
        assert RFC3339_UTC.fullmatch(line["time"]), line
        assert line["level"] in ("DEBUG", "INFO", "WARNING", "ERROR"), line
        assert isinstance(line["message"], str) and isinstance(line["logger"], str), line
        if line["event"] != oplog.LIBRARY:
            assert line["level"] in oplog.EVENTS[line["event"]][0], line
        for name in NUMBERS:
            if line.get(name) is not None:
                assert isinstance(line[name], int | float) and not isinstance(line[name], bool), (name, line)
        assert "traceback" not in line or isinstance(line["traceback"], str)
        assert "Traceback (most recent call last)" not in line["message"], line


async def get(port: int, path: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response,
    ):
        return response.status


ROUTES = "  - {name: api, match: {path_prefix: /}, auth: {provider: main}}\n"


async def test_keys_rotation_reloads_and_a_vanished_config_are_json_events(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey, rsa_key_2: TestKey
) -> None:
    upstream = await start_upstream(aiohttp_server)
    jwks = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    listen, admin = free_port(), free_port()
    text = config_text(
        upstream.url, provider("main", jwks.url()), ROUTES, listen=listen, admin=admin, extra="log_format: json\n"
    )
    async with sidecar(tmp_path, text, listen=listen, admin=admin) as run:
        loaded = await run.wait_for("keys_loaded")
        assert loaded["level"] == "INFO" and loaded["provider"] == "main" and loaded["url"] == jwks.url()
        assert loaded["peer"] == f"127.0.0.1:{jwks.server.port}"  # type: ignore[union-attr]
        assert loaded["kids_added"] == [rsa_key.kid] and loaded["kids_removed"] == [] and loaded["keys"] == 1
        assert isinstance(loaded["duration_ms"], float | int) and loaded["duration_ms"] >= 0
        ready = await run.wait_for("provider_ready")
        assert ready["provider"] == "main"

        # The issuer rotates: a token with the new kid makes the sidecar fetch again.
        jwks.document = jwks_of(rsa_key_2)
        assert await get(listen, "/x", mint(key=rsa_key_2)) == 200
        changed = await run.wait_for("keys_loaded", lambda line: line["kids_added"] == [rsa_key_2.kid])
        assert changed["level"] == "INFO" and changed["kids_removed"] == [rsa_key.kid]
        assert "key set changed" in changed["message"]

        # A token that fails: the access log says why, on which route, for which provider.
        assert await get(listen, "/x", mint({"exp": int(time.time()) - 3600}, key=rsa_key_2)) == 401
        assert await get(listen, "/x", mint(key=rsa_key)) == 401  # its key was rotated out

        # A reload that adds a route and changes the provider.
        more = "  - {name: health, match: {path_prefix: /health}, auth: none}\n" + ROUTES
        run.config.write_text(
            config_text(
                upstream.url,
                provider("main", jwks.url()).replace(f"audiences: [{AUDIENCE}]", f"audiences: [{AUDIENCE}, other]"),
                more,
                listen=listen,
                admin=admin,
                extra="log_format: json\n",
            )
        )
        run.proc.send_signal(signal.SIGHUP)
        applied = await run.wait_for("reload_applied")
        assert applied["routes_added"] == ["health"] and applied["providers_changed"] == ["main"]
        assert "routes_removed" not in applied and applied["file"] == str(run.config)

        # A reload that is refused names the file's line.
        run.config.write_text(text.replace("log_format: json\n", "log_format: json\nrealm: [not, a, string]\n"))
        run.proc.send_signal(signal.SIGHUP)
        refused = await run.wait_for("reload_refused")
        assert refused["level"] == "ERROR" and refused["line"] == text.count("\n") + 1
        assert refused["issues"] == [
            {"line": refused["line"], "key": "realm", "problem": refused["issues"][0]["problem"]}
        ]
        assert "previous config keeps serving" in refused["message"]

        # The file goes away: said once, and the last good config keeps serving.
        run.config.unlink()
        missing = await run.wait_for("config_missing", timeout=8)
        assert missing["level"] == "WARNING" and missing["file"] == str(run.config)
        assert await get(listen, "/health") == 200

    assert_every_line_is_a_full_json_record(run.err)
    assert len(run.events("config_missing")) == 1
    refusals = [line for line in run.out if line.get("status") == 401]
    assert [(r["reason"], r["route"], r["provider"]) for r in refusals] == [
        ("expired", "api", "main"),
        ("unknown_kid", "api", "main"),
    ]
    assert run.events("stopped")


async def test_every_way_an_issuer_fails_is_named_with_its_peer_and_cause(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey
) -> None:
    upstream = await start_upstream(aiohttp_server)
    failing = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    failing.mode = "fail"
    not_a_set = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    not_a_set.mode = "not_a_set"

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up; never a byte of answer

    silent = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    tls = await asyncio.start_server(never_answers, "127.0.0.1", 0, ssl=self_signed_context(tmp_path))
    closed, silent_port, tls_port = refused_port(), silent.sockets[0].getsockname()[1], tls.sockets[0].getsockname()[1]
    providers = {
        "refused": (f"http://127.0.0.1:{closed}/jwks.json", f"127.0.0.1:{closed}", "connection refused"),
        "status": (
            failing.url(),
            f"127.0.0.1:{failing.server.port}",  # type: ignore[union-attr]
            f"HTTP 500 from {failing.url()}",
        ),
        "notset": (
            not_a_set.url(),
            f"127.0.0.1:{not_a_set.server.port}",  # type: ignore[union-attr]
            'not a JWK Set: expected a JSON object with a "keys" array',
        ),
        "silent": (f"http://127.0.0.1:{silent_port}/jwks.json", f"127.0.0.1:{silent_port}", "timed out after 0.5s"),
        "selfsigned": (
            f"https://127.0.0.1:{tls_port}/jwks.json",
            f"127.0.0.1:{tls_port}",
            "TLS: certificate verify failed: self-signed certificate",
        ),
        "nodns": (
            f"http://nonexistent.invalid:{closed}/jwks.json",
            f"nonexistent.invalid:{closed}",
            "DNS: name not found",
        ),
    }
    listen, admin = free_port(), free_port()
    routes = "".join(
        f"  - {{name: {name}, match: {{path_prefix: /{name}/}}, auth: {{provider: {name}}}}}\n" for name in providers
    )
    text = config_text(
        upstream.url,
        "".join(provider(name, url, "0.5s") for name, (url, _, _) in providers.items()),
        routes,
        listen=listen,
        admin=admin,
    )
    try:
        # The file says text; the command line wins.
        async with sidecar(tmp_path, text, "--log-format", "json", listen=listen, admin=admin) as run:
            for name in providers:
                await run.wait_for("provider_unready", lambda line, name=name: line["provider"] == name)
            assert await get(listen, "/refused/x", mint(key=rsa_key)) == 503
    finally:
        for server in (silent, tls):
            server.close()

    assert_every_line_is_a_full_json_record(run.err)
    for name, (url, peer, cause) in providers.items():
        [first, *_] = [line for line in run.events("key_fetch_failed") if line["provider"] == name]
        assert (first["url"], first["peer"], first["cause"]) == (url, peer, cause), first
        assert first["level"] == "WARNING" and first["keys_held"] == 0
        assert cause in first["message"] and "Error" not in first["message"], first["message"]
        [unready] = [line for line in run.events("provider_unready") if line["provider"] == name]
        assert (unready["peer"], unready["cause"]) == (peer, cause)
    [refusal] = [line for line in run.out if line.get("status") == 503]
    assert (refusal["reason"], refusal["route"], refusal["provider"]) == ("no_keys", "refused", "refused")


async def test_an_unreachable_upstream_is_logged_with_its_peer_and_cause(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey
) -> None:
    jwks = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    listen, admin, closed = free_port(), free_port(), free_port()
    text = config_text(
        f"http://127.0.0.1:{closed}",
        provider("main", jwks.url()),
        ROUTES,
        listen=listen,
        admin=admin,
        extra="log_format: json\n",
    )
    async with sidecar(tmp_path, text, listen=listen, admin=admin) as run:
        await run.wait_for("provider_ready")
        assert await get(listen, "/x", mint(key=rsa_key)) == 502
        line = await run.wait_for("request_refused")
    assert line["level"] == "WARNING" and line["reason"] == "upstream_unavailable" and line["status"] == 502
    assert line["detail"] == f"http://127.0.0.1:{closed}: cannot connect to 127.0.0.1:{closed}: connection refused"
    assert (line["route"], line["provider"]) == ("api", "main")
    assert_every_line_is_a_full_json_record(run.err)


async def test_every_process_of_workers_writes_json(tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey) -> None:
    upstream = await start_upstream(aiohttp_server)
    jwks = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    listen, admin = free_port(), free_port()
    text = config_text(
        upstream.url, provider("main", jwks.url()), ROUTES, listen=listen, admin=admin, extra="workers: 2\n"
    )
    async with sidecar(tmp_path, text, "--log-format", "json", listen=listen, admin=admin) as run:
        await run.wait_for("workers_started")
        for _ in range(2):
            await run.wait_for("provider_ready", lambda line: len(run.events("provider_ready")) >= 2)
    assert_every_line_is_a_full_json_record(run.err)
    # One per worker (each fetches its own keys), each saying which worker it is.
    assert sorted(line["worker"] for line in run.events("keys_loaded")) == [0, 1]
    assert sorted(line["worker"] for line in run.events("stopped")) == [0, 1]
    assert run.events("workers_started")[0]["worker"] == 0  # the set's line, from worker 0 that supervises it
