"""A running `jwt-sidecar run` (`workers: 1`) imports no yarl, multidict, idna or propcache,
and, making no TLS connection, no "idna" codec (unicodedata).

They were aiohttp's dependencies, imported by the proxy's own code when it ran on aiohttp:
0.6 MiB of every process's resident memory (bench/FIGURES.md, "yarl and multidict"). A query
string is now decoded by http1's `query_pairs`, header fields looked up by http1's `Headers`,
and a plain upstream URL read by runtime's `Origin.parse` (differential tests hold each to
yarl's or multidict's answers). The sidecar is started as the CLI starts it, made to serve
what reads the query (a query-parameter token, found and removed), the decoded header fields
(a WebSocket handshake) and a Bearer token, and then every import it has made so far and
every file it has mapped must name none of them. The "idna" codec (encodings.idna, stringprep,
unicodedata: 0.1-0.2 MiB more) was loaded by binding and connecting to a host given as a str
(`upstream.connect_host`); a TLS connection loads it still (`ssl`), and this sidecar makes none.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from yarl import URL

from tests.conftest import TestKey, jwks_of, mint
from tests.integration.conftest import BASE_CONFIG
from tests.support.imports import IMPORT_ENV, imported, linux_only, mapped, top_level
from tests.support.process import children, running
from tests.support.upstream import start_upstream

LEFT_OUT = ("yarl", "multidict", "idna", "propcache")
CODEC = ("encodings.idna", "stringprep", "unicodedata")

QUERY_ROUTE = """\
  - name: query
    match: {path_prefix: /q/}
    auth: {provider: main}
    token_sources: [{query: access_token}]
"""


@linux_only
async def test_a_running_sidecar_imports_no_yarl_multidict_idna_propcache_or_unicodedata(
    tmp_path: Any, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
    text = text.replace("routes:\n", "routes:\n" + QUERY_ROUTE, 1) + "workers: 1\ndrain_timeout: 2s\n"
    async with running(tmp_path, text, stdout=False, env=IMPORT_ENV) as run:  # ready: keys fetched
        assert children(run.pid) == []  # workers: 1 is the one process
        token = mint(key=rsa_key)
        async with aiohttp.ClientSession() as session:
            # The query's pairs: the token found under a %-escaped name, taken out of the query.
            for name in ("access_token", "access%5Ftoken"):
                url = f"{run.url}/q/x?a=%2F+b&{name}={token}&c"
                async with session.get(URL(url, encoded=True)) as r:  # sent as written
                    assert r.status == 200, await r.text()
                    assert (await r.json())["path"] == "/q/x?a=%2F+b&c"
            # The header fields decoded: a WebSocket handshake, relayed both ways.
            async with session.ws_connect(f"{run.url}/ws", headers={"Authorization": f"Bearer {token}"}) as ws:
                assert await asyncio.wait_for(ws.receive_str(), 5) == "hello user-42"
            async with session.get(f"{run.url}/api/x?y=%2F", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()
        modules = imported(run.stderr())
        assert "proxy.request.pipeline" in modules and "uvloop" in modules  # the log holds the run's imports
        assert sorted(top_level(modules) & set(LEFT_OUT)) == []
        assert sorted(modules & set(CODEC)) == []
        assert not mapped(run.pid, "/unicodedata.")
        for part in LEFT_OUT:
            assert not mapped(run.pid, f"/{part}/"), part  # their C extensions are not loaded either
        assert await run.stop(timeout=30) == 0
