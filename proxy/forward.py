"""The upstream client: stream a request to the upstream and its answer back, or a WebSocket both ways.

Owns: sending a request through the pooled HTTP/1.1 client (`upstream.Pool`; aiohttp's
`ClientSession` for WebSockets only), answers up to 64 KiB in one buffered write, streaming
larger bodies both ways in bounded memory, the request-body limit (413), response hop-by-hop
headers, and mapping upstream failures: timeout → 504, refused/reset → 502 (aiohttp's
timeout error is also a `ClientConnectionError`, so `TimeoutError` is caught first). After
the response has started nothing can change its status: a failure then aborts the
connection, so the client sees a truncated answer, never a spliced one.
Does not own: JWTs, routes or which headers to send (identity.py decides those).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from collections.abc import AsyncIterator, Iterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import Upstream
from .errors import PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from .identity import connection_tokens, end_to_end
from .upstream import Pool, UpstreamError

__all__ = ["Origin", "SMALL_BODY", "forward", "forward_websocket", "is_websocket", "new_session"]

SMALL_BODY = 64 * 1024
"""Answers up to this size (by Content-Length) are read whole and written in one go."""
log = logging.getLogger("jwt_sidecar.forward")
_WS_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                         "sec-websocket-protocol", "sec-websocket-accept"})


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a route's upstream lives, parsed once per config."""

    scheme: str
    host: str
    port: int
    base_path: str
    """The upstream URL's path without its trailing slash; the request path is appended."""

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = URL(url)
        return cls(parts.scheme, parts.host or "", parts.port or 80, parts.raw_path.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def new_session(*, limit: int = 1000) -> aiohttp.ClientSession:
    """aiohttp's client, for what the pooled `upstream.Pool` does not do: WebSockets and key
    fetches. Pooled keep-alive connections, no cookie jar."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, enable_cleanup_closed=False)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # the upstream's cookies are the client's business
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )


class _BodyTooLarge(Exception):
    pass


async def _limited(request: web.BaseRequest, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, failing once more than `limit` bytes came (0: no limit)."""
    seen = 0
    async for chunk in request.content.iter_any():
        seen += len(chunk)
        if limit and seen > limit:
            raise _BodyTooLarge
        yield chunk


@contextlib.contextmanager
def _upstream_errors(url: URL, what: str) -> Iterator[None]:
    """Map a failed upstream call: timeout → 504, anything else from the client → 502.

    `TimeoutError` first: aiohttp's `ServerTimeoutError` is also a `ClientConnectionError`.
    """
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout(f"{what} {url.origin()} did not answer in time") from None
    except aiohttp.ClientError as error:
        raise UpstreamUnavailable(f"{what} {url.origin()}: {type(error).__name__}") from None


async def forward(
    request: web.BaseRequest,
    pool: Pool,
    *,
    origin: Origin,
    target: str,
    headers: CIMultiDict[str],
    upstream: Upstream,
    request_id: str,
) -> web.StreamResponse:
    """Send the request upstream and stream the answer back to the client."""
    length = request.content_length
    if upstream.max_body and length is not None and length > upstream.max_body:
        raise PayloadTooLarge(f"Content-Length {length} exceeds max_body {upstream.max_body}")
    body = _limited(request, upstream.max_body) if request.body_exists else None
    try:
        answer = await pool.request(
            request.method, origin.scheme, origin.host, origin.port, target, headers.items(), body,
            content_length=length, connect_timeout=upstream.connect_timeout, read_timeout=upstream.timeout,
        )
    except _BodyTooLarge:
        raise PayloadTooLarge(f"body exceeds max_body {upstream.max_body}") from None
    except TimeoutError:  # before UpstreamError's OSError-like cases: a timeout is a 504
        raise UpstreamTimeout(f"{origin} did not answer within {upstream.timeout:g}s") from None
    except UpstreamError as error:
        raise UpstreamUnavailable(f"{origin}: {type(error).__name__}") from None
    try:
        out = end_to_end(CIMultiDict(answer.headers))
        out["X-Request-Id"] = request_id
        if answer.has_body():
            small = await answer.read(SMALL_BODY)
            if small is not None:
                # One buffered write of head and body, and the connection back in the pool
                # before the client is even written to.
                answer.release()
                return web.Response(body=small, status=answer.status, reason=answer.reason, headers=out)
        response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=out)
        await response.prepare(request)
        if answer.has_body():
            try:
                async for chunk in answer.iter_chunks():
                    await response.write(chunk)
            except (TimeoutError, UpstreamError) as error:
                # Headers are gone already: all we can honestly do is cut the connection.
                log.warning("upstream %s broke off mid-response: %s", origin, type(error).__name__)
                answer.close()
                if request.transport is not None:
                    request.transport.abort()
                return response
            except (ConnectionError, asyncio.CancelledError):
                answer.close()  # the client went away: stop pulling from the upstream
                raise
        await response.write_eof()
        return response
    except (TimeoutError, UpstreamError) as error:
        # Failed before anything was sent to the client: still a clean 502/504.
        answer.close()
        if isinstance(error, TimeoutError):
            raise UpstreamTimeout(f"{origin} stalled mid-answer") from None
        raise UpstreamUnavailable(f"{origin}: {type(error).__name__}") from None
    finally:
        answer.release()


def is_websocket(request: web.BaseRequest) -> bool:
    return "upgrade" in connection_tokens(request.headers) and request.headers.get("Upgrade", "").lower() == "websocket"


async def forward_websocket(
    request: web.BaseRequest,
    session: aiohttp.ClientSession,
    *,
    url: URL,
    headers: CIMultiDict[str],
    upstream: Upstream,
    request_id: str,
) -> web.WebSocketResponse:
    """Open the upstream WebSocket first (so failures are still a 502/504), then relay both ways."""
    protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",") if p.strip()]
    sent = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _WS_HEADERS)
    ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    with _upstream_errors(ws_url, "websocket"):
        upstream_ws = await session.ws_connect(
            ws_url, headers=sent, protocols=protocols, autoclose=False, autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=upstream.timeout),
        )
    async with upstream_ws:
        client_ws = web.WebSocketResponse(protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
                                          autoclose=False, autoping=True)
        client_ws.headers["X-Request-Id"] = request_id
        await client_ws.prepare(request)
        relays = [asyncio.create_task(_relay(client_ws, upstream_ws)), asyncio.create_task(_relay(upstream_ws, client_ws))]
        try:
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            await upstream_ws.close()
            await client_ws.close()
    return client_ws


async def _relay(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.CLOSE:
            await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)
            return
        else:
            return
