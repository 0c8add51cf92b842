"""GETs of small documents over our own pooled client: the key sets and discovery documents keys.py fetches.

Owns: `Fetcher`, one GET of an http(s) URL on an `upstream.Pool` of its own (keep-alive,
TLS verified with the system's trust store, `SSL_CERT_FILE`/`SSL_CERT_DIR` included, or the
context given), with everything a key fetch needs around it: one deadline for the whole
fetch (connect, redirects, head and body: builtin `TimeoutError`), a limit on the body
(a Content-Length over it is not read, and a body is read no further than it), redirects
followed as aiohttp's client followed them when it made these fetches (301, 302, 303, 307
and 308 with a Location, resolved against the URL; at most 9, the 10th is an error; never
to a scheme but http and https), credentials in the URL (`https://user:pass@host/`) sent as
Basic auth and dropped on a redirect to another origin, and failures raised so that
causes.py words them as it worded aiohttp's: the `OSError` itself when no connection could
be had (refused, DNS, TLS), `FetchError` in operator words otherwise.
Does not own: what is fetched or what a status means (keys.py), the HTTP/1.1 exchange itself
(upstream.py), or cookies, proxies and decompression (none of them: no `Accept-Encoding` is
sent, so the document comes as it is).

Why not aiohttp's client: importing it costs ~23 MiB of resident memory in every process,
for a few fetches an hour; the pool that carries every proxied request speaks HTTP/1.1 and
TLS already (bench/FIGURES.md, "aiohttp out of the running sidecar").
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import cast
from urllib.parse import quote, unquote, urljoin, urlsplit

from .causes import Worded
from .upstream import Pool, Response, UpstreamConnectError, UpstreamError

__all__ = ["MAX_REDIRECTS", "FetchError", "Fetched", "Fetcher"]

MAX_REDIRECTS = 10
"""aiohttp's `max_redirects`: the 10th redirect in a row is an error, not followed."""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PORTS = {"http": 80, "https": 443}
# What may stay as it is in a request target: RFC 3986's unreserved and reserved characters
# and `%` (an escape already made); anything else (a space, a CR or LF, non-ASCII) is escaped,
# as aiohttp's URL requoting did.
_SAFE = "/?#[]@!$&'()*+,;=:%-._~"


class FetchError(Worded):
    """A fetch failed for a reason already in an operator's words (causes.py repeats them)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    body: bytes | None
    """A 200 answer's content; None when it is longer than the limit (then read no further).
    Any other status: b"" (the body is not read)."""


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    target: str
    authorization: str | None

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def _target(url: str) -> _Target:
    """Where `url` connects and what its request line asks for; `FetchError` when it is no http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise FetchError("not a valid URL") from None
    if parts.scheme not in _PORTS or not host:
        raise FetchError("not a valid URL")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchError("not a valid URL") from None
    # A Location's bytes that are not UTF-8 come back as they were sent, %-escaped (as aiohttp
    # followed them): `_location` kept them as surrogates, which a strict encode would raise on.
    path, query = quote(parts.path or "/", safe=_SAFE, errors=_BYTES), quote(parts.query, safe=_SAFE, errors=_BYTES)
    target = path + (f"?{query}" if query else "")
    authorization = None
    if parts.username is not None:
        # aiohttp's BasicAuth from the URL: the user and password unescaped, latin-1.
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        try:
            authorization = "Basic " + base64.b64encode(pair.encode("latin-1")).decode("ascii")
        except UnicodeEncodeError:
            raise FetchError("credentials in the URL are not latin-1") from None
    return _Target(parts.scheme, host, port or _PORTS[parts.scheme], target, authorization)


class Fetcher:
    """GETs of small documents, on a pool of keep-alive connections of its own."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, max_redirects: int = MAX_REDIRECTS) -> None:
        # Idle connections go after 15 s (aiohttp's keep-alive): a fetch comes every few minutes.
        self._pool = Pool(ssl_context=ssl_context, idle_timeout=15.0, max_idle_per_origin=4)
        self._max_redirects = max_redirects

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._pool.close()

    def idle_count(self) -> int:
        """Connections kept open for the next fetch (one per key server, at most 4 each)."""
        return self._pool.idle_count()

    async def get(self, url: str, *, timeout: float, limit: int, headers: Iterable[tuple[str, str]] = ()) -> Fetched:
        """GET `url`, following redirects, all within `timeout` seconds (else `TimeoutError`).

        Raises the `OSError` when no connection could be had (refused, unreachable, DNS,
        TLS), `FetchError` or another `upstream.UpstreamError` (both operator words) when the
        answer was not a well-formed HTTP/1.1 one.
        """
        async with asyncio.timeout(timeout):
            # The pool's own timeouts are later than the whole fetch's: the fetch's fires first.
            return await self._get(url, limit, tuple(headers), timeout + 1.0)

    async def _get(self, url: str, limit: int, headers: tuple[tuple[str, str], ...], timeout: float) -> Fetched:
        where = _target(url)
        authorization = where.authorization
        redirects = 0
        while True:
            fields = [*headers, ("User-Agent", "jwt-sidecar")]  # Host: the pool's, from the origin
            if authorization is not None:
                fields.append(("Authorization", authorization))
            response = await self._request(where, fields, timeout)
            try:
                location = _location(response) if response.status in _REDIRECTS else None
                if location is None:
                    if response.status != 200:
                        return Fetched(response.status, b"")
                    return Fetched(200, await _read_limited(response, limit))
                redirects += 1
                if redirects >= self._max_redirects:
                    raise FetchError(f"too many redirects ({redirects})")
                url = urljoin(url, location)
                if urlsplit(url).scheme not in _PORTS:
                    raise FetchError("redirected to a URL that is not http(s)")
                nxt = _target(url)
                # Credentials go to the origin they were given for, never to one it redirects to;
                # a redirect URL with credentials of its own brings them.
                if nxt.authorization is not None:
                    authorization = nxt.authorization
                elif nxt.origin != where.origin:
                    authorization = None
                where = nxt
            finally:
                response.release()  # pooled if the answer ended cleanly, else closed

    async def _request(self, where: _Target, fields: list[tuple[str, str]], timeout: float) -> Response:
        try:
            return await self._pool.request(
                "GET",
                where.scheme,
                where.host,
                where.port,
                where.target,
                fields,
                None,
                content_length=None,
                connect_timeout=timeout,
                read_timeout=timeout,
            )
        except UpstreamConnectError as error:
            if isinstance(error.__cause__, OSError):
                # Refused, unreachable, DNS, TLS: the OSError itself, as causes.py words it
                # ("connection refused"), not the pool's sentence around it.
                raise error.__cause__ from None
            raise FetchError("the server closed the connection without answering") from None
        except ValueError:  # a CR or LF in the request line or a field: the pool refuses it
            raise FetchError("not a valid URL") from None


_BYTES = "surrogateescape"


def _location(response: Response) -> str | None:
    for name, value in response.raw_headers:
        if len(name) == 8 and name.lower() == b"location":
            return value.decode("utf-8", "surrogateescape")
    return None


async def _read_limited(response: Response, limit: int) -> bytes | None:
    """The body, or None when it is longer than `limit` (read no further than that)."""
    for name, value in response.raw_headers:
        if len(name) == 14 and name.lower() == b"content-length" and int(value) > limit:
            return None  # llhttp allowed digits only
    body = bytearray()
    try:
        # iter_chunks is an async generator: closed here when the limit stops the reading.
        async with aclosing(cast(AsyncGenerator[bytes, None], response.iter_chunks())) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > limit:
                    return None
    except UpstreamError:
        raise FetchError("the answer's body was cut off or malformed") from None
    return bytes(body)
