"""The upstream client: stream a request to the upstream and its answer back, or a WebSocket both ways.

Owns: the pooled keep-alive client (one aiohttp `ClientSession` for the process), streaming
bodies both ways in bounded memory, the request-body limit (413), response hop-by-hop
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
from collections.abc import AsyncIterator, Iterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import Upstream
from .errors import PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from .identity import connection_tokens, end_to_end

__all__ = ["CHUNK", "forward", "forward_websocket", "is_websocket", "new_session"]

CHUNK = 64 * 1024
log = logging.getLogger("jwt_sidecar.forward")
# The client sends exactly the headers we give it: no User-Agent, Accept or Content-Type
# of aiohttp's own, and bodies pass through undecoded.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_WS_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                         "sec-websocket-protocol", "sec-websocket-accept"})


def new_session(*, limit: int = 1000) -> aiohttp.ClientSession:
    """The one upstream client of a process: pooled keep-alive connections, no cookie jar."""
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
    session: aiohttp.ClientSession,
    *,
    url: URL,
    headers: CIMultiDict[str],
    upstream: Upstream,
    request_id: str,
) -> web.StreamResponse:
    """Send the request upstream and stream the answer back to the client."""
    length = request.content_length
    if upstream.max_body and length is not None and length > upstream.max_body:
        raise PayloadTooLarge(f"Content-Length {length} exceeds max_body {upstream.max_body}")
    body = _limited(request, upstream.max_body) if request.body_exists else None
    timeout = aiohttp.ClientTimeout(total=None, connect=upstream.connect_timeout, sock_read=upstream.timeout)
    try:
        with _upstream_errors(url, "upstream"):
            try:
                upstream_response = await session.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False,
                    skip_auto_headers=_SKIP_AUTO, timeout=timeout, compress=None,
                )
            except aiohttp.ClientError as error:
                # The body generator's own failure may arrive wrapped in a client error.
                if isinstance(error.__cause__ or error.__context__, _BodyTooLarge):
                    raise _BodyTooLarge from None
                raise
    except _BodyTooLarge:
        raise PayloadTooLarge(f"body exceeds max_body {upstream.max_body}") from None
    async with upstream_response:
        response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason,
                                      headers=end_to_end(upstream_response.headers))
        response.headers["X-Request-Id"] = request_id
        await response.prepare(request)
        try:
            async for chunk in upstream_response.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as error:
            # Headers are gone already: all we can honestly do is cut the connection.
            log.warning("upstream %s broke off mid-response: %s", url.origin(), type(error).__name__)
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
    return response


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
