"""fetch.Fetcher against real servers on loopback: what a key fetch keeps from aiohttp's client.

Redirects (followed as aiohttp followed them, at most 9, never to another scheme), credentials
in the URL (Basic, dropped on a redirect to another origin), the body limit (a Content-Length
over it is not read; a chunked body is read no further), one deadline for the whole fetch,
the headers sent (no Accept-Encoding, no cookies), TLS verified against the context given, and
the failures in the words causes.py gives them (the ones keys.py's log lines and `explain` show).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from proxy.http.causes import cause
from proxy.http.fetch import Fetcher, FetchError
from proxy.http.upstream import UpstreamError
from tests.conftest import refused_port
from tests.support.tls import self_signed_context

Answer = Callable[[bytes], Awaitable[bytes] | bytes]


class Peer:
    """A raw HTTP/1.1 server: `answer(head)` gives the bytes to send back; heads are recorded."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0

    def header(self, index: int, name: str) -> str | None:
        for line in self.heads[index].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode()
        return None


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Peer]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer, *, tls: ssl.SSLContext | None = None) -> Peer:
        peer = Peer()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    peer.heads.append(head)
                    out = answer(head)
                    data = await out if not isinstance(out, bytes) else out
                    writer.write(data)
                    await writer.drain()
                    if not data or b"Connection: close" in data:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        peer.port = server.sockets[0].getsockname()[1]
        return peer

    yield start
    for server in servers:
        server.close()


def ok(body: bytes = b'{"keys": []}') -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


def redirect(location: str, status: int = 302) -> bytes:
    return b"HTTP/1.1 %d Found\r\nLocation: %b\r\nContent-Length: 0\r\n\r\n" % (status, location.encode())


async def get(url: str, **options: object) -> tuple[int, bytes | None]:
    async with Fetcher() as fetcher:
        fetched = await fetcher.get(url, timeout=options.pop("timeout", 5.0), limit=options.pop("limit", 4096))  # type: ignore[arg-type]
    return fetched.status, fetched.body


# -- what is sent ---------------------------------------------------------------------------------


async def test_a_fetch_sends_its_headers_and_nothing_that_would_change_the_document(
    serve: Callable[..., Awaitable[Peer]],
) -> None:
    peer = await serve(lambda head: ok())
    async with Fetcher() as fetcher:
        fetched = await fetcher.get(
            f"http://127.0.0.1:{peer.port}/jwks.json?a=1",
            timeout=5,
            limit=4096,
            headers=[("Accept", "application/json")],
        )
    assert (fetched.status, fetched.body) == (200, b'{"keys": []}')
    assert peer.heads[0].startswith(b"GET /jwks.json?a=1 HTTP/1.1\r\n")
    assert peer.header(0, "Host") == f"127.0.0.1:{peer.port}"
    assert peer.header(0, "Accept") == "application/json"
    assert peer.header(0, "User-Agent") == "jwt-sidecar"
    # No Accept-Encoding: a gzip'd key set would not be JSON to us (nothing decompresses it).
    assert peer.header(0, "Accept-Encoding") is None and peer.header(0, "Cookie") is None
    assert peer.header(0, "Authorization") is None


async def test_a_request_target_is_escaped_where_it_must_be(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: ok())
    assert (await get(f"http://127.0.0.1:{peer.port}/a b/%41?x=a b"))[0] == 200
    assert peer.heads[0].startswith(b"GET /a%20b/%41?x=a%20b HTTP/1.1\r\n")


async def test_credentials_in_the_url_are_sent_as_basic_auth(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: ok())
    assert (await get(f"http://us%40er:p%3Ass@127.0.0.1:{peer.port}/jwks.json"))[0] == 200
    assert peer.header(0, "Authorization") == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert b"p%3Ass" not in peer.heads[0].split(b"\r\n")[0]  # never on the request line


# -- redirects ------------------------------------------------------------------------------------


async def test_a_redirect_is_followed_relative_or_absolute(serve: Callable[..., Awaitable[Peer]]) -> None:
    final = await serve(lambda head: ok(b'{"keys": [1]}'))
    hops = {
        b"/a": redirect("/b", 301),
        b"/b": redirect(f"http://127.0.0.1:{final.port}/keys", 307),
    }
    first = await serve(lambda head: hops[head.split(b" ")[1]])
    assert await get(f"http://127.0.0.1:{first.port}/a") == (200, b'{"keys": [1]}')
    assert [h.split(b" ")[1] for h in first.heads] == [b"/a", b"/b"]
    assert final.heads[0].startswith(b"GET /keys HTTP/1.1")


async def test_credentials_go_with_a_redirect_to_the_same_origin_only(serve: Callable[..., Awaitable[Peer]]) -> None:
    other = await serve(lambda head: ok())
    hops = {b"/a": redirect("/b"), b"/b": redirect(f"http://127.0.0.1:{other.port}/c")}
    first = await serve(lambda head: hops[head.split(b" ")[1]])
    assert (await get(f"http://user:secret@127.0.0.1:{first.port}/a"))[0] == 200
    basic = "Basic " + base64.b64encode(b"user:secret").decode()
    assert first.header(0, "Authorization") == basic and first.header(1, "Authorization") == basic
    assert other.header(0, "Authorization") is None


async def test_the_tenth_redirect_is_a_failure_not_followed(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: redirect("/again"))
    with pytest.raises(FetchError) as failed:
        await get(f"http://127.0.0.1:{peer.port}/start")
    assert cause(failed.value) == "too many redirects (10)"
    assert len(peer.heads) == 10


async def test_a_redirect_to_another_scheme_is_refused(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: redirect("file:///etc/passwd"))
    with pytest.raises(FetchError) as failed:
        await get(f"http://127.0.0.1:{peer.port}/jwks.json")
    assert cause(failed.value) == "redirected to a URL that is not http(s)"


async def test_a_redirect_without_location_is_its_status(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n")
    assert await get(f"http://127.0.0.1:{peer.port}/jwks.json") == (302, b"")


# -- the body -------------------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_none_whether_announced_or_chunked(
    serve: Callable[..., Awaitable[Peer]],
) -> None:
    announced = await serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")  # never sent
    assert await get(f"http://127.0.0.1:{announced.port}/", limit=4096) == (200, None)
    chunk = b"x" * 1000
    chunked = await serve(
        lambda head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"3e8\r\n" + chunk + b"\r\n"
        # ...and then nothing: the fetch must stop at the limit, not wait for the end.
    )
    assert await get(f"http://127.0.0.1:{chunked.port}/", limit=999, timeout=2.0) == (200, None)


async def test_a_body_at_the_limit_is_read_whole(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: ok(b"y" * 4096))
    assert await get(f"http://127.0.0.1:{peer.port}/", limit=4096) == (200, b"y" * 4096)


async def test_a_body_cut_short_is_named(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\npartial")
    with pytest.raises(FetchError) as failed:
        await get(f"http://127.0.0.1:{peer.port}/")
    assert cause(failed.value) == "the answer's body was cut off or malformed"


async def test_a_server_that_hangs_up_closed_the_connection_without_answering(
    serve: Callable[..., Awaitable[Peer]],
) -> None:
    peer = await serve(lambda head: b"")  # reads the request, closes without a byte
    with pytest.raises(FetchError) as failed:
        await get(f"http://127.0.0.1:{peer.port}/")
    assert cause(failed.value) == "the server closed the connection without answering"


async def test_an_answer_that_is_not_http_is_named_malformed(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: b"SSH-2.0-OpenSSH_9.6\r\n\r\nConnection: close")
    with pytest.raises(UpstreamError) as failed:
        await get(f"http://127.0.0.1:{peer.port}/")
    assert cause(failed.value).startswith("malformed response: "), cause(failed.value)


async def test_an_error_status_is_answered_without_reading_its_body(serve: Callable[..., Awaitable[Peer]]) -> None:
    peer = await serve(lambda head: b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\nbad")
    assert await get(f"http://127.0.0.1:{peer.port}/") == (500, b"")


# -- time and failures ----------------------------------------------------------------------------


async def test_one_deadline_covers_the_whole_fetch_redirects_included(serve: Callable[..., Awaitable[Peer]]) -> None:
    async def slow(head: bytes) -> bytes:
        await asyncio.sleep(0.2)
        return redirect("/next")

    peer = await serve(slow)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError) as failed:
        await get(f"http://127.0.0.1:{peer.port}/", timeout=0.5)
    assert loop.time() - began < 2.0
    assert cause(failed.value, timeout=0.5) == "timed out after 0.5s"
    assert 2 <= len(peer.heads) <= 3  # each hop within the budget, none after it


async def test_a_refused_connection_is_the_oserror_itself() -> None:
    port = refused_port()
    with pytest.raises(OSError) as failed:
        await get(f"http://127.0.0.1:{port}/jwks.json")
    assert cause(failed.value) == "connection refused"


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/jwks.json", "http:///jwks.json", "http://127.0.0.1:99999/x"])
async def test_a_url_that_is_not_http_is_no_valid_url(url: str) -> None:
    with pytest.raises(FetchError) as failed:
        await get(url)
    assert cause(failed.value) == "not a valid URL"


# -- TLS ------------------------------------------------------------------------------------------


async def test_tls_is_verified_against_the_context_given(serve: Callable[..., Awaitable[Peer]], tmp_path: Path) -> None:
    peer = await serve(lambda head: ok(), tls=self_signed_context(tmp_path))
    url = f"https://127.0.0.1:{peer.port}/jwks.json"
    with pytest.raises(ssl.SSLCertVerificationError) as failed:
        await get(url)  # the system's trust store: nobody vouches for it
    assert cause(failed.value) == "TLS: certificate verify failed: self-signed certificate"
    trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    async with Fetcher(ssl_context=trusting) as fetcher:
        fetched = await fetcher.get(url, timeout=5, limit=4096)
    assert (fetched.status, fetched.body) == (200, b'{"keys": []}')


async def test_ssl_cert_file_names_the_trust_store(
    serve: Callable[..., Awaitable[Peer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the README tells an operator with a private CA: the default context reads it.
    peer = await serve(lambda head: ok(), tls=self_signed_context(tmp_path))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    assert await get(f"https://127.0.0.1:{peer.port}/jwks.json") == (200, b'{"keys": []}')


async def test_a_location_that_is_not_utf8_is_followed_escaped(serve: Callable[..., Awaitable[Peer]]) -> None:
    # A Latin-1 Location ("/clés.json"): aiohttp's client followed it to a %-escaped target; the
    # Fetcher raised UnicodeEncodeError out of urllib.parse.quote, which keys.py logged as an
    # "unexpected error" (the key set never loaded).
    asked: list[bytes] = []

    def answer(head: bytes) -> bytes:
        asked.append(head.split(b"\r\n", 1)[0])
        if head.startswith(b"GET /jwks.json "):
            return b"HTTP/1.1 302 Found\r\nLocation: /cl\xe9s.json\r\nContent-Length: 0\r\n\r\n"
        return ok()

    peer = await serve(answer)
    status, _ = await get(f"http://127.0.0.1:{peer.port}/jwks.json")
    assert status == 200
    assert asked == [b"GET /jwks.json HTTP/1.1", b"GET /cl%E9s.json HTTP/1.1"]
