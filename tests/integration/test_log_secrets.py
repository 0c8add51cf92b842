"""No token, secret, credential or query string ever reaches a log line or `token explain`'s output.

A real sidecar at `log_level: DEBUG` (both formats) whose JWKS and upstream URLs carry
passwords, whose HS secret comes from the environment, is sent tokens that pass and fail in
every way, in the Authorization header, a cookie and the query string, next to other
cookies, query parameters and a Basic credential; a JWKS host that is down and a reload make
the key and config events happen too. Then every byte it wrote to stderr and stdout is
searched for each of those secrets; and `token explain` (which prints the token's decoded
header and claims on purpose) must not print the secret, the passwords or the signature.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint, refused_port
from tests.support.jwks_server import start_jwks_server
from tests.support.process import REPO, free_port, running
from tests.support.upstream import start_upstream

HS_SECRET = secrets.token_urlsafe(48)  # utf-8 text, long enough for HS256
JWKS_PASSWORD = "JWKSPASSWORD42"
DOWN_PASSWORD = "DOWNPASSWORD42"
UPSTREAM_PASSWORD = "UPSTREAMPASSWORD42"
DISCOVERED_PASSWORD = "DISCOVEREDPASSWORD42"
# Some issuers put an API key in the JWKS or discovery URL's query string.
JWKS_QUERY_SECRET = "JWKSAPIKEY42"
DOWN_QUERY_SECRET = "DOWNAPIKEY42"
DISCOVERY_QUERY_SECRET = "DISCOVERYAPIKEY42"
DISCOVERED_QUERY_SECRET = "DISCOVEREDAPIKEY42"
QUERY_SECRET = "QUERYSECRET42"
COOKIE_SECRET = "COOKIESECRET42"
BASIC_SECRET = "QkFTSUNTRUNSRVQ0Mg"


def config(log_format: str, listen: int, admin: int, upstream: str, jwks: str, down: int, discovery: str) -> str:
    def provider(name: str, source: str) -> str:
        return f"  {name}:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    {source}\n"

    return (
        f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nlog_level: DEBUG\nlog_format: {log_format}\n"
        f'upstream: {{url: "{upstream}", timeout: 2s, connect_timeout: 1s}}\n'
        "providers:\n"
        + provider("main", f'jwks: {{url: "{jwks}", min_refresh_interval: 1s}}')
        + provider("hs", "secret: {env: LOG_SECRETS_HS}\n    algorithms: [HS256]")
        + provider(
            "down",
            f'jwks: {{url: "http://jwks:{DOWN_PASSWORD}@127.0.0.1:{down}/jwks.json?api_key={DOWN_QUERY_SECRET}", '
            "min_refresh_interval: 1s, timeout: 1s}",
        )
        + provider("disco", f'discovery: {{url: "{discovery}", min_refresh_interval: 1s, timeout: 1s}}')
        + "routes:\n"
        "  - {name: hs, match: {path_prefix: /hs/}, auth: {provider: hs}}\n"
        "  - {name: down, match: {path_prefix: /down/}, auth: {provider: down}}\n"
        "  - {name: disco, match: {path_prefix: /disco/}, auth: {provider: disco}}\n"
        f"  - {{name: broken, match: {{path_prefix: /broken/}}, auth: none, upstream: {{url: "
        f'"http://app:{UPSTREAM_PASSWORD}@127.0.0.1:{down}"}}}}\n'
        "  - {name: api, match: {path_prefix: /}, auth: {provider: main},"
        " token_sources: [bearer, {cookie: access_token}, {query: access_token}]}\n"
    )


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_reaches_a_log_line_or_explain(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey, log_format: str
) -> None:
    upstream = await start_upstream(aiohttp_server)
    jwks = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    # An issuer whose discovery document names its JWKS URL with credentials in it.
    jwks.jwks_uri = jwks.url().replace("http://", f"http://keys:{DISCOVERED_PASSWORD}@")
    jwks.jwks_uri += f"?api_key={DISCOVERED_QUERY_SECRET}"
    listen, admin, down = free_port(), free_port(), refused_port()
    upstream_url = upstream.url.replace("http://", f"http://app:{UPSTREAM_PASSWORD}@")
    jwks_url = jwks.url().replace("http://", f"http://keys:{JWKS_PASSWORD}@") + f"?api_key={JWKS_QUERY_SECRET}"
    discovery = jwks.url("/.well-known/openid-configuration") + f"?client={DISCOVERY_QUERY_SECRET}&x"
    text = config(log_format, listen, admin, upstream_url, jwks_url, down, discovery)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOG_SECRETS_HS": HS_SECRET}

    good = mint(key=rsa_key)
    tokens = {
        "good": good,
        "expired": mint({"exp": int(time.time()) - 3600}, key=rsa_key),
        "bad_signature": good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB"),
        "unknown_kid": mint(key=rsa_key, headers={"kid": "nope"}),
        "hs_good": mint(secret=HS_SECRET.encode()),
        "hs_wrong": mint(secret=b"another-secret-" + b"x" * 40),
        "down": mint(key=rsa_key),
        "garbage": "GARBAGETOKEN42.not.ajwt",
    }

    async with running(tmp_path, text, ready=None, env=env) as run:
        path, err = run.config, run.err
        async with aiohttp.ClientSession() as session:
            await run.wait_for(
                lambda logs: all(f"provider {name} is ready" in logs for name in ("main", "hs", "disco")), timeout=30
            )
            statuses = []

            async def send(where: str, **options: Any) -> None:
                async with session.get(f"http://127.0.0.1:{listen}{where}", **options) as response:
                    await response.read()
                    statuses.append(response.status)

            for name, token in tokens.items():
                route = "/hs/x" if name.startswith("hs") else "/down/x" if name == "down" else "/api/x"
                await send(route, headers={"Authorization": f"Bearer {token}", "Cookie": f"session={COOKIE_SECRET}"})
                await send(f"{route}?access_token={token}&other={QUERY_SECRET}")
                await send(route, headers={"Cookie": f"access_token={token}; session={COOKIE_SECRET}"})
            await send("/broken/x", headers={"Authorization": f"Bearer {good}"})  # 502, logged at WARNING
            # Two tokens at once; a Basic credential; a token where a scheme should be.
            await send(f"/api/x?access_token={good}", headers={"Authorization": f"Bearer {good}"})
            await send("/api/x", headers={"Authorization": f"Basic {BASIC_SECRET}"})
            await send("/api/x", headers={"Authorization": good})
            assert {200, 401, 502, 503} <= set(statuses), statuses
            # A reload (applied, then refused) writes the providers' key sources again.
            path.write_text(text.replace("min_refresh_interval: 1s}", "min_refresh_interval: 2s}", 1))
            run.send_signal(signal.SIGHUP)
            for _ in range(100):
                if b"config reloaded" in err or b"reload_applied" in err:
                    break
                await asyncio.sleep(0.05)
            path.write_text(text + "realm: [no]\n")
            run.send_signal(signal.SIGHUP)
            for _ in range(100):
                if b"reload refused" in err:
                    break
                await asyncio.sleep(0.05)
        assert await run.stop() == 0

    logs = run.err.decode() + run.out.decode()
    assert "key fetch failed" in logs and "reload refused" in logs and "config reloaded" in logs
    assert "provider disco is ready" in logs  # its keys came from the discovered URL, password and all
    secrets = {
        "HS secret": HS_SECRET,
        "JWKS password": JWKS_PASSWORD,
        "down JWKS password": DOWN_PASSWORD,
        "upstream password": UPSTREAM_PASSWORD,
        "discovered JWKS URL's password": DISCOVERED_PASSWORD,
        "JWKS URL's query": JWKS_QUERY_SECRET,
        "down JWKS URL's query": DOWN_QUERY_SECRET,
        "discovery URL's query": DISCOVERY_QUERY_SECRET,
        "discovered JWKS URL's query": DISCOVERED_QUERY_SECRET,
        "query string": QUERY_SECRET,
        "cookie": COOKIE_SECRET,
        "Basic credential": BASIC_SECRET,
        "query separator": "?access_token",
        "Bearer": "Bearer ",
    }
    for name, token in tokens.items():
        secrets[f"{name} token"] = token
        secrets[f"{name} token's signature"] = token.rsplit(".", 1)[-1]
        if name != "garbage":
            secrets[f"{name} token's payload"] = token.split(".")[1]
    leaked = {
        name: [line for line in logs.splitlines() if value in line][:2]
        for name, value in secrets.items()
        if value in logs
    }
    assert not leaked, f"in the logs: {leaked}"

    # `token explain` decodes the token it is given, on purpose; nothing else secret.
    path.write_text(text)
    for name, token in tokens.items():
        # In a thread: the JWKS server it fetches from runs on this loop.
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "proxy",
                "token",
                "explain",
                "--config",
                str(path),
                token,
                *(["--provider", "hs"] if name.startswith("hs") else []),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        shown = result.stdout + result.stderr
        # "down" is the good token: explain checks it against main, chosen by its iss.
        assert ("VALID" in result.stdout.splitlines()) == (name in ("good", "hs_good", "down")), shown
        for secret in (
            HS_SECRET,
            JWKS_PASSWORD,
            DOWN_PASSWORD,
            UPSTREAM_PASSWORD,
            DISCOVERED_PASSWORD,
            JWKS_QUERY_SECRET,
            DOWN_QUERY_SECRET,
            DISCOVERY_QUERY_SECRET,
            DISCOVERED_QUERY_SECRET,
        ):
            assert secret not in shown, f"explain {name} printed a secret: {shown}"
        if token.count(".") == 2:
            assert token not in shown and token.rsplit(".", 1)[-1] not in shown, f"explain {name}: {shown}"
