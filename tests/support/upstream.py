"""A real upstream for integration tests: records exactly what reached it and answers on demand.

Routes:
- any path: 200 JSON echo of method, raw path (with query), headers and body size; the
  request is also appended to `Upstream.seen`;
- `/slow?seconds=N`: answers after N seconds (for 504 and drain tests);
- `/download?bytes=N`: streams N bytes in 64 KiB chunks, generated, never held whole;
- `/upload`: reads the body as a stream, answers its size;
- `/status/NNN`: answers that status with no body (204, 304) or a short one;
- `/ws`: a WebSocket that echoes text and binary messages, and first sends the user id it saw.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, list[str]]
    body_size: int

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None


@dataclass
class Upstream:
    seen: list[Seen] = field(default_factory=list)
    server: Any = None

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def last(self) -> Seen:
        assert self.seen, "the upstream saw no request"
        return self.seen[-1]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/download", self._download)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    def _record(self, request: web.Request, size: int) -> Seen:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        seen = Seen(request.method, request.raw_path, headers, size)
        self.seen.append(seen)
        return seen

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = self._record(request, len(body))
        return web.json_response(
            {"method": seen.method, "path": seen.raw_path, "headers": seen.headers, "body_size": seen.body_size}
        )

    async def _slow(self, request: web.Request) -> web.Response:
        self._record(request, 0)
        await asyncio.sleep(float(request.query.get("seconds", "5")))
        return web.json_response({"slow": True})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self._record(request, 0)
        total = int(request.query["bytes"])
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < total:
            piece = chunk[: min(len(chunk), total - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        self._record(request, size)
        return web.json_response({"received": size})

    async def _status(self, request: web.Request) -> web.Response:
        self._record(request, 0)
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}")

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request, 0)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(f"hello {request.headers.get('X-User-Id')}")
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws


async def start_upstream(aiohttp_server: Any) -> Upstream:
    upstream = Upstream()
    upstream.server = await aiohttp_server(upstream.app())
    return upstream
