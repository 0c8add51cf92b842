"""The admin listener: `/healthz`, `/readyz` and `/metrics`, on their own port, never proxied.

Owns: the three endpoints and what they answer, served by our own HTTP/1.1 server (http1.py's
`Server`, as the proxy port is; `admin_server`). Liveness says only that the event loop
answers; readiness asks the runtime (config loaded, every provider in use holds keys, not
draining) or, with `workers`, the set's (worker 0's); metrics renders the runtime's private registry
or the workers' aggregate. GET and HEAD only (any other method: 405 with `Allow`); any other
path: 404; the query string is ignored. The answers are those aiohttp's web server gave when
it served this port (statuses, bodies, content types), so probes and scrapers see no change.
Does not own: deciding readiness (runtime.py, workers.py), any metric (metrics.py), or HTTP
itself (http1.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from ..http.http1 import Request, Server

__all__ = ["admin_handler", "admin_server"]

Readiness = Callable[[], tuple[bool, str]]
Render = Callable[[str | None], tuple[bytes, str]]

_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_SERVER = ("Server", "jwt-sidecar")
_ALLOW = ("Allow", "GET,HEAD")
_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_ALIVE = json.dumps({"status": "alive"}).encode()


def admin_server(*, readiness: Readiness, render: Render, **kwargs: Any) -> Server:
    """The admin endpoints over two callables (the runtime's in one process, the set's
    with `workers`), on a server of their own: `await server.listen(sock=...)` opens it.
    `kwargs` go to `Server` (its timeouts)."""
    return Server(admin_handler(readiness=readiness, render=render), **kwargs)


def admin_handler(*, readiness: Readiness, render: Render) -> Callable[[Request], None]:
    """The request handler of the admin port: every answer is written at once."""

    def handle(request: Request) -> None:
        path = _path(request.raw_path)
        if path not in _PATHS:
            request.respond(404, None, [("Content-Type", _TEXT), _SERVER], b"404: Not Found")
            return
        if request.method != "GET" and request.method != "HEAD":
            request.respond(405, None, [("Content-Type", _TEXT), _ALLOW, _SERVER], b"405: Method Not Allowed")
            return
        if path == "/healthz":
            request.respond(200, None, [("Content-Type", _JSON), _SERVER], _ALIVE)
        elif path == "/readyz":
            ready, why = readiness()
            body = json.dumps({"ready": ready, "reason": why}).encode()
            request.respond(200 if ready else 503, None, [("Content-Type", _JSON), _SERVER], body)
        else:
            accept = request.header(b"accept")
            body, content_type = render(accept.decode("latin-1") if accept is not None else None)
            # prometheus-client's content type carries parameters (version, charset): sent whole.
            request.respond(200, None, [("Content-Type", content_type), _SERVER], body)

    return handle


def _path(target: str) -> str:
    """The path a request target names, decoded: origin-form (`/readyz?x=1`) or absolute-form."""
    if not target.startswith("/"):
        try:
            target = urlsplit(target).path
        except ValueError:
            return ""
    path = target.partition("?")[0].partition("#")[0]
    return unquote(path) if "%" in path else path
