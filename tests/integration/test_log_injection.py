"""What an attacker (or a careless peer) chooses never forges, hides or floods a log line.

A real sidecar on loopback, at `log_level: DEBUG`, in both log formats, with real keys: a
token's header and claims, a request's path, method and headers, an upstream's status line,
a JWKS server's keys, a discovery document's `jwks_uri` and a config's own values all carry
newlines, ANSI escapes, C1 controls (U+009B is CSI), bidi overrides, U+2028 and text that
tries to close a JSON string. Every line of stderr (operator log) and stdout (access log)
must then be one line (JSON: one object that parses), hold no control or format character
raw, and stay bounded; and each source's marker must have reached a line (escaped), or the
case tested nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint, refused_port
from tests.integration.test_oplog_json import assert_every_line_is_a_full_json_record
from tests.support.jwks_server import start_jwks_server
from tests.support.process import REPO, free_port, running

# Newline + a forged text record, CR, ESC sequences (clear screen, set title), CSI as one C1
# character, NEL, right-to-left override, line and paragraph separators, NUL, DEL, a
# zero-width space, a tag character, a lone surrogate cannot travel in UTF-8 JSON so none;
# and a try at closing a JSON string to forge a member.
EVIL = (
    "\n2026-01-01 00:00:00,000 ERROR jwt_sidecar: forged\r\x1b[2J\x1b]0;pwned\x07\x9b31m\x85"
    '\u202egnp.exe\u2028\u2029\x00\x7f\u200b\U000e0041","level":"FORGED"'
)

# Everything a log line must not hold raw (safetext.UNSAFE's classes, checked here from the
# Unicode database rather than from our own list).
_CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs")


def unsafe_characters(text: str) -> list[str]:
    import unicodedata

    return [f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in _CONTROL_CATEGORIES]


def marker(name: str) -> str:
    return f"MARK{name.replace('_', '')}X"


def evil(name: str) -> str:
    return marker(name) + EVIL


async def raw_request(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def get(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers or {}) as response,
    ):
        await response.read()
        return response.status


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _evil_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream whose status line carries the attack and whose body breaks off midway."""
    head = await reader.readuntil(b"\r\n\r\n")
    if b" /up/" in head.split(b"\r\n", 1)[0]:
        reason = evil("upstream").replace("\n", " ").replace("\r", " ").encode()  # CR/LF would end the line
        writer.write(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()


Context = dict[str, Any]
Source = Callable[[Context], Awaitable[None]]


async def _kid(ctx: Context) -> None:
    assert await get(ctx["listen"], "/kid/x", bearer(mint(key=ctx["key"], headers={"kid": evil("kid")}))) == 401


async def _kid_long(ctx: Context) -> None:
    # 4,000 characters: under max_token_bytes (8 KiB) once encoded, so it is read and named.
    kid = marker("kid_long") + "k" * 4000
    assert await get(ctx["listen"], "/kidlong/x", bearer(mint(key=ctx["key"], headers={"kid": kid}))) == 401


async def _alg(ctx: Context) -> None:
    token = mint(key=ctx["key"])
    header = jwt.utils.base64url_encode(json.dumps({"alg": evil("alg"), "kid": ctx["key"].kid}).encode()).decode()
    assert await get(ctx["listen"], "/alg/x", bearer(header + token[token.index(".") :])) == 401


async def _typ_and_crit(ctx: Context) -> None:
    token = mint(key=ctx["key"], headers={"crit": [evil("crit")], evil("critname"): 1})
    assert await get(ctx["listen"], "/crit/x", bearer(token)) == 401


async def _iss(ctx: Context) -> None:
    assert await get(ctx["listen"], "/iss/x", bearer(mint({"iss": evil("iss")}, key=ctx["key"]))) == 401


async def _aud(ctx: Context) -> None:
    assert await get(ctx["listen"], "/aud/x", bearer(mint({"aud": [evil("aud")]}, key=ctx["key"]))) == 401


async def _sub(ctx: Context) -> None:
    # A valid token whose sub has no control character (those are refused: a header cannot
    # carry them) but bidi and line-separator characters: the access log's `subject`.
    assert await get(ctx["listen"], "/sub/x", bearer(mint({"sub": evil("sub")}, key=ctx["key"]))) == 401
    sub = marker("subok") + '\u202egnp.exe\u2028\u200b","forged":"'
    assert await get(ctx["listen"], "/sub/x", bearer(mint({"sub": sub}, key=ctx["key"]))) == 200


async def _path(ctx: Context) -> None:
    # Raw UTF-8 in the target (NEL, RLO, LS): a path the proxy may accept and log.
    target = ("/pub/" + marker("path") + "\x85\u202e\u2028\u009b2J").encode()
    await raw_request(ctx["listen"], b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    target = b"/api/" + marker("pathenc").encode() + b"%0a%1b%5b2J%c2%9b"
    await raw_request(ctx["listen"], b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    # Raw control bytes: refused by the parser, but the refusal may be logged.
    await raw_request(
        ctx["listen"],
        b"GET /" + marker("pathctl").encode() + b"\x1b[2J\x7f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )


async def _method(ctx: Context) -> None:
    await raw_request(
        ctx["listen"],
        marker("method").encode() + b"\xc2\x9b31m /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )


async def _headers(ctx: Context) -> None:
    # Control bytes in a header value are refused by the parser (a 400 with nothing of them
    # logged); obs-text (RFC 9110 §5.5) gets through: bidi and line separators in UTF-8.
    await raw_request(
        ctx["listen"],
        ("GET /api/" + marker("headers") + " HTTP/1.1\r\nHost: x\x1b[2J\r\nConnection: close\r\n\r\n").encode(),
    )
    head = (
        "GET /api/" + marker("headers2") + " HTTP/1.1\r\nHost: " + marker("host") + "\u202e\u2028\x85\r\n"
        "X-Request-Id: " + marker("requestid") + "\u2028\u202e\r\nAuthorization: Bearer a b\r\n"
        "Cookie: " + marker("cookie") + "\u202e\r\nConnection: close\r\n\r\n"
    ).encode()
    await raw_request(ctx["listen"], head)


async def _upstream(ctx: Context) -> None:
    await get(ctx["listen"], "/up/" + marker("upstreampath"))  # the body breaks off: the client sees an error
    await ctx["run"].wait_for(marker("upstreampath"))


async def _jwks(ctx: Context) -> None:
    await ctx["run"].wait_for(marker("jwks"))  # the evil set's keys_loaded line


async def _discovery(ctx: Context) -> None:
    await ctx["run"].wait_for(marker("discovery"))  # key_fetch_failed names the jwks_uri


async def _route_name(ctx: Context) -> None:
    assert await get(ctx["listen"], "/named/x") == 401


SOURCES: dict[str, tuple[Source, tuple[str, ...]]] = {
    # name: (what the attacker does, the markers that must reach some line)
    "kid": (_kid, (marker("kid"),)),
    "kid_long": (_kid_long, (marker("kid_long"),)),
    "alg": (_alg, (marker("alg"),)),
    "crit": (_typ_and_crit, (marker("crit"),)),
    "iss": (_iss, (marker("iss"),)),
    "aud": (_aud, (marker("aud"),)),
    "sub": (_sub, (marker("sub"), marker("subok"))),
    "path": (_path, (marker("pathenc"),)),  # raw UTF-8 or control bytes in a target: a 400, no path logged
    "method": (_method, ()),  # refused before it is logged anywhere: nothing to find, nothing to break
    "headers": (_headers, (marker("headers2"),)),
    "upstream": (_upstream, (marker("upstreampath"),)),
    "jwks": (_jwks, (marker("jwks"), marker("jwks_skipped"))),
    "discovery": (_discovery, (marker("discovery"),)),
    "route_name": (_route_name, (marker("route"),)),
}


TOKENS = ("kid", "kidlong", "alg", "crit", "iss", "aud", "sub")


def jwks_with_evil_kids(key: TestKey) -> dict[str, Any]:
    [good] = jwks_of(key)["keys"]
    keys = [
        {**good, "kid": evil("jwks")},
        {**good, "kid": marker("jwks") + "K" * 65536},
        {**good, "kid": evil("jwks_skipped"), "use": "enc"},
        {**good, "kid": "skip2" + EVIL, "use": evil("jwks_use")},
    ]
    keys += [{**good, "kid": f"many-{i}"} for i in range(300)]
    return {"keys": keys}


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_source_can_forge_escape_or_flood_a_log_line(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey, log_format: str
) -> None:
    good = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    bad_keys = await start_jwks_server(aiohttp_server, jwks_with_evil_kids(rsa_key))
    discovery = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    discovery.jwks_uri = f"http://127.0.0.1:{refused_port()}/" + evil("discovery")
    upstream = await asyncio.start_server(_evil_upstream, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    listen, admin = free_port(), free_port()

    def provider(name: str, source: str) -> str:
        return f"  {name}:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    {source}\n"

    route_name = json.dumps(evil("route"))  # a YAML double-quoted string takes JSON's escapes
    config = (
        f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nlog_level: DEBUG\nlog_format: {log_format}\n"
        f'upstream: {{url: "http://127.0.0.1:{up_port}", timeout: 2s, connect_timeout: 1s}}\n'
        "providers:\n"
        + provider("main", f'jwks: {{url: "{good.url()}", min_refresh_interval: 1s}}')
        # One provider per token source: request_refused lines are throttled per provider
        # (one a second), and each source's line must be written to be checked.
        + "".join(provider(name, f'jwks: {{url: "{good.url()}", min_refresh_interval: 1s}}') for name in TOKENS)
        + provider("evilkeys", f'jwks: {{url: "{bad_keys.url()}", min_refresh_interval: 1s}}')
        + provider(
            "disco",
            f'discovery: {{url: "{discovery.url("/.well-known/openid-configuration")}", '
            "min_refresh_interval: 1s, timeout: 1s}",
        )
        + "routes:\n"
        "  - {name: pub, match: {path_prefix: /pub/}, auth: none}\n"
        "  - {name: up, match: {path_prefix: /up/}, auth: none}\n"
        f"  - {{name: {route_name}, match: {{path_prefix: /named/}}, auth: {{provider: evilkeys}}}}\n"
        "  - {name: disco, match: {path_prefix: /disco/}, auth: {provider: disco}}\n"
        "  - {name: api, match: {path_prefix: /api/}, auth: {provider: main}}\n"
        + "".join(
            f"  - {{name: {name}, match: {{path_prefix: /{name}/}}, auth: {{provider: {name}}}}}\n" for name in TOKENS
        )
    )
    try:
        async with running(tmp_path, config, ready=None) as run:
            for name in ("main", *TOKENS):
                await run.wait_for(f"provider {name} is ready")
            ctx = {"listen": listen, "key": rsa_key, "run": run}
            for action, _ in SOURCES.values():
                await action(ctx)
            assert await run.stop() == 0
    finally:
        upstream.close()

    stderr, stdout = run.err.decode("utf-8"), run.out.decode("utf-8")
    problems = []
    for stream, text in (("stderr", stderr), ("stdout", stdout)):
        assert text.endswith("\n")
        for line in text[:-1].split("\n"):
            if unsafe_characters(line):
                problems.append(f"{stream}: raw {unsafe_characters(line)[:5]} in {line[:300]!r}")
            if len(line) > 20000:
                problems.append(f"{stream}: a line of {len(line)} characters: {line[:200]!r}")
            if stream == "stdout" or log_format == "json":
                try:
                    record = json.loads(line)
                except ValueError:
                    problems.append(f"{stream}: not JSON: {line[:300]!r}")
                    continue
                assert isinstance(record, dict)
                if stream == "stderr":
                    assert list(record)[:5] == ["time", "level", "logger", "event", "message"], record
                    assert "FORGED" not in (record["level"], record["event"])
                assert "forged" not in record
            else:
                assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ", line), line
    assert not problems, "\n".join(problems[:20])
    if log_format == "json":
        assert_every_line_is_a_full_json_record([json.loads(line) for line in stderr.splitlines()])
    # Not one forged record: the forged text is on the line of the record that carried it.
    assert not re.search(r"^2026-01-01", stderr, re.MULTILINE)
    for name, (_, markers) in SOURCES.items():
        for needle in markers:
            assert needle in stderr + stdout, f"{name}: {needle} reached no line: the case tested nothing"


async def test_check_config_and_token_explain_print_nothing_raw(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey
) -> None:
    """The operator's commands print config values and what key servers send on escaped lines."""
    bad_keys = await start_jwks_server(aiohttp_server, jwks_with_evil_kids(rsa_key))
    discovery = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    discovery.jwks_uri = f"http://127.0.0.1:{refused_port()}/" + evil("discovery")
    # YAML reads JSON's escape of an astral character as two lone surrogates: none in the issuer.
    issuer = evil("iss").replace("\U000e0041", "")
    discovery.issuer = issuer
    name = json.dumps(evil("route"))
    keys = marker("provider") + "\x1b[31m\u202e\n2026-01-01 00:00:00,000 ERROR forged"  # argv holds no NUL
    config = (
        'listen: 127.0.0.1:8080\nadmin: 127.0.0.1:9901\nupstream: {url: "http://127.0.0.1:8000"}\n'
        "providers:\n"
        f"  {json.dumps(keys)}:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}, {json.dumps(evil('aud'))}]\n"
        f'    jwks: {{url: "{bad_keys.url()}"}}\n'
        f"  disco:\n    issuer: {json.dumps(issuer)}\n    audiences: [{AUDIENCE}]\n"
        f'    discovery: {{url: "{discovery.url("/.well-known/openid-configuration")}", timeout: 1s}}\n'
        "routes:\n"
        f"  - {{name: {name}, match: {{path_prefix: /a/}}, auth: {{provider: {json.dumps(keys)}}}}}\n"
        f"  - {{name: {json.dumps(evil('shadowed'))}, match: {{path_prefix: /b/}}, auth: {{provider: disco}}}}\n"
        f"  - {{name: {json.dumps(evil('public'))}, match: {{path_prefix: /}}, auth: none}}\n"
    )
    path = tmp_path / "config.yaml"
    path.write_text(config)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    async def command(*args: str) -> tuple[int, list[str]]:
        # In a thread: the key servers it fetches from run on this loop.
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode, result.stdout.splitlines() + result.stderr.splitlines()

    status, lines = await command("check-config", str(path))
    assert status == 0, lines
    # A config with an error naming a value of its own: an unknown provider.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        config.replace(
            f"auth: {{provider: {json.dumps(keys)}}}", "auth: {provider: " + json.dumps(evil("unknown")) + "}"
        )
    )
    status, more = await command("check-config", str(broken))
    assert status == 1 and len(more) == 2, more  # the problem and the summary: no line more
    lines += more
    token = mint(key=rsa_key, headers={"kid": evil("kid")})
    for provider_name in (keys, "disco"):
        explained, more = await command("token", "explain", "--config", str(path), "--provider", provider_name, token)
        assert explained in (1, 3), more  # INVALID (unknown kid), NOT VERIFIED (no keys)
        lines += more
    text = "\n".join(lines)
    for needle in ("route", "shadowed", "unknown", "aud", "iss", "kid", "discovery", "provider"):
        assert marker(needle) in text, f"{needle} was not printed: the case tested nothing\n{text}"
    assert [line for line in lines if unsafe_characters(line)] == []
    assert [line for line in lines if line.startswith(("2026-01-01", '","level"'))] == []
