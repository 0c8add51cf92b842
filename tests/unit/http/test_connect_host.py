"""Connecting to a host name and binding one load no "idna" codec; TLS by name works as before.

Given a host as a str, the event loop's resolver and `socket.getaddrinfo` encode it with the
"idna" codec, whose import (encodings.idna, stringprep, unicodedata) was 0.1-0.2 MiB of every
process (bench/FIGURES.md, "yarl and multidict"): `upstream.connect_host` hands them an ASCII
name as bytes. (`ssl` encodes a TLS server_hostname with the codec all the same, and uvloop
takes only a str there: a process that makes a TLS connection loads it.) Checked in a fresh
interpreter on uvloop, as `run` serves: a key fetch from `http://localhost`, a listener bound
on `localhost`, then a key fetch over TLS from `https://localhost` (the certificate checked
against the name); and an ASCII name the codec would have refused (an empty label) is a DNS
failure, an OSError the pool reports as a connect error, not a UnicodeError.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.process import REPO
from tests.support.tls import self_signed_files

SCRIPT = r"""
import asyncio, socket, ssl, sys
import uvloop
from proxy.config.settings import Listen
from proxy.http.fetch import Fetcher
from proxy.http.upstream import Pool, UpstreamConnectError
from proxy.ops.startup import bind

cert, key = sys.argv[1], sys.argv[2]

async def handler(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    writer.close()

async def main():
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    # The test's own servers on sockets bound here: the loop given "127.0.0.1" would load the codec.
    tls = await asyncio.start_server(handler, sock=socket.create_server(("127.0.0.1", 0)), ssl=server_context)
    plain = await asyncio.start_server(handler, sock=socket.create_server(("127.0.0.1", 0)))
    tls_port, plain_port = tls.sockets[0].getsockname()[1], plain.sockets[0].getsockname()[1]
    async with Fetcher(ssl_context=ssl.create_default_context(cafile=cert)) as fetcher:
        fetched = await fetcher.get(f"http://localhost:{plain_port}/jwks", timeout=5, limit=1000)
        assert fetched.body == b"ok", fetched
        pool = Pool()
        try:
            await pool.request("GET", "http", "a..b", 80, "/", [], None, content_length=None, connect_timeout=5, read_timeout=5)
        except UpstreamConnectError as error:
            print("empty label:", type(error.__cause__).__name__)
        await pool.close()
        for sock in bind(Listen(host="localhost", port=0), "listen"):
            sock.close()
        print("idna codec loaded:", "encodings.idna" in sys.modules, "unicodedata" in sys.modules)
        # TLS by name: the certificate checked against the name as before (`ssl` loads the codec).
        fetched = await fetcher.get(f"https://localhost:{tls_port}/jwks", timeout=5, limit=1000)
        assert fetched.body == b"ok", fetched
    tls.close()
    plain.close()
    print("done")

uvloop.run(main())
"""


def test_names_are_connected_to_and_bound_without_the_idna_codec(tmp_path: Path) -> None:
    cert, key = self_signed_files(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cert), str(key)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert "idna codec loaded: False False" in out.stdout, out.stdout
    assert "empty label: gaierror" in out.stdout, out.stdout
    assert out.stdout.endswith("done\n")
