"""causes.cause: real network failures on loopback, each turned into the words an operator reads.

Every case is a real failure: a closed port, a server that never answers, one that hangs up,
a TLS server with a self-signed certificate (made here with `cryptography`), a TLS client
talking to a plain server, an unresolvable name (`.invalid` is reserved, RFC 6761 §6.4),
and an HTTP error status. Each is met both through fetch.py's `Fetcher` (as keys.py fetches) and
through asyncio's own connection (as upstream.py connects), since each wraps the failure its own way.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.http.causes import cause, peer, shown
from proxy.http.fetch import Fetcher
from proxy.http.upstream import Pool, UpstreamConnectError
from tests.conftest import refused_port
from tests.support.tls import self_signed_context

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def closed_port() -> int:
    return refused_port()  # held for the whole run: nothing else can listen there meanwhile


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, *, tls: ssl.SSLContext | None = None) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        # Not wait_closed(): a handler still blocked in a read would hold it.


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the client gives up; never a byte of answer


async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


async def plain_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)  # whatever came (a TLS ClientHello): a plain HTTP answer
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


async def not_found(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 that nobody vouches for."""
    return self_signed_context(tmp_path_factory.mktemp("tls"))


async def fetch_failure(url: str, timeout: float = 5.0) -> BaseException:
    async with Fetcher() as fetcher:
        try:
            await fetcher.get(url, timeout=timeout, limit=1024)
        except Exception as error:  # noqa: BLE001 - the failure is what the test looks at
            return error
    raise AssertionError(f"{url} did not fail")


async def connect_failure(
    port: int, *, tls: bool = False, host: str = "127.0.0.1", timeout: float = 5.0
) -> BaseException:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=ssl.create_default_context() if tls else None)
    except Exception as error:  # noqa: BLE001
        return error
    writer.close()
    raise AssertionError(f"{host}:{port} did not fail")


# -- connection refused ---------------------------------------------------------------------------


async def test_a_closed_port_is_connection_refused() -> None:
    port = closed_port()
    assert cause(await fetch_failure(f"http://127.0.0.1:{port}/jwks.json")) == "connection refused"
    assert cause(await connect_failure(port)) == "connection refused"


# -- timeouts -------------------------------------------------------------------------------------


async def test_a_server_that_never_answers_times_out_after_the_timeout_given(
    serve: Callable[..., Awaitable[int]],
) -> None:
    port = await serve(never_answers)
    error = await fetch_failure(f"http://127.0.0.1:{port}/jwks.json", timeout=0.3)
    assert isinstance(error, asyncio.TimeoutError)
    assert cause(error, timeout=0.3) == "timed out after 0.3s"
    assert cause(error) == "timed out"


# -- TLS ------------------------------------------------------------------------------------------


async def test_a_self_signed_certificate_fails_verification(
    serve: Callable[..., Awaitable[int]], self_signed: ssl.SSLContext
) -> None:
    port = await serve(never_answers, tls=self_signed)
    via_fetcher = await fetch_failure(f"https://127.0.0.1:{port}/jwks.json")
    direct = await connect_failure(port, tls=True)
    assert isinstance(direct, ssl.SSLCertVerificationError)
    for error in (via_fetcher, direct):
        assert cause(error) == "TLS: certificate verify failed: self-signed certificate", error


async def test_tls_to_a_plain_server_is_a_failed_handshake(serve: Callable[..., Awaitable[int]]) -> None:
    port = await serve(plain_answer)
    error = await connect_failure(port, tls=True)
    assert isinstance(error, ssl.SSLError)
    assert cause(error).startswith("TLS: handshake failed"), cause(error)
    assert "SSL" not in cause(error).removeprefix("TLS: ")


# -- DNS ------------------------------------------------------------------------------------------


async def test_an_unresolvable_name_is_dns_name_not_found() -> None:
    port = closed_port()
    via_fetcher = await fetch_failure(f"http://nonexistent.invalid:{port}/jwks.json")
    direct = await connect_failure(port, host="nonexistent.invalid")
    assert isinstance(direct, socket.gaierror)
    for error in (via_fetcher, direct):
        assert cause(error) == "DNS: name not found", repr(error)


# -- what an HTTP peer does -----------------------------------------------------------------------


async def test_an_error_status_is_no_failure_of_the_fetch_but_its_status(serve: Callable[..., Awaitable[int]]) -> None:
    # keys.py words it "HTTP 404 from <url>" (test_key_events.py); the fetch itself succeeded.
    port = await serve(not_found)
    async with Fetcher() as fetcher:
        fetched = await fetcher.get(f"http://127.0.0.1:{port}/jwks.json", timeout=5, limit=1024)
    assert (fetched.status, fetched.body) == (404, b"")


async def test_a_server_that_hangs_up_closed_the_connection_without_answering(
    serve: Callable[..., Awaitable[int]],
) -> None:
    port = await serve(hangs_up)
    error = await fetch_failure(f"http://127.0.0.1:{port}/jwks.json")
    assert cause(error) == "the server closed the connection without answering", repr(error)


# -- the upstream client's own errors -------------------------------------------------------------


async def upstream_failure(port: int, *, scheme: str = "http", host: str = "127.0.0.1") -> UpstreamConnectError:
    pool = Pool()
    try:
        with pytest.raises(UpstreamConnectError) as failed:
            await pool.request(
                "GET", scheme, host, port, "/", (), None, content_length=None, connect_timeout=2, read_timeout=2
            )
    finally:
        await pool.close()
    assert cause(failed.value) == str(failed.value)  # already operator words
    return failed.value


async def test_the_upstream_client_names_the_peer_and_the_cause(
    serve: Callable[..., Awaitable[int]], self_signed: ssl.SSLContext
) -> None:
    port = closed_port()
    assert str(await upstream_failure(port)) == f"cannot connect to 127.0.0.1:{port}: connection refused"
    port = await serve(never_answers, tls=self_signed)
    assert str(await upstream_failure(port, scheme="https")) == (
        f"cannot connect to 127.0.0.1:{port}: TLS: certificate verify failed: self-signed certificate"
    )
    port = closed_port()
    assert str(await upstream_failure(port, host="nonexistent.invalid")) == (
        f"cannot connect to nonexistent.invalid:{port}: DNS: name not found"
    )


# -- never a bare class ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (ValueError("odd"), "unexpected error (ValueError: odd)"),
        (RuntimeError(), "unexpected error (RuntimeError)"),
        (OSError(), "unexpected error (OSError)"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection reset by the peer"),
        (OSError(9999, "Something Odd"), "something Odd"),
    ],
)
def test_anything_else_is_words_with_its_class_in_brackets(error: BaseException, words: str) -> None:
    assert cause(error) == words


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://issuer.example/jwks.json", "issuer.example:443"),
        ("http://issuer.example/jwks.json", "issuer.example:80"),
        ("http://127.0.0.1:8081/x", "127.0.0.1:8081"),
        ("https://[::1]:8443/x", "[::1]:8443"),
        ("not a url", "not a url"),
    ],
)
def test_peer_is_host_and_port(url: str, expected: str) -> None:
    assert peer(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:s3cret@issuer.example/jwks.json", "https://***@issuer.example/jwks.json"),
        ("https://token@issuer.example:8443/jwks", "https://***@issuer.example:8443/jwks"),
        # An '@' in the path or query is not a password's: the host stays (the query's value goes, below).
        ("https://issuer.example/jwks.json?x=a@b", "https://issuer.example/jwks.json?x=***"),
        ("https://issuer.example?x=a@b", "https://issuer.example?x=***"),
        ("https://issuer.example/a@b", "https://issuer.example/a@b"),
    ],
)
def test_a_password_in_a_url_is_never_shown(url: str, expected: str) -> None:
    assert shown(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # Some issuers put an API key in a JWKS URL: each value is hidden, the names stay.
        ("https://issuer.example/jwks.json?api_key=s3cret", "https://issuer.example/jwks.json?api_key=***"),
        (
            "https://u:p@issuer.example/k?a=1&sig=s3cret&flag&empty=",
            "https://***@issuer.example/k?a=***&sig=***&***&empty=",
        ),
        ("redis://:pw@redis.internal:6379/0?password=s3cret", "redis://***@redis.internal:6379/0?password=***"),
        ("https://issuer.example/jwks.json#s3cret", "https://issuer.example/jwks.json#***"),
        ("https://issuer.example/jwks.json?", "https://issuer.example/jwks.json?"),
        ("unix:///var/run/redis.sock", "unix:///var/run/redis.sock"),
    ],
)
def test_a_query_value_in_a_url_is_never_shown(url: str, expected: str) -> None:
    assert shown(url) == expected
    assert "s3cret" not in shown(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # RFC 3986 has no '/', '?' or '#' in a userinfo, but a password written in a config may
        # hold them (a base64 one, or any random one): the authority then seems to end inside
        # it, as a host and a port that is no number. What comes before the last '@' is hidden.
        ("https://u:Ab/s3cret+x@issuer.example/jwks", "https://***@issuer.example/jwks"),
        ("redis://:Ab/s3cret@redis.internal:6379/0", "redis://***@redis.internal:6379/0"),
        ("https://u:Ab?s3cret@issuer.example/jwks", "https://***@issuer.example/jwks"),
        ("https://u:Ab#s3cret@issuer.example/jwks", "https://***@issuer.example/jwks"),
        ("redis://:/s3cret@redis.internal", "redis://***@redis.internal"),
        # No scheme (a config mistake an error message repeats): the same rules.
        (":s3cret@redis.internal:6379/0", "***@redis.internal:6379/0"),
        ("issuer.example/jwks?api_key=s3cret", "issuer.example/jwks?api_key=***"),
        # No authority at all is no password cut short: a socket's path stays as it is.
        ("unix:///var/run/a@b.sock", "unix:///var/run/a@b.sock"),
    ],
)
def test_a_password_that_holds_a_delimiter_is_never_shown(url: str, expected: str) -> None:
    assert shown(url) == expected
    assert "s3cret" not in shown(url)
